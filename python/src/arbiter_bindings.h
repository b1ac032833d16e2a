// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn.MemoryArbiter (vattn/memory_arbiter.h) for Python, and what the
// cache's bindings need of it: the handle Python holds and its conversion
// from the `arbiter=` option.
#ifndef VATTN_PYTHON_SRC_ARBITER_BINDINGS_H_
#define VATTN_PYTHON_SRC_ARBITER_BINDINGS_H_

#include <memory>

#include <nanobind/nanobind.h>

#include "vattn/memory_arbiter.h"

namespace vattn::python {

// What Python holds: a reference to the arbiter, which every cache attached
// to it shares.
struct PyArbiter {
  std::shared_ptr<MemoryArbiter> arbiter;
};

// None -> null (the cache's own budget); a vattn.MemoryArbiter -> its
// arbiter. TypeError otherwise. GIL held.
std::shared_ptr<MemoryArbiter> ArbiterFromPython(nanobind::handle value);

// vattn.MemoryArbiter, and Cache.set_budget / Cache.trim. Call after
// BindCache (it adds methods to vattn.Cache).
void BindArbiter(nanobind::module_& m);

}  // namespace vattn::python

#endif  // VATTN_PYTHON_SRC_ARBITER_BINDINGS_H_
