// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The arbiter's books (MemoryArbiter::Impl) and the two interfaces that
// connect it to a cache:
//   ArbiterMember  the pool's side: charge the shared budget before a
//                  Create, refund it after a Destroy (one per cache);
//   ArbiterClient  the cache's side, called by the arbiter: how old is the
//                  cache's least recently used idle memory, and destroy
//                  some of it.
//
// Budget rule. Each cache c has charged_c (its pool's live plus in-flight
// bytes) and floor_c. The books keep
//     sum over c of max(charged_c, floor_c) <= budget
// at every charge: a cache may charge b more bytes only if that still holds
// (so memory below another cache's floor is never handed out, and a cache
// below its floor can always grow to it), and physical bytes never exceed
// the budget, creations in flight included. SetBudget may shrink the
// budget below what is charged; then every charge is refused until enough
// is refunded.
//
// Global LRU. Every idle thing in every cache carries an idle sequence
// number from one process-wide counter (Placement::NextIdleSeq), so ages
// compare across caches. Pooled handles hold no data and count as the
// oldest (sequence 0). To make room the arbiter asks every eligible cache
// for its oldest sequence (IdleInfo), takes one unit (the pooled handles
// asked for, or one extent) from the oldest, and asks again.
//
// Lock order. A cache's lock, then its pool's lock, then the arbiter's
// lock (mu). The arbiter never calls a cache while it holds mu: it marks
// the cache's member in flight, drops mu, calls, and retakes mu. A cache
// calls the arbiter to reclaim from others (ReclaimFor) only without its
// own lock and its pool's lock (from KVCache::Impl::AcquireHandles, which
// the mapper calls with the cache lock dropped). So no thread holds a
// cache's lock while waiting for another cache's: two caches reclaiming
// from each other at once cannot deadlock. A cache being destroyed first
// closes its member (Close), which waits until no arbiter call into it is
// in flight, without holding any lock.
#ifndef VATTN_SRC_MEMORY_ARBITER_H_
#define VATTN_SRC_MEMORY_ARBITER_H_

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "src/internal/mutex.h"
#include "vattn/backend.h"
#include "vattn/memory_arbiter.h"

namespace vattn {
namespace internal {

// What the arbiter asks of an attached cache. Called without the arbiter's
// lock, from any thread; each call may take the cache's lock.
class ArbiterClient {
 public:
  virtual ~ArbiterClient() = default;
  struct Idle {
    // Idle sequence of the cache's least recently used idle memory: 0 when
    // it has pooled handles, else its oldest idle slot holding extents,
    // else kSurplusSeq for active slots' surplus, else kOutsideSeq for
    // memory held outside the slots (cached prefixes: the cache's
    // reclamation evicts those nobody uses last); kNoIdleSeq when nothing
    // is reclaimable.
    std::uint64_t oldest_seq = 0;
    // The same without pooled handles (what the cache's own reclamation
    // would take first).
    std::uint64_t oldest_extent_seq = 0;
    std::int64_t reclaimable_bytes = 0;  // All tensors.
    std::int64_t pooled_bytes = 0;
  };
  static constexpr std::uint64_t kSurplusSeq = ~std::uint64_t{0} - 2;
  static constexpr std::uint64_t kOutsideSeq = ~std::uint64_t{0} - 1;
  static constexpr std::uint64_t kNoIdleSeq = ~std::uint64_t{0};
  virtual Idle IdleInfo() = 0;
  // Destroys one unit of idle memory, up to `bytes`: pooled handles first
  // (largest first); if none, the least recently used idle extent (through
  // the cache's own reclamation, which also takes cached prefixes and
  // surplus). Never takes the cache's physical bytes below `keep_bytes`;
  // holds the cache's background refill at what is left (see
  // PhysicalPool::HoldRefill). Returns the bytes destroyed (0: nothing more
  // can go), or a backend error (the cache stays consistent).
  virtual absl::StatusOr<std::int64_t> GiveBack(std::int64_t bytes,
                                                std::int64_t keep_bytes) = 0;
};

// One cache's entry in the arbiter's books. The pool calls TryCharge /
// Refund / Room under its own lock (the arbiter's lock is taken after it,
// and is a leaf). Thread-safe.
class ArbiterMember {
 public:
  ArbiterMember(std::shared_ptr<MemoryArbiter::Impl> arbiter,
                std::uint64_t id)
      : arbiter_(std::move(arbiter)), id_(id) {}
  // Takes the cache's entry out of the books (its charges must have been
  // refunded: the pool is gone; what is left is dropped from the total).
  ~ArbiterMember();
  ArbiterMember(const ArbiterMember&) = delete;
  ArbiterMember& operator=(const ArbiterMember&) = delete;

  // Charges `bytes` to the shared budget if the budget rule allows it;
  // false (nothing charged, counted as refused) otherwise.
  bool TryCharge(std::int64_t bytes);
  void Refund(std::int64_t bytes);
  // The most bytes TryCharge would accept now (may be negative).
  std::int64_t Room() const;
  // The shared budget now.
  std::int64_t budget() const;

  // The cache's side.
  // Asks the arbiter for room for `bytes` more: destroys idle memory of
  // other caches, oldest first across caches (this one's included, in
  // order). Returns kFreedElsewhere when another cache gave memory back
  // (try again), kOwnOldest when this cache's own idle memory is the
  // oldest (reclaim it yourself), kNothing when no other cache can give.
  // Call without the cache's and the pool's locks.
  enum class Reclaimed { kFreedElsewhere, kOwnOldest, kNothing };
  // consider_self false: this cache's own age is not asked (it already
  // reclaimed what it could itself).
  Reclaimed ReclaimFor(std::int64_t bytes, bool consider_self = true);
  void SetCap(std::int64_t cap_bytes);
  // No more arbiter calls into the cache from now on; waits for those in
  // flight. Call without any lock.
  void Close();
  // Counts bytes the cache trimmed itself (KVCache::Trim/SetBudget).
  void NoteTrimmed(std::int64_t bytes);

  std::uint64_t id() const { return id_; }

 private:
  const std::shared_ptr<MemoryArbiter::Impl> arbiter_;
  const std::uint64_t id_;
};

struct ArbiterAccess {
  static const std::shared_ptr<MemoryArbiter::Impl>& Of(
      const MemoryArbiter& arbiter) {
    return arbiter.impl_;
  }
};

}  // namespace internal

// The books. Thread-safe; `mu` is a leaf lock (see the top of this file).
struct MemoryArbiter::Impl {
  struct Book {
    std::string name;
    internal::ArbiterClient* client = nullptr;  // Null once closed.
    int in_flight = 0;  // Arbiter calls into the client under way.
    std::int64_t floor = 0;
    std::int64_t cap = 0;
    std::int64_t charged = 0;
    std::int64_t peak = 0;
    std::int64_t reclaimed_from = 0;
    std::int64_t reclaimed_for = 0;
    std::int64_t trimmed = 0;
  };

  Impl(std::shared_ptr<Backend> b, std::int64_t budget_bytes)
      : backend(std::move(b)), budget(budget_bytes) {}

  // Registers a cache. InvalidArgument when its floor does not fit beside
  // the others' floors.
  absl::StatusOr<std::unique_ptr<internal::ArbiterMember>> Attach(
      const std::shared_ptr<Impl>& self, std::string name, std::int64_t floor,
      std::int64_t cap, internal::ArbiterClient* client);

  // Destroys idle memory, oldest first across the caches, until the caches
  // hold at most `goal` together (requester == 0) or until `requester` has
  // room for `want` bytes. Never takes a cache below its floor. For a
  // requester, stops with kOwnOldest when its own idle memory is the
  // oldest. *freed gets the bytes destroyed; the first backend error is
  // returned (after trying the other caches).
  absl::Status Reclaim(std::uint64_t requester, bool consider_self,
                       std::int64_t want, std::int64_t goal, bool trim,
                       internal::ArbiterMember::Reclaimed* outcome,
                       std::int64_t* freed) ABSL_LOCKS_EXCLUDED(mu);

  std::int64_t RoomLocked(const Book& b) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return budget - effective + std::max(b.charged, b.floor) - b.charged;
  }
  static std::int64_t Effective(const Book& b) {
    return std::max(b.charged, b.floor);
  }

  // Constant after construction.
  const std::shared_ptr<Backend> backend;

  mutable internal::Mutex mu;
  internal::CondVar calls_done;  // A call into a client ended.
  std::int64_t budget ABSL_GUARDED_BY(mu);
  std::map<std::uint64_t, Book> books ABSL_GUARDED_BY(mu);  // By id.
  std::uint64_t next_id ABSL_GUARDED_BY(mu) = 1;
  std::int64_t charged ABSL_GUARDED_BY(mu) = 0;    // Sum of charged.
  std::int64_t effective ABSL_GUARDED_BY(mu) = 0;  // Sum of max(charged, floor).
  std::int64_t floors ABSL_GUARDED_BY(mu) = 0;
  std::int64_t peak ABSL_GUARDED_BY(mu) = 0;
  std::int64_t cross_reclaims ABSL_GUARDED_BY(mu) = 0;
  std::int64_t cross_reclaimed ABSL_GUARDED_BY(mu) = 0;
  std::int64_t refused ABSL_GUARDED_BY(mu) = 0;
  std::int64_t trimmed ABSL_GUARDED_BY(mu) = 0;
  // SetBudget and Trim run one at a time (each is a loop of reclaims). A
  // top-level lock: taken first, held while calling caches (which never
  // take it).
  internal::Mutex resize_mu;
};

}  // namespace vattn

#endif  // VATTN_SRC_MEMORY_ARBITER_H_
