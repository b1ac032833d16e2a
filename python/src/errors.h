// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn's exception hierarchy for Python: vattn.Error, and one subclass per
// absl::StatusCode that also derives from the matching builtin (ValueError
// for InvalidArgument, IndexError for OutOfRange, MemoryError for
// ResourceExhausted, NotImplementedError for Unimplemented, RuntimeError for
// the rest). Every exception carries `code` (absl's int), `code_name`
// ("INVALID_ARGUMENT", ...) and `message`.
#ifndef VATTN_PYTHON_SRC_ERRORS_H_
#define VATTN_PYTHON_SRC_ERRORS_H_

#include <string>

#include <nanobind/nanobind.h>

#include "absl/status/status.h"

namespace vattn::python {

// Creates the exception classes and adds them to `m`. Called once, at import.
void RegisterErrors(nanobind::module_& m);

// Raises the exception for `status` (not OK). The GIL must be held.
[[noreturn]] void Raise(const absl::Status& status);
[[noreturn]] void Raise(absl::StatusCode code, const std::string& message);

// Raises if `status` is not OK. The GIL must be held.
inline void ThrowIfError(const absl::Status& status) {
  if (!status.ok()) Raise(status);
}

}  // namespace vattn::python

#endif  // VATTN_PYTHON_SRC_ERRORS_H_
