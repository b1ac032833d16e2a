// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn._vattn: the nanobind extension behind the `vattn` package.
#include <nanobind/nanobind.h>

#include "python/src/arbiter_bindings.h"
#include "python/src/bindings.h"
#include "python/src/errors.h"
#include "python/src/step_batch.h"

NB_MODULE(_vattn, m) {
  m.doc() = "vattn's C++ API (KV cache in contiguous virtual memory), bound with nanobind.";
  vattn::python::RegisterErrors(m);
  vattn::python::BindBackends(m);
  vattn::python::BindStepBatch(m);
  vattn::python::BindCache(m);
  vattn::python::BindArbiter(m);  // Adds to Cache: after BindCache.
  vattn::python::BindExport(m);
}
