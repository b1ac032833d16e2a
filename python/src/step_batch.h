// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Step's batch from Python: a list of (slot, tokens) pairs, two 1-D CPU
// integer arrays, or a vattn.StepBatch that owns the StepRequest array
// KVCache::Step reads (made once, updated in place through zero-copy views).
#ifndef VATTN_PYTHON_SRC_STEP_BATCH_H_
#define VATTN_PYTHON_SRC_STEP_BATCH_H_

#include <vector>

#include <nanobind/nanobind.h>

#include "vattn/kv_cache.h"

namespace vattn::python {

// vattn.StepBatch: the StepRequest array of one step.
struct PyStepBatch {
  std::vector<StepRequest> requests;
};

// A sequence of (slot, tokens) pairs into `out` (resized). TypeError for an
// entry that is not a pair of ints, InvalidArgumentError for a slot outside
// int's range; each names the entry's index.
void StepRequestsFromPairs(nanobind::handle batch, std::vector<StepRequest>& out);

// Two 1-D CPU integer arrays (DLPack or the buffer protocol) of one length
// into `out` (resized). TypeError / ValueError naming the bad argument.
void StepRequestsFromArrays(nanobind::handle slots, nanobind::handle tokens,
                            std::vector<StepRequest>& out);

// Registers vattn.StepBatch.
void BindStepBatch(nanobind::module_& m);

}  // namespace vattn::python

#endif  // VATTN_PYTHON_SRC_STEP_BATCH_H_
