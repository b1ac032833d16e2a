// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The KV cache's implementation: a state machine over its slots. A slot is
// idle or active (SlotState) and has at most one operation in flight
// (SlotOp); the cache moves it between states under one lock and decides
// what to map, reclaim and zero. The pieces it delegates to, one file each:
//   CacheGeometry (cache_geometry.h)  addresses, sizes, views;
//   Placement (placement.h)           which slot a request takes, which one
//                                     gives memory back;
//   ExtentMapper (extent_mapper.h)    map/unmap/zero an extent with the lock
//                                     dropped, with rollback;
//   MapAheadWorker (map_ahead.h)      the background thread and its wake-up;
//   PhysicalPool (physical_pool.h)    handles and the budget.
// kv_cache.cc holds the public calls (the slots' transitions);
// kv_cache_backing.cc how memory gets behind a slot: construction and
// teardown, fences, reclamation, and the map-ahead thread's decisions.
//
// Locking. One mutex (mu) guards the slots' books, placement and the
// counters. Driver calls never run under it: the thread that maps or unmaps
// a slot marks it busy (SlotOp), drops the lock for the driver calls, then
// takes it back to commit; others that need a busy slot wait on state_cv.
// Waiting cannot deadlock: a thread mapping a slot may wait only for a slot
// another thread is unmapping or zeroing (reclamation), and those threads
// wait for no slot. Step's fast path takes no lock: it reads and writes only
// the slots' LockFree<> fields and flags look-ahead work in the worker's due
// set. Lock order: mu, then the PhysicalPool's lock (the pool never calls
// back), then a MemoryArbiter's lock (a leaf: the pool charges the shared
// budget under its own lock); the worker's wake lock is taken alone. The
// arbiter calls into the cache (ArbiterIdleInfo, GiveBackIdle) with no
// arbiter lock held, and the cache asks the arbiter to reclaim from other
// caches (ReclaimForGrow) only without mu and the pool's lock: no thread
// waits for another cache's lock while holding this one's.
#ifndef VATTN_SRC_KV_CACHE_IMPL_H_
#define VATTN_SRC_KV_CACHE_IMPL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "src/cache_geometry.h"
#include "src/extent_mapper.h"
#include "src/internal/mutex.h"
#include "src/map_ahead.h"
#include "src/memory_arbiter.h"
#include "src/physical_pool.h"
#include "src/placement.h"
#include "src/prefix_cache.h"
#include "src/slot.h"
#include "vattn/kv_cache.h"
#include "vattn/status.h"

namespace vattn {

struct KVCache::Impl final : ExtentMapperOwner, MapAheadClient {
  Impl(const KVCacheOptions& o, std::shared_ptr<Backend> b, CacheGeometry g)
      : opts(o),
        backend(std::move(b)),
        geo(std::move(g)),
        worker(o.max_slots),
        slots(static_cast<std::size_t>(o.max_slots)),
        placement(o.max_slots),
        tallies(static_cast<std::size_t>(o.max_slots)) {}

  absl::Status Init();
  void Shutdown();

  // ---- Checks -----------------------------------------------------------
  absl::Status CheckSlot(int slot) const {
    if (slot < 0 || slot >= opts.max_slots) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "slot %d is out of range [0, %d)", slot, opts.max_slots));
    }
    return absl::OkStatus();
  }
  absl::Status CheckActiveLocked(int slot) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    VATTN_RETURN_IF_ERROR(CheckSlot(slot));
    if (!slots[static_cast<std::size_t>(slot)].active()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "slot %d is not active (never allocated or freed)", slot));
    }
    return absl::OkStatus();
  }
  absl::Status CheckTokens(std::int64_t tokens) const {
    if (tokens < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("tokens must be >= 0, got %d", tokens));
    }
    if (tokens > opts.max_tokens) {
      return absl::OutOfRangeError(absl::StrFormat(
          "%d tokens exceed max_tokens %d", tokens, opts.max_tokens));
    }
    return absl::OkStatus();
  }

  // ---- Slot transitions (each keeps placement in step) --------------------
  Slot& At(int slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return slots[static_cast<std::size_t>(slot)];
  }
  void SetOpLocked(int slot, SlotOp op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    At(slot).set_op(op);
    placement.OnSlotOp(slot, op);
    if (op == SlotOp::kNone) state_cv.SignalAll();
  }
  void WaitNotBusyLocked(int slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    while (At(slot).busy()) state_cv.Wait(&mu);
  }
  // Adopts the slot's surplus until it backs `bytes` (no driver call).
  bool AdoptUpToLocked(int slot, std::int64_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    Slot& s = At(slot);
    bool adopted = false;
    while (s.backing_bytes() < bytes && s.AdoptNext()) {
      ++stats.adopted_extents;
      adopted = true;
    }
    if (adopted) BooksChangedLocked(slot);
    return adopted;
  }
  // The slot's extents, quarantine, backing or state changed: tells
  // placement and keeps the totals Stats() reports (O(1) there).
  void BooksChangedLocked(int slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    Slot& s = At(slot);
    placement.OnExtentsChanged(slot, s.extents(), s.backing_extents());
    Tally now;
    now.mapped = s.mapped_bytes();
    now.surplus = s.active() ? s.surplus_bytes() : 0;
    now.idle_with_memory = !s.active() && !s.extents().empty() ? 1 : 0;
    now.quarantined = static_cast<std::int64_t>(s.quarantine().size());
    for (const QuarantinedExtent& q : s.quarantine()) {
      now.quarantined_bytes += q.extent.bytes;
    }
    for (const Extent& x : s.extents()) {
      if (x.origin == ExtentOrigin::kExported) now.exported += x.bytes;
      if (x.origin == ExtentOrigin::kImported) now.imported += x.bytes;
    }
    Tally& was = tallies[static_cast<std::size_t>(slot)];
    totals.mapped += now.mapped - was.mapped;
    totals.surplus += now.surplus - was.surplus;
    totals.idle_with_memory += now.idle_with_memory - was.idle_with_memory;
    totals.quarantined += now.quarantined - was.quarantined;
    totals.quarantined_bytes += now.quarantined_bytes - was.quarantined_bytes;
    totals.exported += now.exported - was.exported;
    totals.imported += now.imported - was.imported;
    was = now;
  }
  // Sets an active slot's length, keeping the logical total.
  void SetLengthLocked(Slot& s, std::int64_t tokens)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    active_tokens.fetch_add(tokens - s.length(), std::memory_order_relaxed);
    s.set_length(tokens);
  }

  // ExtentMapperOwner.
  absl::StatusOr<std::vector<PhysicalHandle>> AcquireHandles(
      std::int64_t minimum, std::int64_t preferred,
      std::int64_t* bytes) override ABSL_LOCKS_EXCLUDED(mu);
  void SlotOpChanged(int slot, const Slot& s) override
      ABSL_NO_THREAD_SAFETY_ANALYSIS {  // The mapper holds mu.
    placement.OnSlotOp(slot, s.op());
  }
  void SlotExtentsChanged(int slot, const Slot&) override
      ABSL_NO_THREAD_SAFETY_ANALYSIS {  // The mapper holds mu.
    BooksChangedLocked(slot);
  }

  // ---- Mapping and reclamation --------------------------------------------
  // Makes the slot back `tokens`, adopting surplus or mapping one extent on
  // this thread (waiting first if another thread is mapping the slot). Sets
  // *mapped_here when this thread mapped. A failed call leaves the slot as
  // it found it.
  absl::Status EnsureBackedLocked(int slot, std::int64_t tokens,
                                  bool* mapped_here)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Retries every quarantined extent of slots that are not busy; returns
  // the bytes per region of the first extent it gave back to the pool (0
  // when none).
  std::int64_t RetryQuarantinesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Takes the last extent of the slot placement chooses back into the pool
  // and returns its size per region; 0 when no slot can give memory.
  // With need > 0 (bytes per region the caller must take back), the
  // victim is chosen by its last extent's size (Placement::ChooseVictim).
  absl::StatusOr<std::int64_t> ReclaimOne(std::int64_t need = 0)
      ABSL_LOCKS_EXCLUDED(mu);

  // ---- Shared budget and run-time budget (kv_cache_budget.cc) -------------
  // Registers with opts.arbiter, if any (Init, right after the pool is
  // made): the pool charges the shared budget, its own budget becomes the
  // cache's cap. InvalidArgument: another backend, a floor that does not
  // fit, a cap below one extent of every tensor.
  absl::Status AttachArbiter();
  // First thing in Shutdown: no more arbiter calls into this cache (waits
  // for those in flight). Call without mu.
  void DetachArbiter() ABSL_LOCKS_EXCLUDED(mu);
  // What AcquireHandles calls to make room for `need` bytes per region:
  // without an arbiter, ReclaimOne(need); with one, memory is taken where
  // the oldest idle memory is, across caches: ReclaimOne here, or another
  // cache destroys some (then returns kFreedElsewhere: try again). 0 when
  // nothing can be freed anywhere.
  static constexpr std::int64_t kFreedElsewhere = 1;  // Never a size.
  absl::StatusOr<std::int64_t> ReclaimForGrow(std::int64_t need)
      ABSL_LOCKS_EXCLUDED(mu);
  // The arbiter's calls (internal::ArbiterClient; the adaptor forwards).
  class ArbiterClientAdaptor;
  internal::ArbiterClient::Idle ArbiterIdleInfo() ABSL_LOCKS_EXCLUDED(mu);
  absl::StatusOr<std::int64_t> GiveBackIdle(std::int64_t bytes,
                                            std::int64_t keep_bytes)
      ABSL_LOCKS_EXCLUDED(mu);
  // Destroys idle memory until the cache holds at most `target` bytes
  // (never below keep_bytes); *destroyed gets the bytes destroyed.
  absl::Status TrimTo(std::int64_t target, std::int64_t keep_bytes,
                      std::int64_t* destroyed) ABSL_LOCKS_EXCLUDED(mu);
  // Releases the slot's fences that have completed; true when none is left.
  bool PruneFencesLocked(Slot& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Waits for (and releases) the slot's fences. The slot is busy; drops mu.
  absl::Status WaitFencesLocked(Slot& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  // ---- Map-ahead decisions -------------------------------------------------
  bool RunOnce() override ABSL_LOCKS_EXCLUDED(mu);
  absl::Duration IdleNap() override ABSL_LOCKS_EXCLUDED(mu);
  // One round of look-ahead mapping: true when it did something.
  bool MapAheadRoundLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Tops the pool up to the high water mark when below the low one.
  bool RefillPoolLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Bytes per region the thread keeps a slot mapped to: `ahead` tokens past
  // its length (or hint). Reads only LockFree<> fields.
  std::int64_t TargetBytes(const Slot& s, std::int64_t ahead) const {
    return geo.BytesFor(std::min<std::int64_t>(
        opts.max_tokens, std::max<std::int64_t>(s.length(), s.hint()) + ahead));
  }
  bool BehindBy(const Slot& s, std::int64_t ahead) const {
    if (!look_ahead || !s.active()) return false;
    return s.backing_bytes() < TargetBytes(s, ahead);
  }
  bool NeedsMapAhead(const Slot& s) const {
    return BehindBy(s, opts.map_ahead_tokens);
  }
  // Less than a quarter of the look-ahead is left: the thread must be woken
  // now. Step wakes it only then (a wake-up costs the caller a futex call
  // and, on a busy machine, a context switch); otherwise the thread wakes
  // itself when the closest slot is half-way through its look-ahead
  // (IdleNap), so on a steady workload Step never pays a wake-up.
  bool UrgentMapAhead(const Slot& s) const {
    return BehindBy(s, urgent_tokens);
  }
  void MarkIfDue(int slot, const Slot& s) {
    if (NeedsMapAhead(s)) worker.MarkDue(slot);
  }
  // Announces work to the thread; the caller wakes it once mu is dropped.
  void NoteWorkLocked(bool* wake) {
    worker.NoteWork();
    *wake = true;
  }

  // ---- Public calls' bodies, under mu; *wake asks the caller to wake the
  // thread once mu is dropped.
  absl::StatusOr<int> AllocSlotLocked(std::int64_t expected_tokens, bool* wake)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::Status FreeLocked(int slot, std::optional<Stream> fence)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::StatusOr<StepResult> StepLocked(absl::Span<const StepRequest> batch,
                                        bool* wake)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Step without the lock when every slot is backed; false to take the
  // slow path instead (nothing changed then).
  bool TryFastStep(absl::Span<const StepRequest> batch);
  // The slot, for Step's lock-free fast path: only LockFree<> fields may be
  // touched through it.
  Slot& FastPathSlot(int slot) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return slots[static_cast<std::size_t>(slot)];
  }
  // Step's input, checked before anything changes: slots and token counts
  // in range, no slot twice. Errors name the request's index.
  absl::Status CheckBatch(absl::Span<const StepRequest> batch) const;
  // A background attempt failed: counted, remembered for
  // WaitForBackgroundIdle, and the thread backs off (1 ms doubling to
  // 100 ms; a success resets it). No other call sees the error.
  void NoteBackgroundFailureLocked(absl::Status status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void NoteBackgroundSuccessLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    backoff_nanos = 0;
  }
  // Nanoseconds the thread still backs off for (0: not backing off).
  std::int64_t BackoffLeftLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  // ---- Prefix sharing (prefix_sharing.cc) ---------------------------------
  // The slot's memory holds shared or read-only extents a new request must
  // not write: unmap all of it (waiting for its fences). The slot is idle
  // and not busy; it stays so. On error some extents may be gone, the rest
  // still mapped, the books consistent.
  absl::Status ClearSharedLocked(int slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // The slot's request ended: the prefix it was started from loses a user.
  void PrefixSlotFreedLocked(int slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Reclamation's last resort: evicts least recently used cached prefixes
  // no request uses until some memory went back to the pool; returns the
  // bytes per region freed (0: nothing could be evicted).
  absl::StatusOr<std::int64_t> EvictPrefixForMemoryLocked()
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Teardown: forgets every cached prefix and gives back its memory and
  // the homes' reservation (errors are returned, the rest still goes).
  absl::Status ShutdownPrefixesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Bodies of the public calls.
  absl::Status KeepPrefixLocked(int slot, std::int64_t tokens,
                                std::uint64_t id, Stream stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::StatusOr<int> AllocWithPrefixLocked(std::uint64_t id,
                                            std::int64_t tokens,
                                            std::int64_t expected_tokens,
                                            Stream stream, bool* wake)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::StatusOr<int> ForkLocked(int slot, Stream stream, bool* wake)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::Status DropPrefixLocked(std::uint64_t id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Takes an idle slot for a request that maps shared memory from offset 0:
  // chosen as AllocSlot would (preferring one holding nothing), emptied,
  // and left busy (kMapping) for the caller. ResourceExhausted: every slot
  // is active.
  absl::StatusOr<int> TakeEmptySlotLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Maps `whole` (read-only) then one fresh extent covering [whole_end,
  // whole_end + minimum..preferred) into the busy, empty slot, copies
  // [whole_end, whole_end + copy_bytes) from `copy_src` (a slot or a home
  // index past max_slots) into it, and commits the lot to the slot's books;
  // all or nothing. `temp_src`, when set, is mapped (read-only) at copy_src
  // for the copy and unmapped after it completes.
  absl::Status ComposeLocked(int slot,
                             const std::vector<std::shared_ptr<SharedExtent>>&
                                 whole,
                             std::int64_t whole_end, std::int64_t minimum,
                             std::int64_t preferred, int copy_src,
                             std::int64_t copy_bytes, const Extent* temp_src,
                             Stream stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // The slot is busy with a composed request: activate it with length
  // `tokens` and hint `hint`.
  void ActivateComposedLocked(int slot, std::int64_t tokens, std::int64_t hint,
                              bool* wake) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Unmaps a prefix's tail from its home (waiting for its fences) and gives
  // the tail's handles and home back. On error the prefix keeps them.
  absl::Status UnmapTailLocked(CachedPrefix& p)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Gives back a removed prefix's references (the last ones pool the
  // handles); returns the bytes per region that went back to the pool.
  std::int64_t ReleasePrefixLocked(CachedPrefix& p)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Undoes a share this call made of a slot's own extent (its record has
  // only that slot's mapping): back to kOwn, read-only unless `writable`.
  void UnshareLocked(Extent& e, bool writable)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Reserves the homes' range at the first use. ResourceExhausted when
  // max_prefixes is 0.
  absl::Status EnsureHomesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  int HomeSlot(int home) const { return opts.max_slots + home; }

  // ---- Constant after construction ----------------------------------------
  const KVCacheOptions opts;
  const std::shared_ptr<Backend> backend;
  const CacheGeometry geo;
  bool look_ahead = false;  // The thread runs and map_ahead_tokens > 0.
  // The look-ahead left (tokens) below which Step wakes the thread.
  std::int64_t urgent_tokens = 1;
  DevicePtr base = 0;
  // Written by Init, then only under mu (KVCache::SetBudget).
  std::int64_t budget = 0;
  // With opts.arbiter: the cache's entry in the arbiter's books (shared
  // with the pool) and the arbiter's view of the cache.
  std::shared_ptr<internal::ArbiterMember> arbiter_member;
  std::unique_ptr<internal::ArbiterClient> arbiter_client;
  std::unique_ptr<PhysicalPool> pool;
  std::unique_ptr<ExtentMapper> mapper;
  MapAheadWorker worker;

  // ---- Guarded by mu ------------------------------------------------------
  mutable internal::Mutex mu;
  internal::CondVar state_cv;  // A slot stopped being busy.
  std::vector<Slot> slots ABSL_GUARDED_BY(mu);
  Placement placement ABSL_GUARDED_BY(mu);
  int active_count ABSL_GUARDED_BY(mu) = 0;
  CacheStats stats ABSL_GUARDED_BY(mu);  // Counters; the rest is derived.
  bool shutting_down ABSL_GUARDED_BY(mu) = false;
  // The last background failure since WaitForBackgroundIdle last looked.
  absl::Status last_background_error ABSL_GUARDED_BY(mu);
  std::int64_t backoff_nanos ABSL_GUARDED_BY(mu) = 0;
  std::int64_t backoff_until ABSL_GUARDED_BY(mu) = 0;  // Steady clock, ns.
  // Each slot's share of the totals, as BooksChangedLocked last counted it.
  struct Tally {
    std::int64_t mapped = 0;  // Per region, as the rest.
    std::int64_t surplus = 0;
    std::int64_t idle_with_memory = 0;
    std::int64_t quarantined = 0;
    std::int64_t quarantined_bytes = 0;
    std::int64_t exported = 0;  // kExported / kImported extents' bytes.
    std::int64_t imported = 0;
  };
  std::vector<Tally> tallies ABSL_GUARDED_BY(mu);
  Tally totals ABSL_GUARDED_BY(mu);
  PrefixCache prefixes ABSL_GUARDED_BY(mu);
  DevicePtr home_base ABSL_GUARDED_BY(mu) = 0;  // 0: not reserved yet.
  std::size_t home_bytes ABSL_GUARDED_BY(mu) = 0;
  // Sum of the slots' lengths (Step's fast path adds to it without mu).
  std::atomic<std::int64_t> active_tokens{0};
  std::atomic<std::int64_t> step_calls{0};
  // Foreground calls mapping right now: the thread does not start a pool
  // refill's create meanwhile (the driver serializes calls, so a miss
  // would queue behind it).
  std::atomic<int> foreground_maps{0};

  // ---- The map-ahead thread's own (touched only on the worker thread) ---
  struct DueSlot {
    std::int64_t margin;  // Tokens backed past the slot's length or hint.
    int slot;
  };
  StepPace pace;
  bool refilling = false;  // A pool refill is under way (RefillPoolLocked).
  // Reused by every round, so the thread allocates nothing per wake.
  std::vector<int> flagged_scratch;
  std::vector<DueSlot> due_scratch;
};

}  // namespace vattn

#endif  // VATTN_SRC_KV_CACHE_IMPL_H_
