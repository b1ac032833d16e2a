// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Pieces shared by the extension's translation units. The extension is a
// thin layer over vattn's C++ API: it converts arguments, releases the GIL
// around every call that may map, unmap, zero or wait, and turns
// absl::Status into exceptions (errors.h). It holds no logic of its own.
#ifndef VATTN_PYTHON_SRC_BINDINGS_H_
#define VATTN_PYTHON_SRC_BINDINGS_H_

#include <memory>
#include <optional>
#include <type_traits>

#include <nanobind/nanobind.h>

#include "absl/status/statusor.h"
#include "python/src/errors.h"
#include "vattn/vattn.h"  // The whole public API, however it is split.

namespace vattn::python {

// What Python holds for any backend: a reference to the C++ backend, which
// a cache built on it shares. HostBackend, CudaBackend, ... are subclasses
// that only differ in how they are made.
struct PyBackend {
  std::shared_ptr<Backend> backend;
};

// A value or the exception for its status (GIL held).
template <typename T>
T ValueOrRaise(absl::StatusOr<T> value) {
  if (!value.ok()) Raise(value.status());
  return *std::move(value);
}

// vattn::Stream from a raw handle, whether Stream is a pointer or a class
// with FromHandle (both forms of the public header are accepted).
template <typename S = Stream>
S StreamFromHandle(void* handle) {
  if constexpr (std::is_pointer_v<S>) {
    return static_cast<S>(handle);
  } else {
    return S::FromHandle(handle);
  }
}

// None -> no stream; an int -> that raw handle; an object with an int
// attribute `cuda_stream` (torch.cuda.Stream) -> its handle. TypeError
// otherwise.
std::optional<Stream> StreamFromPython(nanobind::handle stream);

void BindBackends(nanobind::module_& m);
void BindCache(nanobind::module_& m);

}  // namespace vattn::python

#endif  // VATTN_PYTHON_SRC_BINDINGS_H_
