// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Telemetry of elastic memory: one call gives a JSON snapshot of a
// MemoryArbiter and every cache attached to it (vattn/memory_arbiter.h),
// for logs, dashboards and the C and Python APIs.
#ifndef VATTN_ARBITER_TELEMETRY_H_
#define VATTN_ARBITER_TELEMETRY_H_

#include <string>

#include "vattn/export.h"
#include "vattn/memory_arbiter.h"

namespace vattn {

// The version of the JSON layout below; raised when a field changes meaning
// or goes away (new fields may be added without raising it).
inline constexpr int kArbiterTelemetryVersion = 1;

// `stats` as one JSON object (RFC 8259, UTF-8, no trailing newline):
//   {"version": 1, "budget_bytes": N, "physical_bytes": N,
//    "peak_physical_bytes": N, "floors_bytes": N, "cross_reclaims": N,
//    "cross_reclaimed_bytes": N, "refused_charges": N, "trimmed_bytes": N,
//    "caches": [{"id": N, "name": "...", "physical_bytes": N,
//                "reclaimable_bytes": N, "pooled_bytes": N,
//                "active_bytes": N, "floor_bytes": N, "cap_bytes": N,
//                "peak_physical_bytes": N, "reclaimed_from_bytes": N,
//                "reclaimed_for_bytes": N, "trimmed_bytes": N}, ...]}
// Every number is an integer, named and meaning as ArbiterStats' fields;
// caches in attach order. A name's quotes, backslashes and control
// characters are escaped, and bytes that are not valid UTF-8 become
// U+FFFD, so any name gives valid JSON. Pure; thread-safe.
VATTN_EXPORT std::string ArbiterStatsJson(const ArbiterStats& stats);

// ArbiterStatsJson(arbiter.Stats()): one snapshot (consistent per cache,
// not across caches; see MemoryArbiter::Stats). Thread-safe, as Stats.
VATTN_EXPORT std::string TelemetryJson(const MemoryArbiter& arbiter);

}  // namespace vattn

#endif  // VATTN_ARBITER_TELEMETRY_H_
