// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Umbrella header: everything in vattn's public API. Programs that use
// vattn may include this one header instead of the individual ones:
//
//   #include "vattn/vattn.h"
//
// Each header it pulls in covers one concept:
//   vattn/status.h   error codes and the VATTN_RETURN_IF_ERROR /
//                    VATTN_ASSIGN_OR_RETURN macros
//   vattn/export.h   the VATTN_EXPORT visibility macro
//   vattn/stream.h   Stream, the view of a device stream that fences take
//   vattn/backend.h  the backend layer (Host, CUDA) and its contract
//   vattn/backend_wrapper.h  BackendWrapper, the base of forwarding backends
//   vattn/latency_model.h    a wrapper charging measured driver costs
//   vattn/fault_injection.h  a wrapper failing chosen calls, for tests
//   vattn/options.h  KVCacheOptions, DType, Layout
//   vattn/stats.h    CacheStats
//   vattn/kv_cache.h KVCache, TensorView, StepRequest
//   vattn/memory_arbiter.h  MemoryArbiter: one budget shared by caches
//   vattn/arbiter_telemetry.h  TelemetryJson: the arbiter and its caches as JSON
//   vattn/slot_export.h  SendSlot / ReceiveSlot: zero-copy slot handoff
//                        between processes
//   vattn/c_api.h    the C API over all of the above (C callers include it
//                    alone)
#ifndef VATTN_VATTN_H_
#define VATTN_VATTN_H_

#include "vattn/arbiter_telemetry.h"
#include "vattn/backend.h"
#include "vattn/backend_wrapper.h"
#include "vattn/c_api.h"
#include "vattn/export.h"
#include "vattn/fault_injection.h"
#include "vattn/kv_cache.h"
#include "vattn/latency_model.h"
#include "vattn/memory_arbiter.h"
#include "vattn/options.h"
#include "vattn/slot_export.h"
#include "vattn/stats.h"
#include "vattn/status.h"
#include "vattn/stream.h"

#endif  // VATTN_VATTN_H_
