// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Error handling for vattn. Every public call returns absl::Status or
// absl::StatusOr<T>; no exception crosses the API. Codes mean:
//   InvalidArgument     bad options, a bad slot, a misaligned or zero size
//   OutOfRange          beyond max_tokens
//   FailedPrecondition  the object is in the wrong state (a freed slot, a
//                       handle that is still mapped, ...)
//   ResourceExhausted   a memory budget or the device's memory is used up
//   Unavailable         no driver or no device
//   Internal            the driver or the OS said something unexpected
//
// The Abseil release this project builds against (20220623) has no status
// macros of its own, so vattn provides two.
#ifndef VATTN_STATUS_H_
#define VATTN_STATUS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define VATTN_STATUS_CONCAT_INNER_(a, b) a##b
#define VATTN_STATUS_CONCAT_(a, b) VATTN_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing
// function if it is not OK.
#define VATTN_RETURN_IF_ERROR(expr)                          \
  do {                                                       \
    ::absl::Status vattn_status_ = (expr);                   \
    if (!vattn_status_.ok()) return vattn_status_;           \
  } while (false)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status from
// the enclosing function, otherwise moves the value into `lhs`, which may be
// a declaration (`auto x`) or an existing variable.
#define VATTN_ASSIGN_OR_RETURN(lhs, rexpr)                                   \
  VATTN_ASSIGN_OR_RETURN_IMPL_(                                              \
      VATTN_STATUS_CONCAT_(vattn_statusor_, __LINE__), lhs, rexpr)

#define VATTN_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // VATTN_STATUS_H_
