// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The cache's side of elastic memory: its run-time budget (SetBudget), Trim,
// and its part in a MemoryArbiter's shared budget (src/memory_arbiter.h):
// attaching, telling the arbiter how old its idle memory is, giving idle
// memory back for other caches, and asking for memory of other caches when
// its own Grow finds the shared budget full. Every destroy goes through the
// cache's own reclamation (ReclaimOne: quarantines first, then idle slots
// least recently used first, then surplus; cached prefixes too, where that
// path takes them) and the pool.

#include <algorithm>
#include <limits>
#include <utility>

#include "src/kv_cache_impl.h"

namespace vattn {

using internal::ArbiterClient;
using internal::ArbiterMember;
using internal::MutexLock;

namespace {

constexpr std::int64_t kMaxBytes = std::int64_t{1} << 60;
// The pool's own budget when only the arbiter's limits the cache.
constexpr std::int64_t kNoCap = std::numeric_limits<std::int64_t>::max() / 4;

std::int64_t Held(const PhysicalPool& pool) {
  return pool.counters().physical_bytes;
}

}  // namespace

// The arbiter's view of one cache: forwards to the cache's Impl.
class KVCache::Impl::ArbiterClientAdaptor final : public ArbiterClient {
 public:
  explicit ArbiterClientAdaptor(KVCache::Impl* cache) : cache_(cache) {}
  Idle IdleInfo() override { return cache_->ArbiterIdleInfo(); }
  absl::StatusOr<std::int64_t> GiveBack(std::int64_t bytes,
                                        std::int64_t keep_bytes) override {
    return cache_->GiveBackIdle(bytes, keep_bytes);
  }

 private:
  KVCache::Impl* const cache_;
};

absl::Status KVCache::Impl::AttachArbiter() {
  if (opts.arbiter == nullptr) return absl::OkStatus();
  const std::shared_ptr<MemoryArbiter::Impl>& arbiter =
      internal::ArbiterAccess::Of(*opts.arbiter);
  if (arbiter->backend.get() != backend.get()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.arbiter shares a budget on backend %s, not on this "
        "cache's backend %s (pass the arbiter's backend object)",
        arbiter->backend->capabilities().name,
        backend->capabilities().name));
  }
  const std::int64_t one_extent = geo.granularity() * geo.num_regions();
  const auto cap = static_cast<std::int64_t>(opts.arbiter_cap_bytes);
  if (cap != 0 && cap < one_extent) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.arbiter_cap_bytes (%d) cannot hold one extent of "
        "every tensor (%d bytes)",
        cap, one_extent));
  }
  arbiter_client = std::make_unique<ArbiterClientAdaptor>(this);
  VATTN_ASSIGN_OR_RETURN(
      std::unique_ptr<ArbiterMember> member,
      arbiter->Attach(arbiter, opts.arbiter_name,
                      static_cast<std::int64_t>(opts.arbiter_floor_bytes), cap,
                      arbiter_client.get()));
  arbiter_member = std::move(member);
  pool->SetArbiter(arbiter_member);
  pool->SetBudget(cap != 0 ? cap : kNoCap);
  budget = cap != 0 ? cap : arbiter_member->budget();
  return absl::OkStatus();
}

void KVCache::Impl::DetachArbiter() {
  if (arbiter_member != nullptr) arbiter_member->Close();
}

absl::StatusOr<std::int64_t> KVCache::Impl::ReclaimForGrow(std::int64_t need) {
  if (arbiter_member == nullptr) return ReclaimOne(need);
  // The cap binds: only this cache's own memory can make room.
  const std::int64_t bytes = need * geo.num_regions();
  if (pool->OwnHeadroom() < bytes) return ReclaimOne(need);
  switch (arbiter_member->ReclaimFor(bytes)) {
    case ArbiterMember::Reclaimed::kFreedElsewhere:
      return kFreedElsewhere;
    case ArbiterMember::Reclaimed::kNothing:
      return ReclaimOne(need);
    case ArbiterMember::Reclaimed::kOwnOldest:
      break;
  }
  VATTN_ASSIGN_OR_RETURN(std::int64_t reclaimed, ReclaimOne(need));
  if (reclaimed != 0) return reclaimed;
  // Nothing left here after all: other caches' newer idle memory.
  if (arbiter_member->ReclaimFor(bytes, /*consider_self=*/false) ==
      ArbiterMember::Reclaimed::kFreedElsewhere) {
    return kFreedElsewhere;
  }
  return 0;
}

internal::ArbiterClient::Idle KVCache::Impl::ArbiterIdleInfo() {
  const int regions = geo.num_regions();
  MutexLock lock(&mu);
  // Under mu, as Stats(): a handle between a slot and the pool is counted
  // once.
  const PhysicalPool::Counters held = pool->counters();
  ArbiterClient::Idle idle;
  idle.pooled_bytes = held.idle_bytes;
  // Memory neither pooled nor in a slot's books (nor quarantined): cached
  // prefixes' extents and tails (and exported extents). The cache's
  // reclamation evicts the prefixes no request uses once no idle slot
  // holds memory; if none can go, GiveBack finds nothing and the arbiter
  // moves on. Not counted as reclaimable: some of it may be in use.
  const std::int64_t outside =
      std::max<std::int64_t>(0, held.physical_bytes - held.idle_bytes -
                                    (totals.mapped + totals.quarantined_bytes) *
                                        regions);
  idle.reclaimable_bytes =
      (placement.idle_bytes() + placement.surplus_bytes()) * regions +
      held.idle_bytes;
  const std::uint64_t oldest = placement.OldestIdleSeq();
  idle.oldest_extent_seq =
      oldest != ArbiterClient::kNoIdleSeq ? oldest
      : placement.surplus_bytes() > 0    ? ArbiterClient::kSurplusSeq
      : outside > 0                      ? ArbiterClient::kOutsideSeq
                                         : ArbiterClient::kNoIdleSeq;
  idle.oldest_seq = held.idle_bytes > 0 ? 0 : idle.oldest_extent_seq;
  return idle;
}

absl::StatusOr<std::int64_t> KVCache::Impl::GiveBackIdle(
    std::int64_t bytes, std::int64_t keep_bytes) {
  // At (or within a granule of) the floor: nothing may go.
  if (Held(*pool) - keep_bytes < geo.granularity()) return 0;
  VATTN_ASSIGN_OR_RETURN(std::int64_t freed,
                         pool->DestroyIdleBytes(bytes, keep_bytes));
  // Nothing pooled could go (none, or only handles the floor keeps): the
  // least recently used idle extent goes to the pool (the cache's own
  // reclamation), then is destroyed if the floor allows. An extent another
  // holder still shares (a cached prefix's) frees nothing when unmapped
  // from the slot, and one too large for the floor stays pooled: then the
  // next one goes, a few times at most (what went to the pool stays the
  // cache's, reusable without a create).
  constexpr int kMaxFruitlessReclaims = 8;
  for (int tries = 0; freed == 0 && tries < kMaxFruitlessReclaims; ++tries) {
    VATTN_ASSIGN_OR_RETURN(std::int64_t reclaimed, ReclaimOne());
    if (reclaimed == 0) return 0;
    VATTN_ASSIGN_OR_RETURN(freed, pool->DestroyIdleBytes(bytes, keep_bytes));
  }
  // What was given back is not re-created by the refill behind the
  // arbiter's back.
  if (freed > 0) pool->HoldRefill();
  return freed;
}

absl::Status KVCache::Impl::TrimTo(std::int64_t target, std::int64_t keep_bytes,
                                   std::int64_t* destroyed) {
  *destroyed = 0;
  absl::Status status;
  // Exact first: destroy only what keeps the cache at or above the target,
  // taking idle extents into the pool one at a time (least recently used
  // first) when the pool holds nothing that fits the gap.
  const std::int64_t floor = std::max(target, keep_bytes);
  for (;;) {
    const std::int64_t over = Held(*pool) - target;
    if (over <= 0) break;
    absl::StatusOr<std::int64_t> freed = pool->DestroyIdleBytes(over, floor);
    if (!freed.ok()) {
      status = freed.status();
      break;
    }
    *destroyed += *freed;
    if (Held(*pool) <= target) break;
    // The pool already holds enough, in handles larger than the gap: no
    // more unmapping for exactness's sake.
    if (pool->counters().idle_bytes >= Held(*pool) - target) break;
    absl::StatusOr<std::int64_t> reclaimed = ReclaimOne();
    if (!reclaimed.ok()) {
      status = reclaimed.status();
      break;
    }
    if (*reclaimed == 0) break;  // Nothing idle is left in any slot.
  }
  // Still above: pooled handles larger than the gap go too (landing below
  // the target by less than one of them).
  if (status.ok() && Held(*pool) > target) {
    absl::StatusOr<std::int64_t> freed =
        pool->DestroyIdleBytes(Held(*pool) - target, keep_bytes);
    if (freed.ok()) {
      *destroyed += *freed;
    } else {
      status = freed.status();
    }
  }
  pool->HoldRefill();
  if (arbiter_member != nullptr && *destroyed > 0) {
    arbiter_member->NoteTrimmed(*destroyed);
  }
  return status;
}

absl::Status KVCache::SetBudget(std::size_t bytes) {
  Impl& m = *impl_;
  const std::int64_t one_extent = m.geo.granularity() * m.geo.num_regions();
  if (bytes > static_cast<std::size_t>(kMaxBytes) ||
      static_cast<std::int64_t>(bytes) < one_extent) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCache::SetBudget: bytes (%d) must be in [%d (one extent of every "
        "tensor), 2^60]",
        bytes, one_extent));
  }
  const auto budget = static_cast<std::int64_t>(bytes);
  if (m.arbiter_member != nullptr &&
      budget < static_cast<std::int64_t>(m.opts.arbiter_floor_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCache::SetBudget: bytes (%d) are below the cache's "
        "arbiter_floor_bytes (%d)",
        bytes, m.opts.arbiter_floor_bytes));
  }
  {
    MutexLock lock(&m.mu);
    m.pool->SetBudget(budget);
    m.budget = budget;
    m.stats.budget_bytes = budget;
  }
  if (m.arbiter_member != nullptr) m.arbiter_member->SetCap(budget);
  if (Held(*m.pool) <= budget) return absl::OkStatus();
  std::int64_t destroyed = 0;
  VATTN_RETURN_IF_ERROR(m.TrimTo(budget, 0, &destroyed));
  const std::int64_t held = Held(*m.pool);
  if (held <= budget) return absl::OkStatus();
  const ArbiterClient::Idle idle = m.ArbiterIdleInfo();
  return absl::ResourceExhaustedError(absl::StrFormat(
      "KVCache::SetBudget(%d): the cache still holds %d bytes after %d idle "
      "bytes were destroyed (%d still reclaimable, the rest active); the new "
      "budget stands and growth is refused until %d bytes are freed",
      bytes, held, destroyed, std::min(idle.reclaimable_bytes, held),
      held - budget));
}

absl::StatusOr<std::size_t> KVCache::Trim(std::size_t target_bytes) {
  Impl& m = *impl_;
  const std::int64_t target = static_cast<std::int64_t>(
      std::min<std::size_t>(target_bytes, static_cast<std::size_t>(kMaxBytes)));
  std::int64_t destroyed = 0;
  VATTN_RETURN_IF_ERROR(m.TrimTo(target, 0, &destroyed));
  return static_cast<std::size_t>(destroyed);
}

}  // namespace vattn
