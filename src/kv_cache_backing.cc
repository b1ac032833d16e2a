// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// How memory gets behind a slot: construction and teardown, fences,
// handle acquisition and reclamation, growing a slot, and the map-ahead
// thread's decisions (see kv_cache_impl.h for the states and the locking).

#include <algorithm>
#include <cstdio>
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
  // Every extent that can be returned is: a failed unmap sends its extent
  // to quarantine and the next extent is tried; the quarantine is retried
  // once at the end. What is still mapped after that is reported and left
  // to the backend (which takes it back when it is destroyed).
  absl::Status first;
  if (mapper != nullptr) {
    for (int i = 0; i < opts.max_slots; ++i) {
      WaitNotBusyLocked(i);
      Slot& s = At(i);
      SetOpLocked(i, SlotOp::kUnmapping);
      first.Update(WaitFencesLocked(s));
      first.Update(mapper->UnmapAllLocked(
          mu, i, s, ExtentMapper::OnCleanFailure::kQuarantine));
      first.Update(mapper->RetryQuarantineLocked(mu, i, s).status());
      SetOpLocked(i, SlotOp::kNone);
    }
  }
  const Tally left = totals;
  mu.Unlock();
  absl::Status teardown;  // Errors that leave something behind.
  if (pool) {
    teardown.Update(pool->DestroyIdle());
    pool.reset();
  }
  if (base != 0) teardown.Update(backend->Release(base, geo.reserved_bytes()));
  first.Update(teardown);
  if (left.quarantined > 0 || !teardown.ok()) {
    std::fprintf(stderr,
                 "vattn: ~KVCache could not give back %lld extent(s) "
                 "(%lld bytes per tensor) to backend %s; the backend takes "
                 "them back when it is destroyed. First error: %s\n",
                 static_cast<long long>(left.quarantined),
                 static_cast<long long>(left.quarantined_bytes),
                 backend->capabilities().name.c_str(), first.ToString().c_str());
  }
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

std::int64_t KVCache::Impl::RetryQuarantinesLocked() {
  if (totals.quarantined == 0) return 0;
  for (int i = 0; i < opts.max_slots; ++i) {
    Slot& s = At(i);
    if (s.quarantine().empty() || s.busy()) continue;
    SetOpLocked(i, SlotOp::kUnmapping);
    absl::StatusOr<std::int64_t> freed = mapper->RetryQuarantineLocked(mu, i, s);
    SetOpLocked(i, SlotOp::kNone);
    if (freed.ok() && *freed > 0) return *freed;
  }
  return 0;
}

absl::StatusOr<std::int64_t> KVCache::Impl::ReclaimOne() {
  MutexLock lock(&mu);
  // Quarantined extents that can now be unmapped are the first to go.
  if (const std::int64_t freed = RetryQuarantinesLocked(); freed > 0) {
    return freed;
  }
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
  // The lock is dropped below: another thread may free the slot meanwhile,
  // and another request take it. This call serves only the request it
  // found; the books it may roll back are that request's.
  const std::uint64_t request = s.request();
  const auto gone = [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return !s.active() || s.request() != request;
  };
  while (s.backing_bytes() < need) {
    if (gone()) break;
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
      // only ever takes extents past the backing ones, so they are there).
      if (!gone()) {
        s.UnadoptTo(backing_before);
        BooksChangedLocked(slot);
      }
      return status;
    }
    ++stats.extents_mapped;
    if (mapped_here != nullptr) *mapped_here = true;
  }
  if (gone()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "slot %d was freed (or taken by another request) while it was being "
        "grown",
        slot));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// The map-ahead thread's decisions.

absl::Duration KVCache::Impl::IdleNap() {
  MutexLock lock(&mu);
  if (const std::int64_t left = BackoffLeftLocked(); left > 0) {
    return absl::Nanoseconds(left);
  }
  return active_count > 0 ? kActivePoll : kIdlePoll;
}

void KVCache::Impl::NoteBackgroundFailureLocked(absl::Status status) {
  ++stats.background_failures;
  last_background_error = std::move(status);
  backoff_nanos = std::clamp<std::int64_t>(2 * backoff_nanos, 1'000'000,
                                           100'000'000);
  backoff_until = std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now().time_since_epoch())
                      .count() +
                  backoff_nanos;
}

std::int64_t KVCache::Impl::BackoffLeftLocked() const {
  if (backoff_nanos == 0) return 0;
  const std::int64_t now =
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::chrono::steady_clock::now().time_since_epoch())
          .count();
  return std::max<std::int64_t>(0, backoff_until - now);
}

bool KVCache::Impl::RunOnce() {
  MutexLock lock(&mu);
  // After a failure the thread leaves the work to the foreground for a
  // while (IdleNap sleeps until the back-off ends).
  if (shutting_down || BackoffLeftLocked() > 0) return false;
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
      NoteBackgroundSuccessLocked();
      did = true;
      continue;
    }
    // Looking ahead is best effort: the foreground maps (or fails, with its
    // own error) when the memory is really needed. Out of budget, stop until
    // something changes; after a driver error, back off too.
    if (status.code() != absl::StatusCode::kResourceExhausted) {
      NoteBackgroundFailureLocked(status);
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
    NoteBackgroundFailureLocked(made.status());
  }
  return false;
}

}  // namespace vattn
