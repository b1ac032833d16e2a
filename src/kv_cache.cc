// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The KV cache's public calls: each is a transition of the slots' state
// machine (kv_cache_impl.h describes the states and the locking;
// kv_cache_backing.cc how memory gets behind a slot).

#include <algorithm>
#include <chrono>
#include <optional>
#include <utility>
#include <vector>

#include "src/kv_cache_impl.h"

namespace vattn {

using internal::MutexLock;

namespace {

std::int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Finds a slot listed twice in one Step batch in O(batch): one stamp per
// slot, per thread (so concurrent Steps do not share it), a new epoch per
// batch instead of clearing.
class SeenSlots {
 public:
  static SeenSlots& Begin(int max_slots) {
    thread_local SeenSlots seen;
    if (seen.marks_.size() < static_cast<std::size_t>(max_slots)) {
      seen.marks_.resize(static_cast<std::size_t>(max_slots), 0);
    }
    if (++seen.epoch_ == 0) {  // Wrapped: old stamps could match again.
      std::fill(seen.marks_.begin(), seen.marks_.end(), 0);
      seen.epoch_ = 1;
    }
    return seen;
  }
  // Records that request `index` names `slot` (in range); returns the index
  // of an earlier request of this batch naming it too, or -1.
  std::int64_t Insert(int slot, std::size_t index) {
    std::uint64_t& mark = marks_[static_cast<std::size_t>(slot)];
    if ((mark >> 32) == epoch_) return static_cast<std::int64_t>(mark & 0xffffffffu);
    mark = (std::uint64_t{epoch_} << 32) | (index & 0xffffffffu);
    return -1;
  }

 private:
  std::vector<std::uint64_t> marks_;  // epoch << 32 | request index.
  std::uint32_t epoch_ = 0;
};

absl::Status InRequest(std::size_t index, const absl::Status& status) {
  return absl::Status(status.code(),
                      absl::StrFormat("Step request %d: %s", index,
                                      status.message()));
}

}  // namespace

KVCache::KVCache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

KVCache::~KVCache() {
  if (impl_) impl_->Shutdown();
}

absl::StatusOr<std::unique_ptr<KVCache>> KVCache::Create(
    const KVCacheOptions& options, std::shared_ptr<Backend> backend) {
  VATTN_RETURN_IF_ERROR(options.Validate());
  if (backend == nullptr) {
    return absl::InvalidArgumentError("KVCache::Create: backend is null");
  }
  const BackendCapabilities& caps = backend->capabilities();
  VATTN_ASSIGN_OR_RETURN(
      CacheGeometry geo,
      CacheGeometry::Make(options, static_cast<std::int64_t>(caps.granularity),
                          caps.max_reservation_bytes, caps.name.c_str()));
  auto impl = std::make_unique<Impl>(options, std::move(backend), geo);
  absl::Status status = impl->Init();
  if (!status.ok()) {
    impl->Shutdown();
    return status;
  }
  return std::unique_ptr<KVCache>(new KVCache(std::move(impl)));
}

absl::StatusOr<int> KVCache::AllocSlot(std::int64_t expected_tokens) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckTokens(expected_tokens));
  bool wake = false;
  absl::StatusOr<int> slot;
  {
    MutexLock lock(&m.mu);
    slot = m.AllocSlotLocked(expected_tokens, &wake);
  }
  if (wake) m.worker.Wake();
  return slot;
}

absl::StatusOr<int> KVCache::Impl::AllocSlotLocked(std::int64_t expected_tokens,
                                                   bool* wake) {
  const std::int64_t want =
      geo.BytesFor(std::max<std::int64_t>(1, expected_tokens));
  // What the extent covering the hint holds beyond it is waste for the
  // request's life (ReuseWasteLimit says how much is accepted). Memory is
  // short when the hint cannot be backed without taking memory back.
  const PhysicalPool::Counters held = pool->counters();
  // With an arbiter, the room left is the shared budget's (other caches
  // hold the rest of it).
  const std::int64_t room = arbiter_member != nullptr
                                ? pool->Headroom()
                                : budget - held.physical_bytes;
  const bool memory_short =
      room + held.idle_bytes < want * geo.num_regions();
  const std::int64_t waste_limit = ReuseWasteLimit(
      want, geo.max_extent(), geo.granularity(), memory_short);
  int best = -1;
  for (;;) {
    bool wait = false;
    best = placement.ChooseSlotFor(want, waste_limit, &wait);
    if (best >= 0) break;
    if (!wait) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("all %d slots are active", opts.max_slots));
    }
    state_cv.Wait(&mu);
  }
  Slot& s = At(best);
  if (s.holds_shared()) {
    // Read-only memory another request shares (prefix sharing): the new
    // request must not be handed it. The slot gives it all back first.
    VATTN_RETURN_IF_ERROR(ClearSharedLocked(best));
  }
  if (opts.zero_on_reuse && s.written() && s.mapped_bytes() > 0) {
    SetOpLocked(best, SlotOp::kZeroing);
    absl::Status status = WaitFencesLocked(s);
    const std::int64_t bytes = s.mapped_bytes();
    if (status.ok()) {
      mu.Unlock();
      status = mapper->Zero(best, 0, bytes);
      mu.Lock();
    }
    SetOpLocked(best, SlotOp::kNone);
    if (!status.ok()) return status;
    stats.zeroed_bytes += bytes * geo.num_regions();
  }
  if (s.mapped_bytes() > 0) ++stats.reuse_hits;
  // The request backs the extents the hint needs; the rest is surplus.
  active_tokens.fetch_sub(s.length(), std::memory_order_relaxed);
  s.Activate(expected_tokens, geo.BytesFor(expected_tokens));
  ++active_count;
  placement.OnSlotActive(best);
  BooksChangedLocked(best);
  PruneFencesLocked(s);
  if (NeedsMapAhead(s)) {
    MarkIfDue(best, s);
    NoteWorkLocked(wake);
  }
  return best;
}

absl::Status KVCache::Grow(int slot, std::int64_t tokens) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  VATTN_RETURN_IF_ERROR(m.CheckTokens(tokens));
  bool wake = false;
  {
    MutexLock lock(&m.mu);
    VATTN_RETURN_IF_ERROR(m.CheckActiveLocked(slot));
    ++m.stats.grow_calls;
    VATTN_RETURN_IF_ERROR(m.EnsureBackedLocked(slot, tokens, nullptr));
    Slot& s = m.At(slot);
    if (s.length() < tokens) m.SetLengthLocked(s, tokens);
    if (m.NeedsMapAhead(s)) {
      m.MarkIfDue(slot, s);
      m.NoteWorkLocked(&wake);
    }
  }
  if (wake) m.worker.Wake();
  return absl::OkStatus();
}

absl::Status KVCache::Shrink(int slot, std::int64_t tokens) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  MutexLock lock(&m.mu);
  VATTN_RETURN_IF_ERROR(m.CheckActiveLocked(slot));
  Slot& s = m.At(slot);
  if (tokens < 0 || tokens > s.length()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "Shrink(slot %d, %d): tokens must be in [0, length %d]", slot, tokens,
        s.length()));
  }
  m.SetLengthLocked(s, tokens);
  return absl::OkStatus();
}

absl::Status KVCache::Free(int slot) { return Free(slot, Stream{}); }

absl::Status KVCache::Free(int slot, Stream fence) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  MutexLock lock(&m.mu);
  return m.FreeLocked(slot, fence);
}

absl::Status KVCache::Free(int slot, NoFence) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  MutexLock lock(&m.mu);
  return m.FreeLocked(slot, std::nullopt);
}

absl::Status KVCache::Free(int slot, std::optional<Stream> fence) {
  return Free(slot, fence.value_or(Stream{}));
}

absl::Status KVCache::Impl::FreeLocked(int slot, std::optional<Stream> fence) {
  VATTN_RETURN_IF_ERROR(CheckActiveLocked(slot));
  Slot& s = At(slot);
  // Memory exported to or imported from another process (ExportSlot,
  // ImportSlot) must never back another request here: the slot lets go of
  // it at once, without dropping the lock between its request's end and the
  // unmap (so no AllocSlot can take the slot in between).
  const bool handoff =
      std::any_of(s.extents().begin(), s.extents().end(), [](const Extent& x) {
        return x.origin == ExtentOrigin::kExported ||
               x.origin == ExtentOrigin::kImported;
      });
  if (handoff) {
    WaitNotBusyLocked(slot);
    VATTN_RETURN_IF_ERROR(CheckActiveLocked(slot));  // Freed meanwhile.
  }
  if (fence.has_value()) {
    VATTN_ASSIGN_OR_RETURN(FenceId id, backend->RecordFence(*fence));
    if (id != kCompletedFence) s.fences().push_back(id);
  }
  active_tokens.fetch_sub(s.length(), std::memory_order_relaxed);
  s.Deactivate();
  --active_count;
  PrefixSlotFreedLocked(slot);
  placement.OnSlotIdle(slot);
  BooksChangedLocked(slot);
  if (opts.defer_reclaim && !handoff) return absl::OkStatus();
  WaitNotBusyLocked(slot);
  if (s.active()) return absl::OkStatus();  // Reused meanwhile.
  SetOpLocked(slot, SlotOp::kUnmapping);
  absl::Status status = WaitFencesLocked(s);
  if (status.ok()) status = mapper->UnmapAllLocked(mu, slot, s);
  SetOpLocked(slot, SlotOp::kNone);
  return status;
}

absl::StatusOr<StepResult> KVCache::Step(absl::Span<const StepRequest> batch) {
  Impl& m = *impl_;
  // The fast path checks its input itself (ranges, a slot listed twice,
  // tokens below a length) and leaves anything doubtful, untouched, to the
  // slow path, which validates everything before it changes anything.
  if (m.TryFastStep(batch)) return StepResult{};
  VATTN_RETURN_IF_ERROR(m.CheckBatch(batch));
  bool wake = false;
  absl::StatusOr<StepResult> result;
  {
    MutexLock lock(&m.mu);
    result = m.StepLocked(batch, &wake);
  }
  if (wake) m.worker.Wake();
  return result;
}

absl::Status KVCache::Impl::CheckBatch(
    absl::Span<const StepRequest> batch) const {
  SeenSlots& seen = SeenSlots::Begin(opts.max_slots);
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const StepRequest& r = batch[i];
    if (absl::Status s = CheckSlot(r.slot); !s.ok()) return InRequest(i, s);
    if (absl::Status s = CheckTokens(r.tokens); !s.ok()) return InRequest(i, s);
    if (const std::int64_t earlier = seen.Insert(r.slot, i); earlier >= 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "Step request %d: slot %d is also request %d (a slot may appear "
          "once per step)",
          i, r.slot, earlier));
    }
  }
  return absl::OkStatus();
}

bool KVCache::Impl::TryFastStep(absl::Span<const StepRequest> batch) {
  // Byte counts here compare against tokens * token_bytes without BytesFor's
  // rounding: a slot's backing bytes are a whole number of granules (and
  // at most its stride), so they cover BytesFor(t) exactly when they cover
  // t * token_bytes. One multiply per comparison.
  const std::int64_t token_bytes = geo.token_bytes();
  const auto max_slots = static_cast<std::uint64_t>(opts.max_slots);
  const auto max_tokens = static_cast<std::uint64_t>(opts.max_tokens);
  // A request out of range, a slot listed twice, tokens below a slot's
  // length: the slow path reports it. A slot not active or not backed: the
  // slow path reports or maps, under the lock. Nothing has changed yet.
  SeenSlots* seen =
      batch.size() > 1 ? &SeenSlots::Begin(opts.max_slots) : nullptr;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const StepRequest& r = batch[i];
    if (static_cast<std::uint64_t>(r.slot) >= max_slots ||
        static_cast<std::uint64_t>(r.tokens) > max_tokens) {
      return false;
    }
    const Slot& s = FastPathSlot(r.slot);
    if (!s.active() || s.backing_bytes() < r.tokens * token_bytes ||
        r.tokens < s.length()) {
      return false;
    }
    if (seen != nullptr && seen->Insert(r.slot, i) >= 0) return false;
  }
  std::int64_t added_tokens = 0;
  bool urgent = false;
  for (const StepRequest& r : batch) {
    Slot& s = FastPathSlot(r.slot);
    std::int64_t front = s.length();
    if (front < r.tokens) {
      added_tokens += r.tokens - front;
      s.set_length(r.tokens);
      front = r.tokens;
    }
    if (!look_ahead) continue;
    // NeedsMapAhead and UrgentMapAhead, on the values already loaded.
    front = std::max(front, s.hint());
    const std::int64_t backing = s.backing_bytes();
    const auto wanted = [&](std::int64_t ahead) {
      return std::min(opts.max_tokens, front + ahead) * token_bytes;
    };
    if (backing >= wanted(opts.map_ahead_tokens)) continue;
    worker.MarkDue(r.slot);
    urgent = urgent || backing < wanted(urgent_tokens);
  }
  if (added_tokens != 0) {
    active_tokens.fetch_add(added_tokens, std::memory_order_relaxed);
  }
  step_calls.fetch_add(1, std::memory_order_relaxed);
  if (urgent) {
    worker.NoteWork();
    worker.Wake();
  }
  return true;
}

absl::StatusOr<StepResult> KVCache::Impl::StepLocked(
    absl::Span<const StepRequest> batch, bool* wake) {
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const StepRequest& r = batch[i];
    if (absl::Status s = CheckActiveLocked(r.slot); !s.ok()) {
      return InRequest(i, s);
    }
    const std::int64_t length = At(r.slot).length();
    if (r.tokens < length) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "Step request %d: tokens %d are below slot %d's length %d (Shrink "
          "lowers a length)",
          i, r.tokens, r.slot, length));
    }
  }
  step_calls.fetch_add(1, std::memory_order_relaxed);
  StepResult result;
  absl::Status status;
  bool more_work = false;
  for (const StepRequest& r : batch) {
    Slot& s = At(r.slot);
    if (s.backing_bytes() < geo.BytesFor(r.tokens)) {
      // The background thread is behind (or off): map on this thread.
      const std::int64_t start = NowNanos();
      bool mapped_here = false;
      status = EnsureBackedLocked(r.slot, r.tokens, &mapped_here);
      const std::int64_t spent = NowNanos() - start;
      result.map_nanos += spent;
      stats.step_map_nanos += spent;
      if (mapped_here) {
        ++result.misses;
        ++stats.step_misses;
      }
      if (!status.ok()) break;
    }
    if (s.length() < r.tokens) SetLengthLocked(s, r.tokens);
    MarkIfDue(r.slot, s);
    more_work = more_work || NeedsMapAhead(s);
  }
  // Misses took handles from the pool: let the thread refill it too.
  if (worker.running() && (more_work || result.misses > 0)) {
    NoteWorkLocked(wake);
  }
  if (!status.ok()) return status;
  return result;
}

TensorView KVCache::K(int layer) const {
  return impl_->geo.View(impl_->base, layer, /*v=*/false);
}

TensorView KVCache::V(int layer) const {
  return impl_->geo.View(impl_->base, layer, /*v=*/true);
}

CacheStats KVCache::Stats() const {
  const Impl& m = *impl_;
  const int regions = m.geo.num_regions();
  CacheStats out;
  PhysicalPool::Counters pool;
  {
    MutexLock lock(&m.mu);
    // Totals kept as the slots change: no slot is read here.
    out = m.stats;
    out.mapped_bytes = m.totals.mapped * regions;
    out.surplus_bytes = m.totals.surplus * regions;
    out.quarantined_extents = m.totals.quarantined;
    out.quarantined_bytes = m.totals.quarantined_bytes * regions;
    out.exported_bytes = m.totals.exported * regions;
    out.imported_bytes = m.totals.imported * regions;
    out.active_slots = m.active_count;
    out.idle_slots_with_memory = m.totals.idle_with_memory;
    out.logical_bytes = m.active_tokens.load(std::memory_order_relaxed) *
                        m.geo.bytes_per_token();
    const SharedLedger& ledger = m.mapper->ledger();
    out.shared_bytes = ledger.shared_bytes() * regions;
    out.shared_saved_bytes = ledger.saved_bytes() * regions;
    out.cached_prefixes = static_cast<std::int64_t>(m.prefixes.size());
    out.cached_prefix_bytes =
        (ledger.kept_bytes() + m.prefixes.tail_bytes()) * regions;
    // Under the cache lock, so a handle moving between a slot and the pool
    // (which happens in two steps, the slot's side under this lock) is
    // never counted on both sides.
    pool = m.pool->counters();
  }
  out.physical_bytes = pool.physical_bytes;
  out.pooled_bytes = pool.idle_bytes;
  out.peak_physical_bytes = pool.peak_physical_bytes;
  out.create_calls = pool.create_calls;
  out.destroy_calls = pool.destroy_calls;
  out.step_calls = m.step_calls.load(std::memory_order_relaxed);
  const MapAheadCounters worker = m.worker.counters();
  out.background_wakeups = worker.wakeups;
  out.background_deadline_wakeups = worker.deadline_wakeups;
  out.background_caller_wakeups = worker.woken_by_callers;
  out.map_calls = m.mapper->map_calls();
  out.unmap_calls = m.mapper->unmap_calls();
  out.copy_calls = m.mapper->copy_calls();
  out.set_access_calls = m.mapper->set_access_calls();
  return out;
}

absl::StatusOr<SlotInfo> KVCache::GetSlot(int slot) const {
  const Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  MutexLock lock(&m.mu);
  const Slot& s = m.slots[static_cast<std::size_t>(slot)];
  SlotInfo info;
  info.active = s.active();
  info.length = s.length();
  info.backed_tokens = m.geo.BackedTokens(s.backing_bytes());
  info.mapped_bytes = s.mapped_bytes() * m.geo.num_regions();
  info.adopted_bytes = s.backing_bytes() * m.geo.num_regions();
  info.extents = static_cast<int>(s.extents().size());
  return info;
}

const KVCacheOptions& KVCache::options() const { return impl_->opts; }

const std::shared_ptr<Backend>& KVCache::backend() const {
  return impl_->backend;
}

std::int64_t KVCache::bytes_per_token() const {
  return impl_->geo.bytes_per_token();
}

absl::Status KVCache::WaitForBackgroundIdle() {
  Impl& m = *impl_;
  if (m.worker.running()) m.worker.WaitIdle();
  MutexLock lock(&m.mu);
  absl::Status last = std::move(m.last_background_error);
  m.last_background_error = absl::OkStatus();
  return last;
}

}  // namespace vattn
