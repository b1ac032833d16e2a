// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Prefix sharing (issue 13): KeepPrefix, AllocSlotWithPrefix, DropPrefix and
// Fork, and the cache's side of shared extents (docs/DESIGN.md, "Prefix
// sharing"). The books are PrefixCache (prefix_cache.h) and the shared
// records' ledger (shared_extent.h); mapping goes through ExtentMapper; the
// locking is the cache's (kv_cache_impl.h): one lock, driver calls with it
// dropped while the slots involved are marked busy.

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "src/kv_cache_impl.h"

namespace vattn {

using internal::MutexLock;

namespace {

absl::Status CheckPrefixTokens(std::int64_t tokens, std::int64_t max_tokens) {
  if (tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokens must be >= 1, got %d", tokens));
  }
  if (tokens > max_tokens) {
    return absl::OutOfRangeError(absl::StrFormat(
        "%d tokens exceed max_tokens %d", tokens, max_tokens));
  }
  return absl::OkStatus();
}

absl::Status CheckSplit(std::int64_t split, std::int64_t max_tokens) {
  if (split < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("split_at_tokens must be >= 0, got %d", split));
  }
  if (split > max_tokens) {
    return absl::OutOfRangeError(absl::StrFormat(
        "split_at_tokens %d exceeds max_tokens %d", split, max_tokens));
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------
// Public calls.

absl::StatusOr<int> KVCache::AllocSlot(std::int64_t expected_tokens,
                                       std::int64_t split_at_tokens) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(CheckSplit(split_at_tokens, m.opts.max_tokens));
  VATTN_RETURN_IF_ERROR(m.CheckTokens(expected_tokens));
  bool wake = false;
  absl::StatusOr<int> slot;
  {
    MutexLock lock(&m.mu);
    slot = m.AllocSlotLocked(expected_tokens, &wake);
    if (slot.ok()) {
      // Rounded down: the extent below the boundary holds only prefix
      // tokens, the partly filled granule goes with the tail.
      m.At(*slot).set_split_bytes(
          (split_at_tokens * m.geo.token_bytes()) & ~(m.geo.granularity() - 1));
    }
  }
  if (wake) m.worker.Wake();
  return slot;
}

absl::Status KVCache::Grow(int slot, std::int64_t tokens,
                           std::int64_t split_at_tokens) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  VATTN_RETURN_IF_ERROR(CheckSplit(split_at_tokens, m.opts.max_tokens));
  {
    MutexLock lock(&m.mu);
    VATTN_RETURN_IF_ERROR(m.CheckActiveLocked(slot));
    m.At(slot).set_split_bytes(
        (split_at_tokens * m.geo.token_bytes()) & ~(m.geo.granularity() - 1));
  }
  return Grow(slot, tokens);
}

absl::Status KVCache::KeepPrefix(int slot, std::int64_t tokens,
                                 std::uint64_t prefix_id) {
  return KeepPrefix(slot, tokens, prefix_id, Stream{});
}

absl::Status KVCache::KeepPrefix(int slot, std::int64_t tokens,
                                 std::uint64_t prefix_id, Stream stream) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  VATTN_RETURN_IF_ERROR(CheckPrefixTokens(tokens, m.opts.max_tokens));
  MutexLock lock(&m.mu);
  return m.KeepPrefixLocked(slot, tokens, prefix_id, stream);
}

absl::StatusOr<int> KVCache::AllocSlotWithPrefix(std::uint64_t prefix_id,
                                                 std::int64_t tokens,
                                                 std::int64_t expected_tokens) {
  return AllocSlotWithPrefix(prefix_id, tokens, expected_tokens, Stream{});
}

absl::StatusOr<int> KVCache::AllocSlotWithPrefix(std::uint64_t prefix_id,
                                                 std::int64_t tokens,
                                                 std::int64_t expected_tokens,
                                                 Stream stream) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(CheckPrefixTokens(tokens, m.opts.max_tokens));
  VATTN_RETURN_IF_ERROR(m.CheckTokens(expected_tokens));
  bool wake = false;
  absl::StatusOr<int> slot;
  {
    MutexLock lock(&m.mu);
    slot = m.AllocWithPrefixLocked(prefix_id, tokens, expected_tokens, stream,
                                   &wake);
  }
  if (wake) m.worker.Wake();
  return slot;
}

absl::Status KVCache::DropPrefix(std::uint64_t prefix_id) {
  Impl& m = *impl_;
  MutexLock lock(&m.mu);
  return m.DropPrefixLocked(prefix_id);
}

absl::StatusOr<int> KVCache::Fork(int slot) { return Fork(slot, Stream{}); }

absl::StatusOr<int> KVCache::Fork(int slot, Stream stream) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  bool wake = false;
  absl::StatusOr<int> child;
  {
    MutexLock lock(&m.mu);
    child = m.ForkLocked(slot, stream, &wake);
  }
  if (wake) m.worker.Wake();
  return child;
}

absl::StatusOr<PrefixInfo> KVCache::GetPrefix(std::uint64_t prefix_id) const {
  const Impl& m = *impl_;
  MutexLock lock(&m.mu);
  const CachedPrefix* p = m.prefixes.Find(prefix_id);
  if (p == nullptr) {
    return absl::NotFoundError(absl::StrFormat(
        "prefix %d is not cached (never kept, dropped or evicted)", prefix_id));
  }
  PrefixInfo info;
  info.tokens = p->tokens;
  const int regions = m.geo.num_regions();
  for (const auto& e : p->whole) info.bytes += e->bytes * regions;
  info.tail_bytes = p->tail.bytes * regions;
  info.bytes += info.tail_bytes;
  info.whole_extents = static_cast<int>(p->whole.size());
  info.users = p->users;
  info.hits = p->hits;
  return info;
}

// ---------------------------------------------------------------------------
// Helpers.

namespace {

// Unmaps the slot's last surplus extent (mapped past what its request
// backs: memory an earlier request left) so that a call that holds the slot
// busy, and so keeps reclamation off it, can still use that memory. True
// when one was given back to the pool. The caller holds the lock and has
// marked the slot busy. (A template only because KVCache::Impl cannot be
// named here.)
template <typename CacheImpl>
bool ReclaimOwnSurplusLocked(CacheImpl& m, int slot)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  Slot& s = m.At(slot);
  if (!s.has_surplus()) return false;
  absl::StatusOr<std::int64_t> bytes =
      m.mapper->UnmapLastLocked(m.mu, slot, s);
  if (!bytes.ok()) return false;
  m.stats.reclaimed_bytes += *bytes * m.geo.num_regions();
  ++m.stats.reclaimed_extents;
  return true;
}

// Gives the slot's extent write access back in every region after a failed
// share, trying twice: a call that failed for want of memory (no fault) or
// one fault must leave the owner writable; the second try is the one the
// first failure did not get. SetAccess of a region already writable changes
// nothing, so the retry repeats no harm. Lock not held.
template <typename Mapper>
absl::Status GiveWriteBack(Mapper& mapper, int slot, const Extent& extent,
                           int regions) {
  absl::Status back =
      mapper.SetAccessRegions(slot, extent, regions, MapAccess::kReadWrite);
  if (!back.ok()) {
    back = mapper.SetAccessRegions(slot, extent, regions, MapAccess::kReadWrite);
  }
  return back;
}

}  // namespace

absl::Status KVCache::Impl::EnsureHomesLocked() {
  if (home_base != 0) return absl::OkStatus();
  if (opts.max_prefixes == 0) {
    return absl::ResourceExhaustedError(
        "KVCacheOptions.max_prefixes is 0: prefix sharing is off");
  }
  const std::size_t bytes = static_cast<std::size_t>(opts.max_prefixes) *
                            static_cast<std::size_t>(geo.num_regions()) *
                            static_cast<std::size_t>(geo.region_stride());
  // Reserving address space is microseconds and takes no lock of ours
  // worth dropping; it happens once per cache.
  absl::StatusOr<DevicePtr> va = backend->Reserve(bytes);
  if (!va.ok()) {
    return absl::Status(
        va.status().code(),
        absl::StrFormat("reserving %d bytes of address space for %d prefix "
                        "homes (KVCacheOptions.max_prefixes): %s",
                        bytes, opts.max_prefixes, va.status().message()));
  }
  home_base = *va;
  home_bytes = bytes;
  mapper->SetHomes(opts.max_slots, home_base, opts.max_prefixes);
  return absl::OkStatus();
}

absl::Status KVCache::Impl::ClearSharedLocked(int slot) {
  Slot& s = At(slot);
  SetOpLocked(slot, SlotOp::kUnmapping);
  absl::Status status = WaitFencesLocked(s);
  if (status.ok()) status = mapper->UnmapAllLocked(mu, slot, s);
  SetOpLocked(slot, SlotOp::kNone);
  return status;
}

void KVCache::Impl::PrefixSlotFreedLocked(int slot) {
  std::optional<std::uint64_t>& user = prefixes.UserOf(slot);
  if (!user.has_value()) return;
  if (CachedPrefix* p = prefixes.Find(*user); p != nullptr) --p->users;
  user.reset();
}

absl::StatusOr<int> KVCache::Impl::TakeEmptySlotLocked() {
  int best = -1;
  for (;;) {
    bool wait = false;
    // Want nothing: a slot holding nothing wastes nothing and needs no
    // unmap; else the one placement finds cheapest to empty.
    best = placement.ChooseSlotFor(0, 0, &wait);
    if (best >= 0) break;
    if (!wait) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("all %d slots are active", opts.max_slots));
    }
    state_cv.Wait(&mu);
  }
  Slot& s = At(best);
  SetOpLocked(best, SlotOp::kUnmapping);
  absl::Status status;
  if (!s.extents().empty() || !s.quarantine().empty()) {
    // Its memory starts at offset 0, where the shared extents go.
    status = WaitFencesLocked(s);
    if (status.ok()) status = mapper->UnmapAllLocked(mu, best, s);
    if (status.ok() && !s.quarantine().empty()) {
      status = mapper->RetryQuarantineLocked(mu, best, s).status();
    }
  }
  if (!status.ok()) {
    SetOpLocked(best, SlotOp::kNone);
    return status;
  }
  PruneFencesLocked(s);
  SetOpLocked(best, SlotOp::kMapping);
  return best;
}

absl::Status KVCache::Impl::ComposeLocked(
    int slot, const std::vector<std::shared_ptr<SharedExtent>>& whole,
    std::int64_t whole_end, std::int64_t minimum, std::int64_t preferred,
    int copy_src, std::int64_t copy_bytes, const Extent* temp_src,
    Stream stream) {
  Slot& s = At(slot);
  // The extents to map, built under the lock (the records are guarded).
  std::vector<Extent> shared;
  shared.reserve(whole.size());
  for (const auto& record : whole) {
    Extent e;
    e.offset = record->offset;
    e.bytes = record->bytes;
    e.handles = record->handles;
    e.origin = ExtentOrigin::kShared;
    e.read_only = true;
    e.shared = record;
    shared.push_back(std::move(e));
  }
  std::optional<Extent> temp;
  if (temp_src != nullptr) {
    temp = *temp_src;
    temp->read_only = true;
  }
  mu.Unlock();
  absl::Status status;
  std::vector<QuarantinedExtent> lost;  // Rollback failed: state unknown.
  std::size_t mapped = 0;  // Of `shared`, mapped by this call.
  for (; mapped < shared.size(); ++mapped) {
    std::vector<char> left;
    status = mapper->MapExtent(slot, shared[mapped], &left);
    if (!status.ok()) {
      if (!left.empty()) lost.push_back({shared[mapped], std::move(left)});
      break;
    }
  }
  Extent fresh;
  fresh.offset = whole_end;
  bool fresh_mapped = false;
  std::vector<PhysicalHandle> fresh_handles;
  if (status.ok() && std::max(minimum, preferred) > 0) {
    std::int64_t bytes = 0;
    // Nothing needed past the shared extents but a hint to back: back it
    // as AllocSlot does, unless the budget is short (then the slot grows
    // later, like any other).
    const bool hint_only = minimum == 0;
    absl::StatusOr<std::vector<PhysicalHandle>> acquired =
        hint_only ? AcquireHandles(preferred, preferred, &bytes)
                  : AcquireHandles(minimum, std::max(minimum, preferred),
                                   &bytes);
    if (hint_only && !acquired.ok() &&
        acquired.status().code() == absl::StatusCode::kResourceExhausted) {
      // Not backed ahead: nothing mapped, nothing to undo.
    } else if (!acquired.ok()) {
      status = absl::Status(
          acquired.status().code(),
          absl::StrFormat("slot %d: cannot back the %d bytes per tensor after "
                          "the shared prefix: %s",
                          slot, minimum, acquired.status().message()));
    } else {
      fresh.bytes = bytes;
      fresh.handles.assign(acquired->begin(), acquired->end());
      fresh_handles = std::move(*acquired);
      std::vector<char> left;
      status = mapper->MapExtent(slot, fresh, &left);
      if (status.ok()) {
        fresh_mapped = true;
      } else if (!left.empty()) {
        lost.push_back({fresh, std::move(left)});
      } else {
        pool->Release(std::move(fresh_handles),
                      static_cast<std::size_t>(bytes));
      }
    }
  }
  bool temp_mapped = false;
  if (status.ok() && copy_bytes > 0 && temp.has_value()) {
    std::vector<char> left;
    status = mapper->MapExtent(copy_src, *temp, &left);
    if (status.ok()) {
      temp_mapped = true;
    } else if (!left.empty()) {
      // Cannot happen without two faults in a row; the temporary mapping
      // is then left to the backend's teardown. Never pooled twice: the
      // handles are the prefix's.
      status = absl::Status(status.code(),
                            absl::StrCat(status.message(),
                                         " (a temporary read-only mapping of "
                                         "a shared extent may be left)"));
    }
  }
  FenceId src_fence = kCompletedFence;
  if (status.ok() && copy_bytes > 0) {
    status = mapper->Copy(slot, copy_src, whole_end, copy_bytes, stream);
    if (status.ok()) {
      // The copy may still run (CUDA): its source must stay mapped until
      // it has (the new slot's own work on `stream` comes after it).
      absl::StatusOr<FenceId> fence = backend->RecordFence(stream);
      if (fence.ok()) {
        src_fence = *fence;
      } else {
        status = fence.status();
      }
    }
  }
  if (temp_mapped) {
    // The source was mapped only for this copy: wait for it, then unmap.
    if (src_fence != kCompletedFence) {
      absl::Status waited = backend->WaitFence(src_fence);
      if (waited.ok()) {
        (void)backend->ReleaseFence(src_fence);
        src_fence = kCompletedFence;
      } else if (status.ok()) {
        status = waited;
      }
    }
    std::vector<char> left;
    absl::Status unmapped = mapper->UnmapExtent(copy_src, *temp, &left);
    if (!unmapped.ok() && status.ok()) status = unmapped;
  }
  if (!status.ok() && (fresh_mapped || mapped > 0)) {
    // Roll back what this call mapped, newest first.
    if (fresh_mapped) {
      std::vector<char> left;
      if (mapper->UnmapExtent(slot, fresh, &left).ok()) {
        pool->Release(std::move(fresh_handles),
                      static_cast<std::size_t>(fresh.bytes));
      } else {
        if (left.empty()) left.assign(geo.num_regions(), 1);
        lost.push_back({fresh, std::move(left)});
      }
    }
    for (std::size_t i = mapped; i-- > 0;) {
      std::vector<char> left;
      if (!mapper->UnmapExtent(slot, shared[i], &left).ok()) {
        if (left.empty()) left.assign(geo.num_regions(), 1);
        lost.push_back({shared[i], std::move(left)});
      }
    }
  }
  mu.Lock();
  if (src_fence != kCompletedFence) {
    // Kept with the source: a slot's fences, or its prefix home's.
    if (copy_src < opts.max_slots) {
      At(copy_src).fences().push_back(src_fence);
    } else {
      bool kept = false;
      for (const auto& id : prefixes.Ids()) {
        CachedPrefix* p = prefixes.Find(id);
        if (p != nullptr && HomeSlot(p->home) == copy_src) {
          p->fences.push_back(src_fence);
          kept = true;
          break;
        }
      }
      if (!kept) {
        // No prefix owns the home any more (cannot happen while the copy's
        // prefix is busy); never leak the fence.
        (void)backend->WaitFence(src_fence);
        (void)backend->ReleaseFence(src_fence);
      }
    }
  }
  for (QuarantinedExtent& q : lost) {
    if (q.extent.origin == ExtentOrigin::kShared) {
      mapper->ledger().AddMapping(*q.extent.shared);
    }
    s.quarantine().push_back(std::move(q));
  }
  if (!lost.empty()) BooksChangedLocked(slot);
  if (!status.ok()) return status;
  for (Extent& e : shared) {
    mapper->ledger().AddMapping(*e.shared);
    s.Append(std::move(e));
  }
  if (fresh_mapped) s.Append(std::move(fresh));
  BooksChangedLocked(slot);
  return absl::OkStatus();
}

void KVCache::Impl::ActivateComposedLocked(int slot, std::int64_t tokens,
                                           std::int64_t hint, bool* wake) {
  Slot& s = At(slot);
  active_tokens.fetch_sub(s.length(), std::memory_order_relaxed);
  s.Activate(hint, s.mapped_bytes());
  ++active_count;
  placement.OnSlotActive(slot);
  BooksChangedLocked(slot);
  SetLengthLocked(s, tokens);
  SetOpLocked(slot, SlotOp::kNone);
  if (NeedsMapAhead(s)) {
    MarkIfDue(slot, s);
    NoteWorkLocked(wake);
  }
}

absl::Status KVCache::Impl::UnmapTailLocked(CachedPrefix& p) {
  if (p.home < 0) return absl::OkStatus();
  // Copies out of the home may still run on the GPU.
  if (!p.fences.empty()) {
    const std::vector<FenceId> fences = p.fences;
    ++stats.fence_waits;
    ++p.busy;
    mu.Unlock();
    absl::Status waited;
    for (FenceId f : fences) waited.Update(backend->WaitFence(f));
    mu.Lock();
    --p.busy;
    VATTN_RETURN_IF_ERROR(waited);
    for (FenceId f : p.fences) (void)backend->ReleaseFence(f);
    p.fences.clear();
  }
  const Extent tail = p.tail;
  ++p.busy;
  mu.Unlock();
  std::vector<char> left;
  absl::Status status = mapper->UnmapExtent(HomeSlot(p.home), tail, &left);
  mu.Lock();
  --p.busy;
  state_cv.SignalAll();
  if (!status.ok() && !left.empty()) {
    // Half unmapped (the map back failed too): the prefix cannot copy from
    // it any more and lets go of it; the tail waits in quarantine, with its
    // home, until its unmap succeeds (RetryQuarantinesLocked). The caller
    // forgets the prefix as after a clean unmap.
    prefixes.ForgetTail(tail.bytes);
    QuarantineTailLocked(*this, p.home, tail, std::move(left));
    p.tail.handles.clear();
    p.tail.bytes = 0;
    p.home = -1;
    return absl::OkStatus();
  }
  if (!status.ok()) {
    // Mapped whole again: the prefix keeps it (a later call retries).
    return absl::Status(
        status.code(),
        absl::StrFormat("prefix %d: unmapping its tail from its home: %s",
                        p.id, status.message()));
  }
  prefixes.ForgetTail(tail.bytes);
  mapper->LetGoLocked(tail);
  p.tail.handles.clear();
  p.tail.bytes = 0;
  prefixes.GiveHome(p.home);
  p.home = -1;
  return absl::OkStatus();
}

std::int64_t KVCache::Impl::ReleasePrefixLocked(CachedPrefix& p) {
  std::int64_t freed = 0;
  for (const auto& record : p.whole) {
    if (record->refs() == 1) freed += record->bytes;
    mapper->DropKeepLocked(*record);
  }
  p.whole.clear();
  return freed;
}

void KVCache::Impl::UnshareLocked(Extent& e, bool writable) {
  // This call made the record; the slot's mapping is its only reference,
  // so dropping it pools nothing.
  (void)mapper->ledger().DropMapping(*e.shared);
  e.shared.reset();
  e.origin = ExtentOrigin::kOwn;
  // Write access not given back everywhere: flagged read-only, so no
  // request is handed it and a later share sets every region again.
  e.read_only = !writable;
}

// ---------------------------------------------------------------------------
// The calls' bodies.

absl::Status KVCache::Impl::KeepPrefixLocked(int slot, std::int64_t tokens,
                                             std::uint64_t id, Stream stream) {
  VATTN_RETURN_IF_ERROR(CheckActiveLocked(slot));
  if (prefixes.Find(id) != nullptr) {
    return absl::AlreadyExistsError(absl::StrFormat(
        "prefix id %d is already cached (DropPrefix it first)", id));
  }
  if (opts.max_prefixes == 0) {
    return absl::ResourceExhaustedError(
        "KVCacheOptions.max_prefixes is 0: prefix sharing is off");
  }
  Slot& s = At(slot);
  if (tokens > s.length()) {
    return absl::OutOfRangeError(absl::StrFormat(
        "KeepPrefix(slot %d, %d tokens): above the slot's length %d (only "
        "written tokens can be kept)",
        slot, tokens, s.length()));
  }
  // At most max_prefixes: make room (least recently used, unused first).
  while (static_cast<int>(prefixes.size()) >= opts.max_prefixes) {
    CachedPrefix* victim = prefixes.EvictionCandidate();
    if (victim == nullptr) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "KeepPrefix: %d prefixes are cached (KVCacheOptions.max_prefixes) "
          "and every one is in use",
          opts.max_prefixes));
    }
    VATTN_RETURN_IF_ERROR(UnmapTailLocked(*victim));
    std::unique_ptr<CachedPrefix> gone = prefixes.Remove(victim->id);
    ReleasePrefixLocked(*gone);
    ++stats.prefix_evictions;
  }
  WaitNotBusyLocked(slot);
  if (!s.active() || prefixes.Find(id) != nullptr || tokens > s.length()) {
    // Freed, or the id taken, while this call waited: check again.
    return KeepPrefixLocked(slot, tokens, id, stream);
  }
  const std::int64_t data = tokens * geo.token_bytes();
  // The extents wholly inside the prefix, and where the tail starts.
  std::size_t whole_count = 0;
  std::int64_t whole_end = 0;
  for (const Extent& e : s.extents()) {
    if (whole_count >= static_cast<std::size_t>(s.backing_extents())) break;
    if (e.offset + e.bytes > data) break;
    whole_end = e.offset + e.bytes;
    ++whole_count;
  }
  const std::int64_t tail_data = data - whole_end;
  SetOpLocked(slot, SlotOp::kMapping);
  // Share the whole extents in place (read-only in the slot too).
  std::vector<std::shared_ptr<SharedExtent>> whole;
  std::vector<std::size_t> converted;  // Indices this call made shared.
  absl::Status status;
  for (std::size_t i = 0; i < whole_count && status.ok(); ++i) {
    const bool was_own = s.extents()[i].origin == ExtentOrigin::kOwn;
    absl::StatusOr<std::shared_ptr<SharedExtent>> shared =
        mapper->ShareLocked(mu, slot, s, i);
    if (!shared.ok()) {
      status = shared.status();
      break;
    }
    if (was_own) converted.push_back(i);
    whole.push_back(*std::move(shared));
  }
  // The tail: copied once into an extent of the prefix's own, at its home.
  auto prefix = std::make_unique<CachedPrefix>();
  prefix->id = id;
  prefix->tokens = tokens;
  prefix->whole_end = whole_end;
  prefix->tail_tokens_bytes = tail_data;
  if (status.ok() && tail_data > 0) status = EnsureHomesLocked();
  std::optional<int> home;
  if (status.ok() && tail_data > 0) {
    home = prefixes.TakeHome();
    if (!home.has_value()) {
      status = absl::ResourceExhaustedError(
          "KeepPrefix: no free prefix home (KVCacheOptions.max_prefixes)");
    }
  }
  if (status.ok() && tail_data > 0) {
    const int home_slot = HomeSlot(*home);
    const std::int64_t size = geo.RoundUpToGranule(tail_data);
    Extent tail;
    tail.offset = whole_end;
    std::int64_t bytes = 0;
    absl::StatusOr<std::vector<PhysicalHandle>> handles;
    for (;;) {
      mu.Unlock();
      handles = AcquireHandles(size, size, &bytes);
      mu.Lock();
      // The slot is busy, so reclamation skipped it: its own surplus may
      // be what the budget lacks.
      if (handles.ok() ||
          handles.status().code() != absl::StatusCode::kResourceExhausted ||
          !ReclaimOwnSurplusLocked(*this, slot)) {
        break;
      }
    }
    mu.Unlock();
    bool mapped = false;
    std::optional<QuarantinedExtent> lost_tail;
    int lost_home = -1;
    FenceId home_fence = kCompletedFence;
    FenceId slot_fence = kCompletedFence;
    if (!handles.ok()) {
      status = absl::Status(
          handles.status().code(),
          absl::StrFormat("KeepPrefix: cannot back the prefix's %d-byte tail "
                          "per tensor: %s",
                          size, handles.status().message()));
    } else {
      tail.bytes = bytes;
      tail.handles.assign(handles->begin(), handles->end());
      std::vector<char> left;
      status = mapper->MapExtent(home_slot, tail, &left);
      mapped = status.ok();
      if (!status.ok() && !left.empty()) {
        // Two faults in a row: the tail's state is unknown; quarantined
        // with its home (both come back once its unmap succeeds).
        lost_tail.emplace();
        lost_tail->extent = tail;
        lost_tail->mapped = std::move(left);
        lost_home = *home;
        home.reset();
        handles->clear();
      }
      if (status.ok()) {
        status = mapper->Copy(home_slot, slot, whole_end, tail_data, stream);
      }
      if (status.ok()) {
        // Both ends of an asynchronous copy stay mapped until it is done.
        absl::StatusOr<FenceId> f1 = backend->RecordFence(stream);
        absl::StatusOr<FenceId> f2 =
            f1.ok() ? backend->RecordFence(stream) : f1;
        if (f1.ok() && f2.ok()) {
          home_fence = *f1;
          slot_fence = *f2;
        } else {
          if (f1.ok()) {
            (void)backend->WaitFence(*f1);
            (void)backend->ReleaseFence(*f1);
          }
          status = f1.ok() ? f2.status() : f1.status();
        }
      }
      if (!status.ok() && mapped) {
        std::vector<char> unleft;
        if (!mapper->UnmapExtent(home_slot, tail, &unleft).ok()) {
          // Left mapped (whole or in part): quarantined with its home.
          lost_tail.emplace();
          lost_tail->extent = tail;
          lost_tail->mapped = std::move(unleft);
          lost_home = *home;
          home.reset();
          handles->clear();
        }
      }
      if (!status.ok() && handles.ok() && !handles->empty()) {
        pool->Release(std::move(*handles), static_cast<std::size_t>(bytes));
      }
    }
    mu.Lock();
    if (lost_tail.has_value()) {
      QuarantineTailLocked(*this, lost_home, std::move(lost_tail->extent),
                           std::move(lost_tail->mapped));
    }
    if (status.ok()) {
      prefix->home = *home;
      prefix->tail = std::move(tail);
      if (home_fence != kCompletedFence) prefix->fences.push_back(home_fence);
      if (slot_fence != kCompletedFence) s.fences().push_back(slot_fence);
      stats.cow_copied_bytes += tail_data * geo.num_regions();
    } else if (home.has_value()) {
      prefixes.GiveHome(*home);
    }
  }
  if (!status.ok()) {
    // Undo the shares this call made: write access back, own books again.
    for (auto it = converted.rbegin(); it != converted.rend(); ++it) {
      const Extent copy = s.extents()[*it];
      mu.Unlock();
      const absl::Status back =
          GiveWriteBack(*mapper, slot, copy, geo.num_regions());
      mu.Lock();
      UnshareLocked(s.MutableExtent(*it), back.ok());
    }
    SetOpLocked(slot, SlotOp::kNone);
    return status;
  }
  for (const auto& record : whole) mapper->ledger().AddKeep(*record);
  prefix->whole = std::move(whole);
  prefixes.Add(std::move(prefix));
  SetOpLocked(slot, SlotOp::kNone);
  return absl::OkStatus();
}

absl::StatusOr<int> KVCache::Impl::AllocWithPrefixLocked(
    std::uint64_t id, std::int64_t tokens, std::int64_t expected_tokens,
    Stream stream, bool* wake) {
  CachedPrefix* p = prefixes.Find(id);
  if (p == nullptr) {
    return absl::NotFoundError(absl::StrFormat(
        "prefix %d is not cached (never kept, dropped or evicted)", id));
  }
  // Held busy so that eviction and DropPrefix leave its memory alone while
  // the lock is dropped.
  ++p->busy;
  const std::uint64_t prefix_id = p->id;
  absl::StatusOr<int> taken = TakeEmptySlotLocked();
  if (!taken.ok()) {
    --p->busy;
    state_cv.SignalAll();
    return taken.status();
  }
  const int slot = *taken;
  const std::int64_t shared_tokens = std::min(tokens, p->tokens);
  const std::int64_t data = shared_tokens * geo.token_bytes();
  std::vector<std::shared_ptr<SharedExtent>> whole;
  std::int64_t whole_end = 0;
  const SharedExtent* inside = nullptr;  // Whole extent the boundary cuts.
  for (const auto& record : p->whole) {
    if (record->offset + record->bytes > data) {
      if (record->offset < data) inside = record.get();
      break;
    }
    whole.push_back(record);
    whole_end = record->offset + record->bytes;
  }
  const std::int64_t copy_bytes = data - whole_end;
  const std::int64_t backed =
      geo.BytesFor(std::max(tokens, expected_tokens));
  const std::int64_t minimum =
      std::max<std::int64_t>(0, geo.BytesFor(tokens) - whole_end);
  const std::int64_t preferred = std::max<std::int64_t>(0, backed - whole_end);
  int copy_src = -1;
  std::optional<Extent> temp;
  std::optional<int> temp_home;
  absl::Status status;
  if (copy_bytes > 0 && inside == nullptr) {
    copy_src = HomeSlot(p->home);  // The tail, at the prefix's home.
  } else if (copy_bytes > 0) {
    // The request shares less than the prefix, and its boundary cuts a
    // whole extent that may be mapped nowhere now: map it at a home for the
    // copy (the prefix's own home: its tail lies past this extent).
    int h = p->home;
    if (h < 0) {
      status = EnsureHomesLocked();
      if (status.ok()) {
        temp_home = prefixes.TakeHome();
        if (!temp_home.has_value()) {
          status = absl::ResourceExhaustedError(
              "AllocSlotWithPrefix: no free prefix home for the copy");
        }
        h = temp_home.value_or(-1);
      }
    }
    if (status.ok()) {
      copy_src = HomeSlot(h);
      temp.emplace();
      temp->offset = inside->offset;
      temp->bytes = inside->bytes;
      temp->handles = inside->handles;
      temp->origin = ExtentOrigin::kShared;
    }
  }
  if (status.ok()) {
    status = ComposeLocked(slot, whole, whole_end, minimum, preferred,
                           copy_src, copy_bytes,
                           temp.has_value() ? &*temp : nullptr, stream);
  }
  if (temp_home.has_value()) prefixes.GiveHome(*temp_home);
  --p->busy;  // The record stayed put: busy prefixes are never removed.
  state_cv.SignalAll();
  if (!status.ok()) {
    SetOpLocked(slot, SlotOp::kNone);
    return status;
  }
  stats.cow_copied_bytes += copy_bytes * geo.num_regions();
  ++stats.prefix_hits;
  ++p->hits;
  ++p->users;
  prefixes.Touch(*p);
  prefixes.UserOf(slot) = prefix_id;
  ActivateComposedLocked(slot, tokens, std::max(tokens, expected_tokens),
                         wake);
  return slot;
}

absl::StatusOr<int> KVCache::Impl::ForkLocked(int source, Stream stream,
                                              bool* wake) {
  VATTN_RETURN_IF_ERROR(CheckActiveLocked(source));
  WaitNotBusyLocked(source);
  VATTN_RETURN_IF_ERROR(CheckActiveLocked(source));
  Slot& src = At(source);
  SetOpLocked(source, SlotOp::kMapping);
  const auto done_with_source = [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    SetOpLocked(source, SlotOp::kNone);
  };
  absl::StatusOr<int> taken = TakeEmptySlotLocked();
  if (!taken.ok()) {
    done_with_source();
    return taken.status();
  }
  const int slot = *taken;
  const std::int64_t length = src.length();
  const std::int64_t data = length * geo.token_bytes();
  std::vector<std::shared_ptr<SharedExtent>> whole;
  std::vector<std::size_t> converted;
  std::int64_t whole_end = 0;
  absl::Status status;
  for (std::size_t i = 0;
       i < static_cast<std::size_t>(src.backing_extents()) && status.ok();
       ++i) {
    const Extent& e = src.extents()[i];
    if (e.offset + e.bytes > data) break;
    const bool was_own = e.origin == ExtentOrigin::kOwn;
    absl::StatusOr<std::shared_ptr<SharedExtent>> shared =
        mapper->ShareLocked(mu, source, src, i);
    if (!shared.ok()) {
      status = shared.status();
      break;
    }
    if (was_own) converted.push_back(i);
    whole_end = e.offset + e.bytes;
    whole.push_back(*std::move(shared));
  }
  const std::int64_t copy_bytes = data - whole_end;
  const std::int64_t backed = geo.BytesFor(std::max(length, src.hint()));
  if (status.ok()) {
    // The source is busy meanwhile: its mappings (one reference each of
    // the whole extents) stay.
    const std::int64_t minimum =
        std::max<std::int64_t>(0, geo.BytesFor(length) - whole_end);
    // No extent past the shared ones when none is needed: the child's
    // hint is then left to Grow and the map-ahead thread (unlike
    // AllocSlotWithPrefix's, which backs it).
    const std::int64_t preferred =
        minimum > 0 ? std::max<std::int64_t>(0, backed - whole_end) : 0;
    for (;;) {
      status = ComposeLocked(slot, whole, whole_end, minimum, preferred,
                             source, copy_bytes, nullptr, stream);
      // The source is busy, so reclamation skipped it: its own surplus may
      // be what the budget lacks (a failed compose mapped nothing it kept).
      if (status.code() != absl::StatusCode::kResourceExhausted ||
          !ReclaimOwnSurplusLocked(*this, source)) {
        break;
      }
    }
  }
  if (!status.ok()) {
    // Undo the shares this call made in the source.
    for (auto it = converted.rbegin(); it != converted.rend(); ++it) {
      const Extent copy = src.extents()[*it];
      if (copy.shared == nullptr || copy.shared->refs() != 1) continue;
      mu.Unlock();
      const absl::Status back =
          GiveWriteBack(*mapper, source, copy, geo.num_regions());
      mu.Lock();
      UnshareLocked(src.MutableExtent(*it), back.ok());
    }
    SetOpLocked(slot, SlotOp::kNone);
    done_with_source();
    return status;
  }
  stats.cow_copied_bytes += copy_bytes * geo.num_regions();
  ++stats.forks;
  ActivateComposedLocked(slot, length, std::max(length, src.hint()), wake);
  done_with_source();
  return slot;
}

absl::Status KVCache::Impl::DropPrefixLocked(std::uint64_t id) {
  for (;;) {
    CachedPrefix* p = prefixes.Find(id);
    if (p == nullptr) {
      return absl::NotFoundError(absl::StrFormat(
          "prefix %d is not cached (never kept, dropped or evicted)", id));
    }
    if (p->busy > 0) {
      state_cv.Wait(&mu);
      continue;
    }
    VATTN_RETURN_IF_ERROR(UnmapTailLocked(*p));
    std::unique_ptr<CachedPrefix> gone = prefixes.Remove(id);
    ReleasePrefixLocked(*gone);
    return absl::OkStatus();
  }
}

absl::StatusOr<std::int64_t> KVCache::Impl::EvictPrefixForMemoryLocked() {
  for (;;) {
    CachedPrefix* p = prefixes.EvictionCandidate();
    if (p == nullptr) return 0;
    const std::int64_t tail = p->tail.bytes;
    VATTN_RETURN_IF_ERROR(UnmapTailLocked(*p));
    std::unique_ptr<CachedPrefix> gone = prefixes.Remove(p->id);
    const std::int64_t freed = tail + ReleasePrefixLocked(*gone);
    ++stats.prefix_evictions;
    if (freed > 0) return freed;
  }
}

absl::Status KVCache::Impl::ShutdownPrefixesLocked() {
  absl::Status first;
  for (std::uint64_t id : prefixes.Ids()) {
    CachedPrefix* p = prefixes.Find(id);
    while (p != nullptr && p->busy > 0) {
      state_cv.Wait(&mu);
      p = prefixes.Find(id);
    }
    if (p == nullptr) continue;
    first.Update(UnmapTailLocked(*p));
    std::unique_ptr<CachedPrefix> gone = prefixes.Remove(id);
    ReleasePrefixLocked(*gone);
  }
  RetryTailQuarantineLocked(*this);
  if (home_base != 0) {
    const DevicePtr va = home_base;
    const std::size_t bytes = home_bytes;
    mu.Unlock();
    absl::Status released = backend->Release(va, bytes);
    mu.Lock();
    if (released.ok()) home_base = 0;
    first.Update(released);
  }
  return first;
}

}  // namespace vattn
