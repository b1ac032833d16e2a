// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// A small, strict JSON parser (RFC 8259) for tests that check JSON the
// library writes (vattn/arbiter_telemetry.h): objects, arrays, strings
// (escapes and \u sequences, surrogate pairs, UTF-8 checked), numbers,
// true/false/null. Not for production: recursion is bounded at depth 64.
#ifndef VATTN_TESTS_SUPPORT_JSON_VALUE_H_
#define VATTN_TESTS_SUPPORT_JSON_VALUE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace vattn::testing {

struct JsonValue {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool boolean = false;
  double number = 0;
  bool integral = false;      // The number had no fraction or exponent.
  std::int64_t integer = 0;   // Its value, when integral.
  std::string string;         // UTF-8.
  std::vector<JsonValue> array;
  std::map<std::string, JsonValue> object;

  bool Has(const std::string& key) const {
    return kind == Kind::kObject && object.count(key) > 0;
  }
  // The member (a null value when absent or not an object).
  const JsonValue& operator[](const std::string& key) const;
};

// The whole text must be one JSON value (whitespace around it allowed).
// InvalidArgument with the offset and what was wrong otherwise; an object
// with a key twice is refused too.
absl::StatusOr<JsonValue> ParseJson(const std::string& text);

}  // namespace vattn::testing

#endif  // VATTN_TESTS_SUPPORT_JSON_VALUE_H_
