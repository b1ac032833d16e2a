// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// How memory gets behind a slot: construction and teardown, fences,
// handle acquisition and reclamation, growing a slot, and the map-ahead
// thread's decisions (see kv_cache_impl.h for the states and the locking).

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "src/kv_cache_impl.h"

namespace vattn {

using internal::MutexLock;

namespace {

// How often the map-ahead thread looks for work while requests are active
// (Step wakes it only when a slot is nearly out of look-ahead), and while
// none are (for work no call announced, such as a fence completing).
constexpr absl::Duration kActivePoll = absl::Microseconds(500);
constexpr absl::Duration kIdlePoll = absl::Milliseconds(50);

}  // namespace

// ---------------------------------------------------------------------------
// Construction and destruction.

absl::Status KVCache::Impl::Init() {
  const BackendCapabilities& caps = backend->capabilities();
  budget = static_cast<std::int64_t>(opts.memory_budget_bytes);
  if (budget == 0) {
    budget = caps.physical_memory_bytes > 0
                 ? static_cast<std::int64_t>(caps.physical_memory_bytes)
                 : std::numeric_limits<std::int64_t>::max() / 4;
  }
  const std::int64_t one_extent = geo.granularity() * geo.num_regions();
  if (budget < one_extent) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.memory_budget_bytes (%d) cannot hold one extent of "
        "every tensor (%d bytes)",
        budget, one_extent));
  }
  VATTN_ASSIGN_OR_RETURN(base, backend->Reserve(geo.reserved_bytes()));
  pool = std::make_unique<PhysicalPool>(backend, budget);
  mapper = std::make_unique<ExtentMapper>(backend.get(), pool.get(), &geo,
                                          base, opts.zero_on_reuse, &state_cv,
                                          this);
  {
    MutexLock lock(&mu);
    stats.budget_bytes = budget;
  }
  if (opts.prealloc_handles > 0) {
    const std::int64_t size =
        opts.prealloc_handle_bytes == 0
            ? geo.min_extent()
            : geo.RoundUpToGranule(
                  static_cast<std::int64_t>(opts.prealloc_handle_bytes));
    if (size * opts.prealloc_handles > budget) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KVCacheOptions.prealloc_handles: %d handles of %d bytes exceed "
          "the %d-byte budget",
          opts.prealloc_handles, size, budget));
    }
    VATTN_RETURN_IF_ERROR(
        pool->Fill(static_cast<std::size_t>(size), opts.prealloc_handles)
            .status());
  }
  if (opts.map_ahead_tokens > 0 || opts.pool_high_water > 0) {
    look_ahead = opts.map_ahead_tokens > 0;
    worker.Start(this);
  }
  return absl::OkStatus();
}

void KVCache::Impl::Shutdown() {
  {
    MutexLock lock(&mu);
    shutting_down = true;
    state_cv.SignalAll();
  }
  worker.Stop();
  MutexLock lock(&mu);
  if (mapper != nullptr) {
    for (int i = 0; i < opts.max_slots; ++i) {
      WaitNotBusyLocked(i);
      Slot& s = At(i);
      SetOpLocked(i, SlotOp::kUnmapping);
      // Errors cannot be reported from a destructor; the backend takes back
      // whatever is left when it is destroyed.
      (void)WaitFencesLocked(s);
      (void)mapper->UnmapAllLocked(mu, i, s);
      SetOpLocked(i, SlotOp::kNone);
    }
  }
  mu.Unlock();
  if (pool) {
    (void)pool->DestroyIdle();
    pool.reset();
  }
  if (base != 0) (void)backend->Release(base, geo.reserved_bytes());
  mu.Lock();
}

// ---------------------------------------------------------------------------
// Fences.

bool KVCache::Impl::PruneFencesLocked(Slot& s) {
  std::vector<FenceId>& fences = s.fences();
  auto it = fences.begin();
  while (it != fences.end()) {
    absl::StatusOr<bool> done = backend->FenceDone(*it);
    if (done.ok() && *done) {
      (void)backend->ReleaseFence(*it);
      it = fences.erase(it);
    } else {
      ++it;
    }
  }
  return fences.empty();
}

absl::Status KVCache::Impl::WaitFencesLocked(Slot& s) {
  if (PruneFencesLocked(s)) return absl::OkStatus();
  const std::vector<FenceId> fences = s.fences();
  ++stats.fence_waits;
  absl::Status status;
  mu.Unlock();
  for (FenceId f : fences) status.Update(backend->WaitFence(f));
  mu.Lock();
  if (!status.ok()) return status;
  for (FenceId f : s.fences()) (void)backend->ReleaseFence(f);
  s.fences().clear();
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Mapping and reclamation.

absl::StatusOr<std::vector<PhysicalHandle>> KVCache::Impl::AcquireHandles(
    std::int64_t minimum, std::int64_t preferred, std::int64_t* bytes) {
  const int n = geo.num_regions();
  const AcquisitionOrder order{minimum, preferred};
  for (std::int64_t size : order.WithoutReclaim()) {
    absl::StatusOr<std::vector<PhysicalHandle>> handles =
        pool->Acquire(static_cast<std::size_t>(size), n, /*quiet=*/true);
    if (handles.ok() ||
        handles.status().code() != absl::StatusCode::kResourceExhausted) {
      *bytes = size;
      return handles;
    }
  }
  // Take idle memory back, one extent at a time, until the minimum fits.
  for (;;) {
    VATTN_ASSIGN_OR_RETURN(std::int64_t reclaimed, ReclaimOne());
    if (order.TakeAsIs(reclaimed)) {
      absl::StatusOr<std::vector<PhysicalHandle>> handles = pool->Acquire(
          static_cast<std::size_t>(reclaimed), n, /*quiet=*/true);
      if (handles.ok()) {
        *bytes = reclaimed;
        return handles;
      }
    }
    absl::StatusOr<std::vector<PhysicalHandle>> handles =
        pool->Acquire(static_cast<std::size_t>(minimum), n,
                      /*quiet=*/reclaimed != 0);
    if (handles.ok() || reclaimed == 0 ||
        handles.status().code() != absl::StatusCode::kResourceExhausted) {
      *bytes = minimum;
      return handles;
    }
  }
}

absl::StatusOr<std::int64_t> KVCache::Impl::ReclaimOne() {
  MutexLock lock(&mu);
  for (;;) {
    bool wait = false;
    const int victim = placement.ChooseVictim(
        [this](int i) ABSL_NO_THREAD_SAFETY_ANALYSIS {
          return PruneFencesLocked(At(i));
        },
        &wait);
    if (victim < 0) {
      if (!wait) return 0;
      state_cv.Wait(&mu);
      continue;
    }
    Slot& s = At(victim);
    SetOpLocked(victim, SlotOp::kUnmapping);
    absl::Status status = WaitFencesLocked(s);
    absl::StatusOr<std::int64_t> bytes =
        status.ok() ? mapper->UnmapLastLocked(mu, victim, s) : status;
    if (bytes.ok()) {
      stats.reclaimed_bytes += *bytes * geo.num_regions();
      ++stats.reclaimed_extents;
    }
    SetOpLocked(victim, SlotOp::kNone);
    return bytes;
  }
}

absl::Status KVCache::Impl::EnsureBackedLocked(int slot, std::int64_t tokens,
                                               bool* mapped_here) {
  Slot& s = At(slot);
  const std::int64_t need = geo.BytesFor(tokens);
  const int backing_before = s.backing_extents();
  while (s.backing_bytes() < need) {
    // The lock is dropped below: another thread may free the slot meanwhile.
    if (!s.active()) break;
    if (s.busy()) {
      state_cv.Wait(&mu);
      continue;
    }
    if (AdoptUpToLocked(slot, need)) continue;
    const std::int64_t deficit = need - s.backing_bytes();
    absl::Status status = mapper->MapNextLocked(
        mu, slot, s, geo.ExtentSize(s.backing_bytes(), deficit),
        geo.RoundUpToGranule(deficit));
    if (!status.ok()) {
      // Surplus adopted on the way goes back to being surplus (reclamation
      // only ever takes extents past the backing ones).
      if (s.active() &&
          static_cast<std::size_t>(backing_before) <= s.extents().size()) {
        s.UnadoptTo(backing_before);
        placement.OnExtentsChanged(slot, s.extents(), s.backing_extents());
      }
      return status;
    }
    ++stats.extents_mapped;
    if (mapped_here != nullptr) *mapped_here = true;
  }
  if (!s.active()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "slot %d was freed by another thread while it was being grown", slot));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// The map-ahead thread's decisions.

absl::Duration KVCache::Impl::IdleNap() {
  MutexLock lock(&mu);
  return active_count > 0 ? kActivePoll : kIdlePoll;
}

bool KVCache::Impl::RunOnce() {
  MutexLock lock(&mu);
  if (shutting_down || !background_error.ok()) return false;
  if (MapAheadRoundLocked()) return true;
  return RefillPoolLocked();
}

bool KVCache::Impl::MapAheadRoundLocked() {
  if (!look_ahead) return false;
  const std::uint64_t generation = worker.generation();
  std::vector<int> flagged;
  worker.TakeDue(&flagged);
  // The flagged slots that still need mapping, closest to running out first
  // (a new request's prompt, the hint, is needed at its first Step).
  struct Due {
    std::int64_t margin;
    int slot;
  };
  std::vector<Due> due;
  bool did = false;
  for (int i : flagged) {
    Slot& s = At(i);
    if (!s.active() || s.busy()) continue;
    const std::int64_t target = TargetBytes(s, opts.map_ahead_tokens);
    did = AdoptUpToLocked(i, target) || did;  // Surplus is free look-ahead.
    if (s.backing_bytes() >= target) continue;
    due.push_back({geo.BackedTokens(s.backing_bytes()) -
                       std::max<std::int64_t>(s.length(), s.hint()),
                   i});
  }
  std::sort(due.begin(), due.end(),
            [](const Due& x, const Due& y) { return x.margin < y.margin; });
  for (std::size_t k = 0; k < due.size(); ++k) {
    // New work was announced (a new prompt, a slot nearly out of look-ahead):
    // start a new round so it is ordered with the rest, keeping the slots
    // not done yet flagged.
    if (shutting_down || worker.WorkSince(generation)) {
      for (std::size_t rest = k; rest < due.size(); ++rest) {
        MarkIfDue(due[rest].slot, At(due[rest].slot));
      }
      break;
    }
    const int i = due[k].slot;
    Slot& s = At(i);
    if (!s.active() || s.busy()) continue;  // The lock was dropped meanwhile.
    const std::int64_t target = TargetBytes(s, opts.map_ahead_tokens);
    did = AdoptUpToLocked(i, target) || did;
    if (s.backing_bytes() >= target) continue;
    const std::int64_t deficit = target - s.backing_bytes();
    absl::Status status = mapper->MapNextLocked(
        mu, i, s, geo.ExtentSize(s.backing_bytes(), deficit),
        geo.RoundUpToGranule(deficit));
    if (status.ok()) {
      ++stats.extents_mapped;
      ++stats.background_extents;
      did = true;
      continue;
    }
    // Out of budget: looking ahead is best effort; the foreground maps (or
    // fails) when the memory is really needed. Anything else is sticky.
    if (status.code() != absl::StatusCode::kResourceExhausted) {
      SetBackgroundErrorLocked(status);
    }
    return false;
  }
  return did;
}

bool KVCache::Impl::RefillPoolLocked() {
  const auto bytes = static_cast<std::size_t>(geo.max_extent());
  if (opts.pool_high_water <= 0 || pool->IdleCount(bytes) >= opts.pool_low_water) {
    return false;
  }
  mu.Unlock();
  absl::StatusOr<int> made = pool->Fill(bytes, opts.pool_high_water);
  mu.Lock();
  if (made.ok()) {
    stats.background_creates += *made;
    return *made > 0;
  }
  if (made.status().code() != absl::StatusCode::kResourceExhausted) {
    SetBackgroundErrorLocked(made.status());
  }
  return false;
}

}  // namespace vattn
