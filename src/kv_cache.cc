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
  VATTN_RETURN_IF_ERROR(background_error);
  const std::int64_t want =
      geo.BytesFor(std::max<std::int64_t>(1, expected_tokens));
  // What the extent covering the hint holds beyond it is waste for the
  // request's life, but the request usually decodes into it: waste up to
  // the hint's own size (or one decode extent) is accepted.
  const std::int64_t waste_limit = std::max(geo.max_extent(), want);
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
  s.Activate(expected_tokens, geo.BytesFor(expected_tokens));
  ++active_count;
  placement.OnSlotActive(best);
  placement.OnExtentsChanged(best, s.extents(), s.backing_extents());
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
    VATTN_RETURN_IF_ERROR(m.background_error);
    VATTN_RETURN_IF_ERROR(m.CheckActiveLocked(slot));
    ++m.stats.grow_calls;
    VATTN_RETURN_IF_ERROR(m.EnsureBackedLocked(slot, tokens, nullptr));
    Slot& s = m.At(slot);
    if (s.length() < tokens) s.set_length(tokens);
    s.mark_written();
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
  s.set_length(tokens);
  return absl::OkStatus();
}

absl::Status KVCache::Free(int slot, std::optional<Stream> fence) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  MutexLock lock(&m.mu);
  return m.FreeLocked(slot, fence);
}

absl::Status KVCache::Impl::FreeLocked(int slot, std::optional<Stream> fence) {
  VATTN_RETURN_IF_ERROR(CheckActiveLocked(slot));
  Slot& s = At(slot);
  if (fence.has_value()) {
    VATTN_ASSIGN_OR_RETURN(FenceId id, backend->RecordFence(*fence));
    if (id != kCompletedFence) s.fences().push_back(id);
  }
  s.Deactivate();
  --active_count;
  placement.OnSlotIdle(slot);
  placement.OnExtentsChanged(slot, s.extents(), s.backing_extents());
  if (opts.defer_reclaim) return absl::OkStatus();
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
  // Validate everything first: bad input changes nothing.
  for (const StepRequest& r : batch) {
    VATTN_RETURN_IF_ERROR(m.CheckSlot(r.slot));
    VATTN_RETURN_IF_ERROR(m.CheckTokens(r.tokens));
  }
  if (m.TryFastStep(batch)) return StepResult{};
  bool wake = false;
  absl::StatusOr<StepResult> result;
  {
    MutexLock lock(&m.mu);
    result = m.StepLocked(batch, &wake);
  }
  if (wake) m.worker.Wake();
  return result;
}

bool KVCache::Impl::TryFastStep(absl::Span<const StepRequest> batch) {
  if (has_background_error.load(std::memory_order_acquire)) return false;
  // Every slot active and backed? Otherwise the slow path reports or maps,
  // under the lock; nothing has changed yet.
  for (const StepRequest& r : batch) {
    const Slot& s = FastPathSlot(r.slot);
    if (!s.active() || s.backing_bytes() < geo.BytesFor(r.tokens)) return false;
  }
  bool urgent = false;
  for (const StepRequest& r : batch) {
    Slot& s = FastPathSlot(r.slot);
    if (s.length() < r.tokens) s.set_length(r.tokens);
    s.mark_written();
    MarkIfDue(r.slot, s);
    urgent = urgent || UrgentMapAhead(s);
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
  VATTN_RETURN_IF_ERROR(background_error);
  for (const StepRequest& r : batch) {
    VATTN_RETURN_IF_ERROR(CheckActiveLocked(r.slot));
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
    if (s.length() < r.tokens) s.set_length(r.tokens);
    s.mark_written();
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
    out = m.stats;
    out.mapped_bytes = 0;
    out.surplus_bytes = 0;
    out.logical_bytes = 0;
    out.active_slots = 0;
    out.idle_slots_with_memory = 0;
    for (const Slot& s : m.slots) {
      out.mapped_bytes += s.mapped_bytes() * regions;
      if (s.active()) {
        ++out.active_slots;
        out.logical_bytes += s.length() * m.geo.bytes_per_token();
        out.surplus_bytes += s.surplus_bytes() * regions;
      } else if (!s.extents().empty()) {
        ++out.idle_slots_with_memory;
      }
    }
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
  out.map_calls = m.mapper->map_calls();
  out.unmap_calls = m.mapper->unmap_calls();
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
  return m.background_error;
}

}  // namespace vattn
