// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "python/src/errors.h"

#include <array>

#include "absl/strings/str_cat.h"

namespace nb = nanobind;

namespace vattn::python {
namespace {

constexpr int kNumCodes = 17;  // absl::StatusCode 0 (OK) .. 16.

struct ErrorClass {
  absl::StatusCode code;
  const char* name;
  PyObject* builtin;  // The builtin it also derives from.
  const char* doc;
};

// One entry per absl::StatusCode except OK. The builtins are looked up at
// registration (PyExc_* are not constant expressions).
std::array<PyObject*, kNumCodes> g_classes{};
PyObject* g_error = nullptr;

}  // namespace

void RegisterErrors(nb::module_& m) {
  g_error = PyErr_NewExceptionWithDoc(
      "vattn.Error",
      "Base class of every vattn error. Attributes: code (absl::StatusCode as "
      "an int), code_name ('INVALID_ARGUMENT', ...) and message.",
      PyExc_Exception, nullptr);
  if (g_error == nullptr) throw nb::python_error();
  m.attr("Error") = nb::handle(g_error);

  const ErrorClass classes[] = {
      {absl::StatusCode::kCancelled, "CancelledError", PyExc_RuntimeError,
       "The operation was cancelled."},
      {absl::StatusCode::kUnknown, "UnknownError", PyExc_RuntimeError,
       "An error with no better code."},
      {absl::StatusCode::kInvalidArgument, "InvalidArgumentError",
       PyExc_ValueError,
       "Bad options, a bad slot or layer, a misaligned or zero size."},
      {absl::StatusCode::kDeadlineExceeded, "DeadlineExceededError",
       PyExc_RuntimeError, "A deadline passed."},
      {absl::StatusCode::kNotFound, "NotFoundError", PyExc_RuntimeError,
       "Something asked for does not exist."},
      {absl::StatusCode::kAlreadyExists, "AlreadyExistsError",
       PyExc_RuntimeError, "Something to create exists already."},
      {absl::StatusCode::kPermissionDenied, "PermissionDeniedError",
       PyExc_RuntimeError, "Not allowed."},
      {absl::StatusCode::kResourceExhausted, "ResourceExhaustedError",
       PyExc_MemoryError,
       "A memory budget, the device's memory or the slots are used up."},
      {absl::StatusCode::kFailedPrecondition, "FailedPreconditionError",
       PyExc_RuntimeError,
       "The object is in the wrong state (a freed slot, a closed cache, ...)."},
      {absl::StatusCode::kAborted, "AbortedError", PyExc_RuntimeError,
       "The operation was aborted."},
      {absl::StatusCode::kOutOfRange, "OutOfRangeError", PyExc_IndexError,
       "Beyond max_tokens."},
      {absl::StatusCode::kUnimplemented, "UnimplementedError",
       PyExc_NotImplementedError, "Not supported (NotImplementedError is a "
       "RuntimeError)."},
      {absl::StatusCode::kInternal, "InternalError", PyExc_RuntimeError,
       "The driver or the OS said something unexpected."},
      {absl::StatusCode::kUnavailable, "UnavailableError", PyExc_RuntimeError,
       "No driver or no device."},
      {absl::StatusCode::kDataLoss, "DataLossError", PyExc_RuntimeError,
       "Unrecoverable data loss."},
      {absl::StatusCode::kUnauthenticated, "UnauthenticatedError",
       PyExc_RuntimeError, "Not authenticated."},
  };
  for (const ErrorClass& c : classes) {
    nb::object bases = nb::make_tuple(nb::handle(g_error), nb::handle(c.builtin));
    const std::string qualified = absl::StrCat("vattn.", c.name);
    PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), c.doc,
                                              bases.ptr(), nullptr);
    if (cls == nullptr) throw nb::python_error();
    g_classes[static_cast<int>(c.code)] = cls;
    m.attr(c.name) = nb::handle(cls);
  }
}

void Raise(absl::StatusCode code, const std::string& message) {
  const int index = static_cast<int>(code);
  PyObject* cls = (index > 0 && index < kNumCodes && g_classes[index] != nullptr)
                      ? g_classes[index]
                      : g_classes[static_cast<int>(absl::StatusCode::kUnknown)];
  const std::string code_name = absl::StatusCodeToString(code);
  nb::object exc = nb::handle(cls)(nb::str(
      absl::StrCat(code_name, ": ", message).c_str()));
  exc.attr("code") = index;
  exc.attr("code_name") = nb::str(code_name.c_str());
  exc.attr("message") = nb::str(message.c_str());
  PyErr_SetObject(cls, exc.ptr());
  throw nb::python_error();
}

void Raise(const absl::Status& status) {
  Raise(status.code(), std::string(status.message()));
}

}  // namespace vattn::python
