// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// A snapshot of a KV cache's memory and driver activity.
#ifndef VATTN_STATS_H_
#define VATTN_STATS_H_

#include <cstdint>
#include <string>

#include "vattn/export.h"

namespace vattn {

struct CacheStats {
  // ---- Memory now (bytes) ----------------------------------------------
  std::int64_t physical_bytes = 0;  // Live handles: mapped, pooled and
                                    // quarantined.
  std::int64_t pooled_bytes = 0;    // Live handles mapped nowhere.
  std::int64_t mapped_bytes = 0;    // Mapped into slots (active and idle).
  // Mapped into active slots beyond what their requests have adopted: left
  // by an earlier request in a reused slot, adopted for free as the request
  // grows, reclaimable under pressure.
  std::int64_t surplus_bytes = 0;
  std::int64_t logical_bytes = 0;   // Active slots' lengths x bytes/token.
  std::int64_t budget_bytes = 0;    // The physical cap in force.
  std::int64_t peak_physical_bytes = 0;

  // ---- Prefix sharing (KVCache::KeepPrefix and friends) ------------------
  // Physical bytes of shared extents mapped into more than one place, or
  // kept by a cached prefix and mapped in a slot (counted once each, as in
  // physical_bytes).
  std::int64_t shared_bytes = 0;
  // Bytes the slots map through shared extents beyond their first mapping:
  // what the same slots would need on top without sharing. mapped_bytes
  // counts every mapping (so with sharing it can exceed physical_bytes):
  // mapped_bytes - shared_saved_bytes is mapped physical memory.
  std::int64_t shared_saved_bytes = 0;
  std::int64_t cached_prefixes = 0;
  // Physical bytes the cached prefixes keep (whole extents and tails; a
  // shared extent some slot maps too counts here and in mapped_bytes).
  std::int64_t cached_prefix_bytes = 0;
  std::int64_t prefix_hits = 0;        // AllocSlotWithPrefix successes.
  std::int64_t forks = 0;              // Fork successes.
  std::int64_t prefix_evictions = 0;   // Cached prefixes reclaimed.
  std::int64_t cow_copied_bytes = 0;   // Copied at share time (tails).
  std::int64_t copy_calls = 0;         // Backend CopyDeviceToDevice calls.
  std::int64_t set_access_calls = 0;   // Backend SetAccess calls.

  // ---- Zero-copy handoff (KVCache::ExportSlot / ImportSlot) --------------
  // Bytes mapped in this cache's slots that it exported to another process:
  // still its physical bytes (and in its budget) until the slot lets go,
  // then destroyed, never pooled.
  std::int64_t exported_bytes = 0;
  // Bytes mapped in this cache's slots that another process exported: not
  // in physical_bytes nor the budget (in mapped_bytes, as every mapping).
  std::int64_t imported_bytes = 0;
  std::int64_t exported_slots = 0;  // ExportSlot successes.
  std::int64_t imported_slots = 0;  // ImportSlot successes.

  // ---- Slots ---------------------------------------------------------------
  std::int64_t active_slots = 0;
  std::int64_t idle_slots_with_memory = 0;  // Freed, extents still mapped.

  // ---- Driver calls made by this cache ---------------------------------
  std::int64_t create_calls = 0;
  std::int64_t destroy_calls = 0;
  std::int64_t map_calls = 0;
  std::int64_t unmap_calls = 0;

  // ---- Policy outcomes -----------------------------------------------------
  std::int64_t grow_calls = 0;
  std::int64_t extents_mapped = 0;     // Extents added to slots.
  std::int64_t reuse_hits = 0;         // AllocSlot found memory mapped.
  std::int64_t adopted_extents = 0;    // Surplus extents a request grew into
                                       // (no driver call).
  std::int64_t reclaimed_bytes = 0;    // Taken back from idle slots.
  std::int64_t reclaimed_extents = 0;
  std::int64_t fence_waits = 0;        // Reclamation waited on GPU work.
  std::int64_t zeroed_bytes = 0;       // zero_on_reuse work.

  // ---- Faults ----------------------------------------------------------------
  // Extents whose mapping state a failed unmap (and failed rollback) left
  // unknown: held apart, never backing a request, their unmap retried on
  // later calls. Their bytes count in physical_bytes, not in mapped_bytes.
  std::int64_t quarantined_extents = 0;
  std::int64_t quarantined_bytes = 0;
  // Map-ahead attempts (look-ahead maps, pool refills) that failed; the
  // thread backs off and the foreground maps what it needs itself.
  std::int64_t background_failures = 0;

  // ---- Step and map-ahead ----------------------------------------------------
  std::int64_t step_calls = 0;
  std::int64_t step_misses = 0;        // Slots Step had to map itself.
  std::int64_t step_map_nanos = 0;     // Caller time spent mapping in Step.
  std::int64_t background_extents = 0;  // Extents mapped by the thread.
  std::int64_t background_creates = 0;  // Handles created by the thread.
  // The map-ahead thread's returns from sleep: all of them, those because
  // its nap ran out (a deadline from the slots' look-ahead), and the
  // Wake-ups a caller paid for (a futex call; Step only when a slot is
  // nearly out of look-ahead). Zero while nothing needs the thread.
  std::int64_t background_wakeups = 0;
  std::int64_t background_deadline_wakeups = 0;
  std::int64_t background_caller_wakeups = 0;

  // A few readable lines, for logs and examples.
  VATTN_EXPORT std::string ToString() const;
};

}  // namespace vattn

#endif  // VATTN_STATS_H_
