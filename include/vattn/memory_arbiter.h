// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Elastic memory: one physical budget shared by several KV caches on one
// backend (one process, one device). Each cache draws its physical memory
// (mapped, pooled and quarantined handles) from the arbiter's budget; when a
// cache needs memory and the budget is full, idle memory of any cache
// (pooled handles first, then idle slots' extents and cached prefixes,
// least recently used first across all caches) is destroyed to make room.
// Active memory is never taken.
//
//   auto backend = *vattn::MakeHostBackend();
//   auto arbiter = *vattn::MemoryArbiter::Create(backend, 8ull << 30);
//   vattn::KVCacheOptions a, b;                  // two models' shapes
//   a.arbiter = arbiter; a.arbiter_floor_bytes = 1ull << 30;
//   b.arbiter = arbiter; b.arbiter_cap_bytes = 6ull << 30;
//   auto cache_a = *vattn::KVCache::Create(a, backend);
//   auto cache_b = *vattn::KVCache::Create(b, backend);
//   ...
//   arbiter->Trim(2ull << 30);   // give idle memory back to the driver
//   arbiter->SetBudget(6ull << 30);
//
// Per-cache options (KVCacheOptions): `arbiter_floor_bytes`, memory the
// other caches can never take below (and that the cache can always obtain:
// the arbiter hands no one else the part of its budget under a cache's
// unused floor; a cache attached while others' active memory already fills
// that part obtains it as they free it, their idle memory at once), and
// `arbiter_cap_bytes`, a ceiling the cache never exceeds (KVCache::SetBudget
// changes it at run time). An attached cache's CacheStats::budget_bytes is
// its cap, or without one the arbiter's budget when it was attached.
//
// Locking (see src/memory_arbiter.h): the arbiter's own lock is a leaf,
// taken last (after a cache's lock and its pool's lock) and never held
// while calling a cache. A cache asks the arbiter to reclaim from others
// only without its own locks, so two caches reclaiming from each other at
// once cannot deadlock.
#ifndef VATTN_MEMORY_ARBITER_H_
#define VATTN_MEMORY_ARBITER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vattn/backend.h"
#include "vattn/export.h"

namespace vattn {

namespace internal {
struct ArbiterAccess;
}  // namespace internal

// One attached cache, as the arbiter accounts for it (bytes, all tensors).
struct ArbiterCacheStats {
  std::uint64_t id = 0;        // Unique per arbiter, in attach order from 1.
  std::string name;            // KVCacheOptions::arbiter_name, or "cache-<id>".
  // Physical bytes charged to the shared budget: live handles (mapped,
  // pooled, quarantined) plus creations in flight.
  std::int64_t physical_bytes = 0;
  // Of those, what reclamation may take: pooled handles, idle slots'
  // extents and active slots' surplus. Memory held outside the slots
  // (cached prefixes' extents, which reclamation evicts last when no
  // request uses them) is not counted here.
  std::int64_t reclaimable_bytes = 0;
  std::int64_t pooled_bytes = 0;  // Of reclaimable_bytes, pooled handles.
  // physical_bytes - reclaimable_bytes: memory backing active requests,
  // quarantined extents and cached prefixes; never taken, but for
  // prefixes nobody uses.
  std::int64_t active_bytes = 0;
  std::int64_t floor_bytes = 0;  // KVCacheOptions::arbiter_floor_bytes.
  // The cache's ceiling: arbiter_cap_bytes or its last KVCache::SetBudget;
  // 0 = none (the arbiter's budget is the only limit).
  std::int64_t cap_bytes = 0;
  std::int64_t peak_physical_bytes = 0;
  // Bytes destroyed in this cache to make room for other caches (or for
  // the arbiter's SetBudget / Trim), and bytes destroyed in other caches
  // to make room for this one.
  std::int64_t reclaimed_from_bytes = 0;
  std::int64_t reclaimed_for_bytes = 0;
  // Bytes destroyed in this cache by MemoryArbiter::Trim/SetBudget and
  // KVCache::Trim/SetBudget (counted in reclaimed_from_bytes too when the
  // arbiter did it).
  std::int64_t trimmed_bytes = 0;
};

// A snapshot of the arbiter and every cache attached to it.
struct ArbiterStats {
  std::int64_t budget_bytes = 0;    // The shared budget in force.
  // Sum of the caches' physical_bytes (charged: live plus in flight). At
  // most budget_bytes, except after SetBudget shrank the budget below what
  // active memory holds (until that memory is freed).
  std::int64_t physical_bytes = 0;
  std::int64_t peak_physical_bytes = 0;
  std::int64_t floors_bytes = 0;    // Sum of the caches' floors.
  // Cross-cache reclamations that freed memory (one victim call each), and
  // their bytes; requests for budget the arbiter refused.
  std::int64_t cross_reclaims = 0;
  std::int64_t cross_reclaimed_bytes = 0;
  std::int64_t refused_charges = 0;
  std::int64_t trimmed_bytes = 0;   // Destroyed by Trim and SetBudget.
  std::vector<ArbiterCacheStats> caches;  // In attach order.
};

// Shares one physical budget between the KV caches attached to it (through
// KVCacheOptions::arbiter). Created as a shared_ptr: every attached cache
// holds a reference, so the arbiter outlives them. Every method is
// thread-safe and may run concurrently with the caches' own calls.
class VATTN_EXPORT MemoryArbiter {
 public:
  // `backend` is the backend every attached cache must use (the same
  // object; KVCache::Create refuses another with InvalidArgument).
  // `budget_bytes` caps the physical bytes of all attached caches together,
  // at every instant (creations in flight included).
  // InvalidArgument: backend null, budget_bytes 0 or above 2^60.
  static absl::StatusOr<std::shared_ptr<MemoryArbiter>> Create(
      std::shared_ptr<Backend> backend, std::size_t budget_bytes);
  // Requires that no cache is attached any more (every cache holds a
  // reference, so this is automatic).
  ~MemoryArbiter();
  MemoryArbiter(const MemoryArbiter&) = delete;
  MemoryArbiter& operator=(const MemoryArbiter&) = delete;

  // Changes the shared budget at run time. Growth takes effect at once.
  // Shrinking below what the caches hold first destroys idle memory
  // (pooled handles, then idle extents in global LRU order, never taking a
  // cache below its floor) until the caches fit; the new budget stands
  // either way, and creations that would exceed it are refused until
  // memory is freed. Returns OK when the caches fit the new budget;
  // ResourceExhausted, with the bytes held, active and asked for, when
  // active memory (or floors' reclaimable memory) keeps them above it.
  // InvalidArgument (nothing changes): bytes 0, above 2^60, or below the
  // sum of the attached caches' floors. A backend error while destroying
  // is returned as is (the new budget stands; what was destroyed stays
  // destroyed).
  absl::Status SetBudget(std::size_t bytes);

  // Returns idle memory to the driver until the caches hold at most
  // `target_bytes` together: pooled handles first, then idle slots'
  // extents and cached prefixes, least recently used first across caches,
  // destroyed (not pooled); never a cache's memory below its floor, never
  // active memory. Returns the bytes destroyed. When active memory (plus
  // floors) exceeds the target it stops with what it could destroy (OK;
  // compare Stats().physical_bytes with the target). The result may land
  // below the target by less than one extent when only extents larger
  // than the remaining gap are idle. Each trimmed cache's background pool
  // refill then creates nothing beyond what it was trimmed to until the
  // cache needs a new handle again (see KVCache::Trim). The budget is
  // unchanged. Backend errors of Destroy are returned (what was destroyed
  // before stays destroyed; the handles that failed stay pooled).
  absl::StatusOr<std::size_t> Trim(std::size_t target_bytes);

  // The arbiter and every attached cache. Takes each cache's lock in turn
  // (never two at once); consistent per cache, not across caches.
  ArbiterStats Stats() const;

  std::size_t budget_bytes() const;
  const std::shared_ptr<Backend>& backend() const;

  struct Impl;

 private:
  friend struct internal::ArbiterAccess;
  explicit MemoryArbiter(std::shared_ptr<Impl> impl);
  const std::shared_ptr<Impl> impl_;
};

}  // namespace vattn

#endif  // VATTN_MEMORY_ARBITER_H_
