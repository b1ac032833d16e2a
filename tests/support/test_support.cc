// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "tests/support/test_support.h"

#include "absl/strings/str_cat.h"

namespace vattn::testing {

std::string Describe(const absl::Status& status) {
  if (status.ok()) return "OK";
  return absl::StrCat(absl::StatusCodeToString(status.code()), ": ",
                      status.message());
}

}  // namespace vattn::testing
