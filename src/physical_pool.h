// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The physical layer of a KV cache: every handle the cache owns, idle ones
// pooled by size for reuse, and the budget that caps them all.
#ifndef VATTN_SRC_PHYSICAL_POOL_H_
#define VATTN_SRC_PHYSICAL_POOL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "src/internal/mutex.h"
#include "vattn/backend.h"

namespace vattn {

// Owns physical handles for one cache: hands them out (idle ones of the size
// asked for first, else newly created within the budget) and takes them back
// into the idle pool. Physical bytes (handed out plus idle plus creations in
// flight) never exceed the budget. Thread-safe; driver calls run without the
// pool's lock, so one thread creating handles does not block another taking
// an idle one. Never calls back into its users.
class PhysicalPool {
 public:
  struct Counters {
    std::int64_t physical_bytes = 0;  // Live handles (out plus idle).
    std::int64_t idle_bytes = 0;
    std::int64_t peak_physical_bytes = 0;
    std::int64_t create_calls = 0;
    std::int64_t destroy_calls = 0;
  };

  // budget_bytes: the cap; must be positive.
  PhysicalPool(std::shared_ptr<Backend> backend, std::int64_t budget_bytes);
  // Destroys every idle handle. Handles still handed out are the caller's
  // to Release first (they are mapped somewhere the pool cannot see).
  ~PhysicalPool();
  PhysicalPool(const PhysicalPool&) = delete;
  PhysicalPool& operator=(const PhysicalPool&) = delete;

  // Hands out `count` handles of `bytes` each: idle ones of that size first,
  // then new ones. To make room it destroys idle handles of other sizes.
  // ResourceExhausted when the budget (or the device) cannot hold them; then
  // nothing changed (idle handles are destroyed only when that makes
  // enough room). All-or-nothing. `quiet` skips formatting the message of a
  // budget refusal, for callers that try several sizes in turn.
  absl::StatusOr<std::vector<PhysicalHandle>> Acquire(std::size_t bytes,
                                                      int count,
                                                      bool quiet = false);
  // Takes handles of `bytes` back into the idle pool.
  void Release(std::vector<PhysicalHandle> handles, std::size_t bytes);
  // Creates idle handles of `bytes` until `count` of that size are idle
  // (within the budget). Returns how many it created.
  absl::StatusOr<int> Fill(std::size_t bytes, int count);
  // Destroys every idle handle.
  absl::Status DestroyIdle();

  int IdleCount(std::size_t bytes) const;
  // Bytes that can still be created under the budget.
  std::int64_t Headroom() const;
  std::int64_t budget_bytes() const { return budget_bytes_; }
  Counters counters() const;

 private:
  // Destroys one idle handle (any size other than `keep`, largest first);
  // false when there is none. Called with mu_ held; drops it around the
  // driver call.
  absl::StatusOr<bool> DestroyOneIdleLocked(std::size_t keep)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::int64_t HeadroomLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Creates up to `count` handles of `bytes`, dropping mu_ around the driver
  // calls (their bytes count against the budget meanwhile), appends them to
  // *created and counts them as physical. The first failure stops it.
  absl::Status CreateLocked(std::size_t bytes, int count,
                            std::vector<PhysicalHandle>* created)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves *handles into the idle pool and clears the vector.
  void ReleaseLocked(std::vector<PhysicalHandle>* handles, std::size_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const std::shared_ptr<Backend> backend_;
  const std::int64_t budget_bytes_;

  mutable internal::Mutex mu_;
  // Idle handles by size.
  absl::flat_hash_map<std::size_t, std::vector<PhysicalHandle>> idle_
      ABSL_GUARDED_BY(mu_);
  // Bytes of creations in flight, already counted against the budget.
  std::int64_t pending_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  Counters counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vattn

#endif  // VATTN_SRC_PHYSICAL_POOL_H_
