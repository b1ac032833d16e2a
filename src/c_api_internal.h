// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// What the C API's translation units share (src/c_api*.cc): the opaque
// handles' definitions and the helpers that turn statuses and exceptions
// into C codes and vattn_last_error() text. Not installed.
#ifndef VATTN_SRC_C_API_INTERNAL_H_
#define VATTN_SRC_C_API_INTERNAL_H_

#include <cstddef>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "vattn/backend.h"
#include "vattn/c_api.h"
#include "vattn/kv_cache.h"
#include "vattn/memory_arbiter.h"

// The handles. Global, unnamespaced: they complete the C header's opaque
// struct declarations.
struct vattn_backend {
  std::shared_ptr<vattn::Backend> backend;
};
struct vattn_cache {
  std::unique_ptr<vattn::KVCache> cache;
};
struct vattn_arbiter {
  std::shared_ptr<vattn::MemoryArbiter> arbiter;
};

namespace vattn::c_api_internal {

// The message of the last failed call on this thread: the text in
// last_error, or a fixed one when even formatting the message ran out of
// memory. Null until a call fails.
inline thread_local std::string last_error;
inline thread_local const char* last_error_text = nullptr;

// Stores "CODE: function: message" for vattn_last_error() and returns the
// code. Never throws: if the text cannot be allocated, a fixed one is kept.
inline int Fail(const char* function, absl::StatusCode code, absl::string_view message,
         absl::string_view message_tail = {}) noexcept {
  try {
    last_error = absl::StatusCodeToString(code);
    absl::StrAppend(&last_error, ": ", function, ": ", message, message_tail);
    last_error_text = last_error.c_str();
  } catch (...) {
    // The code is returned all the same; only its text is lost.
    last_error_text =
        "out of host memory while formatting this failure's message";
  }
  return static_cast<int>(code);
}

inline int Fail(const char* function, const absl::Status& status) noexcept {
  return Fail(function, status.code(), status.message());
}

inline int Report(const char* function, const absl::Status& status) noexcept {
  return status.ok() ? static_cast<int>(VATTN_OK) : Fail(function, status);
}

inline int NullArgument(const char* function, const char* argument) noexcept {
  return Fail(function, absl::StatusCode::kInvalidArgument, argument,
              " is NULL");
}

// Runs `body` (which returns a C status), turning exceptions into statuses.
// The library throws none itself; allocations in this layer and in Abseil
// may throw std::bad_alloc.
template <typename Body>
int Guard(const char* function, Body&& body) noexcept {
  try {
    return std::forward<Body>(body)();
  } catch (const std::bad_alloc&) {
    return Fail(function, absl::StatusCode::kResourceExhausted,
                "out of host memory (std::bad_alloc)");
  } catch (const std::exception& e) {
    return Fail(function, absl::StatusCode::kInternal,
                "unexpected C++ exception: ", e.what());
  } catch (...) {
    return Fail(function, absl::StatusCode::kInternal,
                "unexpected C++ exception of unknown type");
  }
}

inline absl::Status CheckStructSize(const char* what, std::size_t got,
                             std::size_t expected) {
  if (got == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      what, "->struct_size is ", got, " but this vattn expects ", expected,
      " (set it to sizeof the struct; the caller was built against another "
      "version of vattn/c_api.h)"));
}

}  // namespace vattn::c_api_internal

#endif  // VATTN_SRC_C_API_INTERNAL_H_
