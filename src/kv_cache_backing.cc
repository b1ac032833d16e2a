// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// How memory gets behind a slot: construction and teardown, fences,
// handle acquisition and reclamation, growing a slot, and the map-ahead
// thread's decisions (see kv_cache_impl.h for the states and the locking).

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>
#include <utility>
#include <vector>

#include "src/kv_cache_impl.h"

namespace vattn {

using internal::MutexLock;

namespace {

std::int64_t SteadyNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

// ---------------------------------------------------------------------------
// Construction and destruction.

absl::Status KVCache::Impl::Init() {
  const BackendCapabilities& caps = backend->capabilities();
  budget = static_cast<std::int64_t>(opts.memory_budget_bytes);
  if (budget == 0 && caps.default_budget_bytes > 0) {
    budget = static_cast<std::int64_t>(caps.default_budget_bytes);
  }
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
  VATTN_RETURN_IF_ERROR(AttachArbiter());  // May change `budget`.
  mapper = std::make_unique<ExtentMapper>(backend.get(), pool.get(), &geo,
                                          base, opts.zero_on_reuse, &state_cv,
                                          this);
  {
    MutexLock lock(&mu);
    stats.budget_bytes = budget;
    prefixes.Init(opts.max_slots, opts.max_prefixes);
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
    urgent_tokens = std::max<std::int64_t>(1, opts.map_ahead_tokens / 4);
    flagged_scratch.reserve(static_cast<std::size_t>(opts.max_slots));
    due_scratch.reserve(static_cast<std::size_t>(opts.max_slots));
    worker.Start(this);
  }
  return absl::OkStatus();
}

void KVCache::Impl::Shutdown() {
  DetachArbiter();
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
    // Cached prefixes keep shared extents and tails: theirs go last.
    first.Update(ShutdownPrefixesLocked());
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
    VATTN_ASSIGN_OR_RETURN(std::int64_t reclaimed,
                           ReclaimForGrow(order.minimum));
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
  // Prefix tails first: nothing else can free their homes.
  if (const std::int64_t freed = RetryTailQuarantineLocked(*this); freed > 0) {
    return freed;
  }
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

absl::StatusOr<std::int64_t> KVCache::Impl::ReclaimOne(std::int64_t need) {
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
        &wait, need);
    if (victim < 0) {
      // No idle slot holds memory: cached prefixes nobody uses go next.
      VATTN_ASSIGN_OR_RETURN(std::int64_t evicted,
                             EvictPrefixForMemoryLocked());
      if (evicted > 0) return evicted;
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
  // The lock is dropped below: another thread may free the slot meanwhile,
  // and another request take it. This call serves only the request it
  // found.
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
    // Surplus alone covers the need: adopt it (no driver call to fail).
    if (s.mapped_bytes() >= need) {
      AdoptUpToLocked(slot, need);
      continue;
    }
    // Otherwise map the rest after every extent the slot holds, and let the
    // surplus in front of it back the slot only when that map commits: once
    // adopted, backed memory is published to Step's lock-free path (the
    // owner's Step may report and write it at once), so a failed map must
    // not have adopted anything it would have to take back.
    const std::int64_t deficit = need - s.mapped_bytes();
    // With look-ahead on, one extent covers the look-ahead too (as the
    // thread would map it): a new prompt costs one map whichever side gets
    // to it first, instead of the caller's plus the thread's.
    const std::int64_t wanted =
        look_ahead ? std::max(deficit, TargetBytes(s, opts.map_ahead_tokens) -
                                           s.mapped_bytes())
                   : deficit;
    // The slot is busy while it maps: nobody else changes its extents.
    const std::int64_t surplus_extents =
        static_cast<std::int64_t>(s.extents().size()) - s.backing_extents();
    foreground_maps.fetch_add(1, std::memory_order_relaxed);
    absl::Status status = mapper->MapNextLocked(
        mu, slot, s, geo.ExtentSize(s.mapped_bytes(), wanted),
        geo.RoundUpToGranule(deficit));
    foreground_maps.fetch_sub(1, std::memory_order_relaxed);
    if (!status.ok()) return status;
    stats.adopted_extents += surplus_extents;
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
  pace.Observe(step_calls.load(std::memory_order_relaxed), SteadyNanos());
  // Backing off after a failure: sleep until it ends.
  if (const std::int64_t left = BackoffLeftLocked(); left > 0) {
    return absl::Nanoseconds(left);
  }
  // A refill paused for a foreground map: resume it shortly.
  if (refilling && !shutting_down) return absl::Microseconds(200);
  // Nothing the thread could do until a call announces it: sleep until
  // woken (zero wake-ups while idle).
  if (!look_ahead || shutting_down || active_count == 0) {
    return absl::InfiniteDuration();
  }
  // Wake when the active slot closest to its look-ahead has used half of
  // it, at the pace callers step; Step's own wake (a quarter left) is the
  // fallback when the pace changes or is unknown.
  const std::int64_t wake_margin =
      std::max<std::int64_t>(1, opts.map_ahead_tokens / 2);
  std::int64_t least = std::numeric_limits<std::int64_t>::max();
  for (const Slot& s : slots) {
    if (!s.active()) continue;
    const std::int64_t backed = geo.BackedTokens(s.backing_bytes());
    if (backed >= opts.max_tokens) continue;  // Nothing more to map.
    least = std::min(least, backed - std::max(s.length(), s.hint()) -
                                wake_margin);
  }
  if (least == std::numeric_limits<std::int64_t>::max()) {
    return absl::InfiniteDuration();
  }
  return pace.NapFor(least);
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
  std::vector<int>& flagged = flagged_scratch;
  flagged.clear();
  worker.TakeDue(&flagged);
  // The flagged slots that still need mapping, closest to running out first
  // (a new request's prompt, the hint, is needed at its first Step).
  std::vector<DueSlot>& due = due_scratch;
  due.clear();
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
  std::sort(due.begin(), due.end(), [](const DueSlot& x, const DueSlot& y) {
    return x.margin < y.margin;
  });
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
  if (opts.pool_high_water <= 0) return false;
  // Below the low water mark a refill starts; it goes on, one handle per
  // round, to the high one (refilling), so each round ends after one
  // create: a look-ahead map or a foreground miss waits for at most one,
  // never for the whole refill. None starts while the foreground maps.
  const int idle = pool->IdleCount(bytes);
  if (idle >= opts.pool_high_water) refilling = false;
  if (!refilling && idle < opts.pool_low_water) refilling = true;
  if (!refilling || foreground_maps.load(std::memory_order_relaxed) > 0) {
    return false;
  }
  mu.Unlock();
  absl::StatusOr<int> made = pool->Fill(bytes, idle + 1);
  mu.Lock();
  if (made.ok() && *made > 0) {
    stats.background_creates += *made;
    return true;
  }
  refilling = false;  // Out of budget (or failed): wait for the low mark.
  if (made.ok()) return false;
  if (made.status().code() != absl::StatusCode::kResourceExhausted) {
    NoteBackgroundFailureLocked(made.status());
  }
  return false;
}

}  // namespace vattn
