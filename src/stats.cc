// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "vattn/stats.h"

#include "absl/strings/str_format.h"

namespace vattn {
namespace {

double MiB(std::int64_t bytes) {
  return static_cast<double>(bytes) / (1024.0 * 1024.0);
}

}  // namespace

std::string CacheStats::ToString() const {
  return absl::StrFormat(
      "memory: physical %.1f MiB (peak %.1f, budget %.1f), mapped %.1f MiB "
      "(surplus %.1f), pooled %.1f MiB, logical %.1f MiB\n"
      "slots: %d active, %d idle holding memory\n"
      "driver calls: create %d, map %d, unmap %d, destroy %d\n"
      "policy: %d grows, %d extents, %d reuse hits, %d adopted, reclaimed "
      "%.1f MiB in %d extents, %d fence waits, zeroed %.1f MiB\n"
      "step: %d calls, %d misses, %.3f ms mapping on the caller; background "
      "mapped %d extents, created %d handles, %d failures, %d wake-ups (%d "
      "on its deadline, %d by callers)\n"
      "faults: %d extents (%.1f MiB) in quarantine\n"
      "handoff: exported %.1f MiB (%d slots), imported %.1f MiB (%d slots)",
      MiB(physical_bytes), MiB(peak_physical_bytes), MiB(budget_bytes),
      MiB(mapped_bytes), MiB(surplus_bytes), MiB(pooled_bytes),
      MiB(logical_bytes), active_slots,
      idle_slots_with_memory, create_calls, map_calls, unmap_calls,
      destroy_calls, grow_calls, extents_mapped, reuse_hits, adopted_extents,
      MiB(reclaimed_bytes), reclaimed_extents, fence_waits, MiB(zeroed_bytes),
      step_calls, step_misses, static_cast<double>(step_map_nanos) / 1e6,
      background_extents, background_creates, background_failures,
      background_wakeups, background_deadline_wakeups,
      background_caller_wakeups, quarantined_extents, MiB(quarantined_bytes),
      MiB(exported_bytes), exported_slots, MiB(imported_bytes), imported_slots);
}

}  // namespace vattn
