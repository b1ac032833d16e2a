// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The physical layer of a KV cache: every handle the cache owns, idle ones
// pooled by size for reuse, and the budget that caps them all.
#ifndef VATTN_SRC_PHYSICAL_POOL_H_
#define VATTN_SRC_PHYSICAL_POOL_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "src/internal/mutex.h"
#include "vattn/backend.h"

namespace vattn {

namespace internal {
class ArbiterMember;  // src/memory_arbiter.h
}  // namespace internal

// The bounded set of handle sizes used for extents whose size varies with
// the request (prompts): a size rounds up to the smallest class that holds
// it, so an idle handle of one class serves every request that rounds to
// it, and the pool needs one stock per class instead of one per size.
// Classes, in granules: every count up to `steps_per_doubling`, then
// `steps_per_doubling` evenly spaced sizes per doubling (for 16: 1..16, 18,
// 20, ..., 32, 36, ..., 64, 72, ...). Rounding wastes less than
// 1 / (steps_per_doubling + 1) of a class (5.9% for 16), about half of that
// on average; there are about steps_per_doubling classes per doubling of
// the largest size. A value type; thread-compatible.
class SizeClasses {
 public:
  // granularity: a power of two; steps_per_doubling: a power of two >= 1.
  // Other values are raised to the next power of two.
  SizeClasses(std::int64_t granularity, int steps_per_doubling);

  // The smallest class >= bytes (bytes >= 1; 0 for bytes <= 0). A class is
  // a multiple of the granularity.
  std::int64_t Round(std::int64_t bytes) const;
  // How many classes are <= max_bytes.
  int CountUpTo(std::int64_t max_bytes) const;
  // Bound on (Round(b) - b) / Round(b) for b above one granule's worth of
  // rounding: 1 / (steps_per_doubling + 1).
  double MaxWasteFraction() const;

  std::int64_t granularity() const { return granularity_; }
  int steps_per_doubling() const { return 1 << log2_steps_; }

 private:
  std::int64_t granularity_;
  int log2_granularity_;
  int log2_steps_;
};

// Owns physical handles for one cache: hands them out (idle ones of the size
// asked for first, else newly created within the budget) and takes them back
// into the idle pool. Physical bytes (handed out plus idle plus creations in
// flight) never exceed the budget. Thread-safe; driver calls run without the
// pool's lock, so one thread creating handles does not block another taking
// an idle one. Never calls back into its users.
//
// With an arbiter (SetArbiter), the budget is shared with other caches' pools
// as well: every creation is charged to the arbiter (ArbiterMember::TryCharge)
// under the pool's lock before the driver call, and refunded after a Destroy
// (or a failed Create), so the bytes of all the arbiter's pools together never
// exceed its budget, creations in flight included. The pool's own budget is
// then the cache's cap. Lock order: the cache's lock, the pool's lock, the
// arbiter's lock (a leaf).
class PhysicalPool {
 public:
  struct Counters {
    std::int64_t physical_bytes = 0;  // Live handles (out plus idle).
    std::int64_t idle_bytes = 0;
    std::int64_t peak_physical_bytes = 0;
    std::int64_t create_calls = 0;
    std::int64_t destroy_calls = 0;
    // Handles Acquire handed out from the idle pool, and those it created.
    std::int64_t idle_hits = 0;
    std::int64_t idle_misses = 0;
    // Driver-call batches Destroy ran in (one lock round trip each).
    std::int64_t destroy_batches = 0;
  };

  struct Options {
    // Steps per doubling of the prompt size classes (SizeClasses).
    int size_class_steps = 16;
    // Replenish keeps idle handles (of every size together) within this
    // share of the budget, whatever demand says: pooled memory cannot
    // strand the budget.
    double max_pooled_fraction = 1.0 / 16;
    // Demand is counted in periods of this length; RefillTarget looks at
    // the last demand_window of them (1..16), the current one included.
    std::int64_t demand_period_nanos = 50'000'000;  // 50 ms.
    int demand_window = 4;
    // The clock periods are cut from (tests pass their own); null: the
    // steady clock.
    std::function<std::int64_t()> now_nanos;
  };

  // budget_bytes: the cap; must be positive.
  PhysicalPool(std::shared_ptr<Backend> backend, std::int64_t budget_bytes);
  PhysicalPool(std::shared_ptr<Backend> backend, std::int64_t budget_bytes,
               const Options& options);
  // Destroys every idle handle. Handles still handed out are the caller's
  // to Release first (they are mapped somewhere the pool cannot see).
  ~PhysicalPool();
  PhysicalPool(const PhysicalPool&) = delete;
  PhysicalPool& operator=(const PhysicalPool&) = delete;

  // Hands out `count` handles of `bytes` each: idle ones of that size first,
  // then new ones. To make room it destroys idle handles of other sizes
  // (largest first, in one batch). ResourceExhausted when the budget (or the
  // device) cannot hold them; then nothing changed (idle handles are
  // destroyed only when that makes enough room). All-or-nothing. `quiet`
  // skips formatting the message of a budget refusal, for callers that try
  // several sizes in turn.
  absl::StatusOr<std::vector<PhysicalHandle>> Acquire(std::size_t bytes,
                                                      int count,
                                                      bool quiet = false);
  // Takes handles of `bytes` back into the idle pool.
  void Release(std::vector<PhysicalHandle> handles, std::size_t bytes);
  // Destroys handles of `bytes` that Acquire handed out and that must never
  // come back to the idle pool (exported to another process, which may
  // still map them): their bytes leave physical_bytes as each is destroyed
  // (driver calls without the pool's lock). A handle whose Destroy fails
  // stays counted as physical, is never handed out again, and is retried by
  // DestroyIdle. Returns the first error.
  absl::Status DestroyHandedOut(std::vector<PhysicalHandle> handles,
                                std::size_t bytes);
  // Creates idle handles of `bytes` until `count` of that size are idle
  // (within the budget). Returns how many it created.
  absl::StatusOr<int> Fill(std::size_t bytes, int count);

  // ---- Demand-following refill (the background thread's water marks) ----
  // The idle handles of `bytes` a refill aims for (the high water mark):
  // the most handles of that size Acquire handed out in one demand period
  // over the last demand_window periods, at least 1 once the size was ever
  // handed out, at most `max_count` (the caller's cap, e.g.
  // KVCacheOptions.pool_high_water), and within max_pooled_fraction of the
  // budget (counting idle handles of other sizes). 0 for a size never
  // handed out: nothing is pooled for demand that never came.
  int RefillTarget(std::size_t bytes, int max_count) const;
  // True when fewer than half the refill target (rounded up) are idle: the
  // low water mark.
  bool BelowLowWater(std::size_t bytes, int max_count) const;
  // Creates idle handles of `bytes` toward RefillTarget(bytes, max_count),
  // at most `max_create` of them (a background thread that must not hold
  // up a foreground miss creates one per round), within the budget's
  // headroom. Returns how many it created, or the backend's Create error
  // (what was created before it stays idle).
  absl::StatusOr<int> Replenish(std::size_t bytes, int max_count,
                                int max_create = 1 << 30);

  // Destroys every idle handle, in one batch. Returns the first error; the
  // handles whose destroy failed stay idle.
  absl::Status DestroyIdle();
  // Destroys idle handles, largest first, until `bytes` are destroyed or
  // none is left, skipping any whose destroy would take the physical bytes
  // (live plus in flight) below `keep_bytes`; one batch. Returns the bytes
  // destroyed, or the first error (the handles that failed stay idle).
  absl::StatusOr<std::int64_t> DestroyIdleBytes(std::int64_t bytes,
                                                std::int64_t keep_bytes);

  // ---- Run-time budget and trim ---------------------------------------------
  // Changes the pool's own budget (> 0). Shrinking destroys nothing: until
  // the physical bytes fit, every creation is refused.
  void SetBudget(std::int64_t budget_bytes);
  // Shares a budget through the arbiter's books: from now on every creation
  // is charged to `member` and every destroy refunded. Call once, before
  // the pool holds any handle.
  void SetArbiter(std::shared_ptr<internal::ArbiterMember> member);
  // After a trim: Fill and Replenish (the background refill) create nothing
  // that would take the physical bytes above what they are now, until
  // Acquire creates a handle again (the cache needed memory it did not
  // pool: demand is back, and so is the refill).
  void HoldRefill();
  bool refill_held() const;

  int IdleCount(std::size_t bytes) const;
  // Bytes that can still be created under the budget (and, with an
  // arbiter, under the shared budget).
  std::int64_t Headroom() const;
  // The same under the pool's own budget only (the cache's cap).
  std::int64_t OwnHeadroom() const;
  std::int64_t budget_bytes() const;
  const SizeClasses& size_classes() const { return classes_; }
  Counters counters() const;

 private:
  // Handed-out counts of one size per demand period: a ring indexed by
  // period number modulo its size; a slot whose period is stale reads 0.
  struct Demand {
    std::array<int, 16> count{};
    std::array<std::int64_t, 16> period{};
    bool seen = false;
  };
  std::int64_t NowPeriod() const;

  // Destroys idle handles of sizes other than `keep`, largest first, until
  // `bytes` are freed or none are left, in one batch: victims are taken
  // off the idle lists under mu_, destroyed with mu_ dropped, and those
  // whose destroy failed are put back. Returns the bytes freed, or the
  // first error. bytes < 0: every idle handle other than `keep`.
  // keep_bytes: no handle is destroyed that would take the physical bytes
  // (live plus in flight) below it.
  absl::StatusOr<std::int64_t> DestroyIdleLocked(std::size_t keep,
                                                 std::int64_t bytes,
                                                 std::int64_t keep_bytes = 0)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::int64_t HeadroomLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // HeadroomLocked, within a trim's hold (HoldRefill): what Fill and
  // Replenish may create.
  std::int64_t RefillRoomLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int IdleCountLocked(std::size_t bytes) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int RefillTargetLocked(std::size_t bytes, int max_count) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Creates up to `count` handles of `bytes`, dropping mu_ around the driver
  // calls (their bytes count against the budget meanwhile), appends them to
  // *created and counts them as physical. The first failure stops it. With
  // an arbiter the bytes are charged first (ResourceExhausted, nothing
  // created, when the shared budget refuses) and what was not created is
  // refunded.
  absl::Status CreateLocked(std::size_t bytes, int count,
                            std::vector<PhysicalHandle>* created)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Destroys (handle, bytes) pairs handed out earlier (mu_ not held);
  // failures go to doomed_. Returns the first error.
  absl::Status DestroyDoomed(
      std::vector<std::pair<PhysicalHandle, std::size_t>> doomed)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Moves *handles into the idle pool and clears the vector.
  void ReleaseLocked(std::vector<PhysicalHandle>* handles, std::size_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const std::shared_ptr<Backend> backend_;
  const Options options_;
  const SizeClasses classes_;

  mutable internal::Mutex mu_;
  std::int64_t budget_bytes_ ABSL_GUARDED_BY(mu_);
  // Null without an arbiter; set once by SetArbiter before any handle.
  std::shared_ptr<internal::ArbiterMember> member_ ABSL_GUARDED_BY(mu_);
  // HoldRefill's ceiling for Fill and Replenish (kNoRefillHold: none).
  static constexpr std::int64_t kNoRefillHold = INT64_MAX;
  std::int64_t refill_hold_ ABSL_GUARDED_BY(mu_) = kNoRefillHold;
  // Idle handles by size, largest first (the order victims are taken in).
  // Sizes whose list is empty are erased.
  absl::btree_map<std::size_t, std::vector<PhysicalHandle>,
                  std::greater<std::size_t>>
      idle_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::size_t, Demand> demand_ ABSL_GUARDED_BY(mu_);
  // Bytes of creations in flight, already counted against the budget.
  std::int64_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  // Handed-out handles DestroyHandedOut failed to destroy: (handle, bytes),
  // still physical, never idle; DestroyIdle retries them.
  std::vector<std::pair<PhysicalHandle, std::size_t>> doomed_
      ABSL_GUARDED_BY(mu_);
  Counters counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vattn

#endif  // VATTN_SRC_PHYSICAL_POOL_H_
