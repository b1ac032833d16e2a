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

// True while the interpreter shuts down (the GIL must then not be released).
inline bool Finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// What Python holds: a reference to the KVCache that views share. close()
// drops it; the memory goes when the last view is gone too.
struct PyCache {
  std::shared_ptr<KVCache> cache;

  KVCache& Get() const {
    if (cache == nullptr) {
      Raise(absl::StatusCode::kFailedPrecondition, "the cache is closed");
    }
    return *cache;
  }
  // Drops this reference, without the GIL: the last reference waits for
  // fenced GPU work and joins the map-ahead thread.
  void Close() {
    std::shared_ptr<KVCache> dying = std::move(cache);
    if (dying != nullptr && !Finalizing()) {
      nanobind::gil_scoped_release release;
      dying.reset();
    }
  }
  ~PyCache() { Close(); }
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
// vattn.send_slot / vattn.receive_slot (export_bindings.cc); after BindCache.
void BindExport(nanobind::module_& m);
// Prefix sharing's methods on vattn.Cache (prefix_bindings.cc), and
// vattn.PrefixInfo; called by BindCache.
void BindPrefix(nanobind::module_& m, nanobind::class_<PyCache>& cache_class);

}  // namespace vattn::python

#endif  // VATTN_PYTHON_SRC_BINDINGS_H_
