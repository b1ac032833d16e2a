// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The latency-model backend: a wrapper that charges measured driver costs, so
// that map-ahead and pool logic can be measured on CPUs.
#ifndef VATTN_LATENCY_MODEL_H_
#define VATTN_LATENCY_MODEL_H_

#include <cstddef>
#include <memory>

#include "absl/status/statusor.h"
#include "vattn/backend.h"
#include "vattn/export.h"

namespace vattn {

// Latency model: forwards every call to an inner backend and charges a cost
// per call on top, by spinning, under one lock per backend for the mapping
// calls (the driver serializes mapping). Lets map-ahead logic be measured on
// CPUs with GPU-like costs.

// Cost of one call on a handle or range of `bytes`:
//   base_us + per_granule_us * bytes / 2 MiB.
struct VATTN_EXPORT CallCost {
  double base_us = 0;
  double per_granule_us = 0;
  double Micros(std::size_t bytes) const;
};

struct VATTN_EXPORT LatencyCosts {
  CallCost reserve;
  CallCost release;
  CallCost create;
  CallCost destroy;
  CallCost map;  // cuMemMap + cuMemSetAccess.
  CallCost unmap;
  CallCost set_access;  // cuMemSetAccess on a live mapping.
  // Fitted to the medians measured on an H200 (driver 580, CUDA 13) in
  // DESIGN.md: 2 MiB, 128 MiB and 512 MiB handles.
  static LatencyCosts H200();
  // The same shape measured on an H100.
  static LatencyCosts H100();
  // No cost at all: the wrapper only forwards.
  static LatencyCosts Zero();
  const CallCost& For(BackendOp op) const;
};

// Every cost must be finite, non-negative and at most kMaxCallCostMicros
// (base_us and per_granule_us alike): InvalidArgument naming the field
// otherwise, as for a null `inner`. Whatever the size of a call, one charge
// spins for at most kMaxChargeMicros. The returned backend owns a reference
// to `inner` and is thread-safe.
inline constexpr double kMaxCallCostMicros = 1e6;  // One second.
inline constexpr double kMaxChargeMicros = 60e6;   // One minute.
VATTN_EXPORT absl::StatusOr<std::shared_ptr<Backend>> MakeLatencyModelBackend(
    std::shared_ptr<Backend> inner, LatencyCosts costs = LatencyCosts::H200());

}  // namespace vattn

#endif  // VATTN_LATENCY_MODEL_H_
