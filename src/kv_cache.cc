// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The KV cache: slots, extents, both layouts, deferred reclamation and the
// map-ahead thread.
//
// Locking. One mutex (mu) guards the slots' books and the counters. Driver
// calls never run under it: a thread that maps or unmaps a slot marks the
// slot busy, drops the lock for the driver calls, then takes it back to
// commit; others that need a busy slot wait on state_cv. Waiting cannot
// deadlock: a thread mapping a slot may wait only for a slot another thread
// is unmapping or zeroing (reclamation), and those threads wait for no slot.
// Step's fast path takes no lock at all: it reads and writes only the
// slots' Shared<> fields (see Slot) and flags look-ahead work in due_bits.
// Lock order: mu, then the PhysicalPool's lock (the pool never calls back);
// wake_mu is taken alone.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_format.h"
#include "src/internal/mutex.h"
#include "src/physical_pool.h"
#include "vattn/kv_cache.h"
#include "vattn/status.h"

namespace vattn {

using internal::CondVar;
using internal::Mutex;
using internal::MutexLock;

namespace {

std::int64_t RoundUp(std::int64_t x, std::int64_t to) {
  return (x + to - 1) / to * to;
}

std::int64_t FloorPowerOfTwo(std::int64_t x) {
  std::int64_t p = 1;
  while (p <= x / 2) p *= 2;
  return p;
}

// How often the map-ahead thread looks for work while requests are active.
constexpr absl::Duration kWorkerPollInterval = absl::Microseconds(500);

std::int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A slot field that Step's fast path reads without the cache lock. Writers
// hold the lock (Step also raises its own slots' lengths without it); a
// release store after the extent is committed lets a lock-free reader that
// sees the new size rely on the mapping behind it.
template <typename T>
class Shared {
 public:
  Shared() = default;
  Shared(const Shared& other) : value_(other.Get()) {}
  Shared& operator=(const Shared& other) {
    Set(other.Get());
    return *this;
  }
  T Get() const { return value_.load(std::memory_order_acquire); }
  void Set(T v) { value_.store(v, std::memory_order_release); }
  operator T() const { return Get(); }  // NOLINT: reads like a plain field.
  Shared& operator=(T v) {
    Set(v);
    return *this;
  }
  Shared& operator+=(T d) {  // Single writer (under the lock).
    Set(Get() + d);
    return *this;
  }
  Shared& operator-=(T d) {
    Set(Get() - d);
    return *this;
  }

 private:
  std::atomic<T> value_{};
};

}  // namespace

struct KVCache::Impl {
  // One physical extent: the same byte range [offset, offset + bytes) of
  // every region of a slot, one handle per region.
  struct Extent {
    std::int64_t offset = 0;
    std::int64_t bytes = 0;
    absl::InlinedVector<PhysicalHandle, 2> handles;
  };

  // Fields of type Shared<> may be read without mu (Step's fast path); the
  // rest are guarded by mu.
  // One cache line (or more) per slot, the fields Step's fast path touches
  // first: neighbouring slots never share a line, so the thread working on
  // one slot does not slow Step's writes to the next.
  struct alignas(64) Slot {
    // ---- Read (and length/used written) by Step without the lock.
    Shared<bool> active;
    // Holds bytes written by an earlier request (for zero_on_reuse).
    Shared<bool> used;
    Shared<std::int64_t> length;  // Logical tokens.
    Shared<std::int64_t> hint;    // AllocSlot's expected_tokens.
    // The slot's extents, in offset order, hold `held` bytes per region. The
    // first `adopted` of them (`mapped` bytes) back the request; the rest
    // are surplus left by an earlier request: still mapped, adopted without
    // a driver call when the request grows into them, and reclaimable under
    // pressure because nothing relies on them. Step's lock-free fast path
    // reads only `mapped`. For an idle slot every extent counts as adopted.
    Shared<std::int64_t> mapped;
    // ---- Guarded by mu.
    // A thread is mapping or unmapping this slot's extents without the lock.
    bool busy = false;
    // The busy thread is mapping a new extent (it may itself be waiting for
    // memory, so reclamation must not wait for it).
    bool mapping = false;
    int adopted = 0;
    std::int64_t held = 0;
    std::vector<Extent> extents;
    std::uint64_t freed_seq = 0;  // Order of Free, for LRU reclamation.
    // Fences of GPU work that may still read the slot's memory.
    std::vector<FenceId> fences;
  };

  Impl(const KVCacheOptions& o, std::shared_ptr<Backend> b)
      : opts(o), backend(std::move(b)) {}

  // ---- Geometry (constant after Init) ----------------------------------
  std::int64_t RegionAddress(int slot, int region) const {
    return static_cast<std::int64_t>(base) +
           (static_cast<std::int64_t>(region) * opts.max_slots + slot) *
               region_stride;
  }
  // Bytes per region that back `tokens`.
  std::int64_t BytesFor(std::int64_t tokens) const {
    return std::min(region_stride, RoundUp(tokens * token_bytes, granularity));
  }
  std::int64_t BackedTokens(std::int64_t mapped_bytes) const {
    return std::min<std::int64_t>(opts.max_tokens, mapped_bytes / token_bytes);
  }
  // Size of the next extent for a slot with `mapped` bytes that needs at
  // least `deficit` more: one extent covering the deficit, and for decode
  // growth an extent that doubles the slot, within [min_extent, max_extent].
  std::int64_t ExtentSize(std::int64_t mapped, std::int64_t deficit) const {
    std::int64_t growth = min_extent;
    if (mapped > 0) {
      growth = std::clamp(FloorPowerOfTwo(mapped), min_extent, max_extent);
    }
    const std::int64_t size =
        std::max(RoundUp(deficit, granularity), growth);
    return std::min(size, region_stride - mapped);
  }

  absl::Status Init();
  void Shutdown();

  // ---- Slot checks ------------------------------------------------------------
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
    if (!slots[slot].active) {
      return absl::FailedPreconditionError(
          absl::StrFormat("slot %d is not active (never allocated or freed)",
                          slot));
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

  // ---- Mapping ------------------------------------------------------------------
  // Makes sure the slot backs `tokens`, mapping one extent on this thread if
  // needed (waiting first if another thread is mapping the slot). Sets
  // *mapped_here when this thread mapped. Drops mu around driver calls.
  absl::Status EnsureBackedLocked(int slot, std::int64_t tokens,
                                  bool* mapped_here)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Maps one extent of `preferred` bytes (or, under budget pressure, of
  // `minimum`) at `offset` of every region of the slot. The slot is busy and
  // mu is not held. On error nothing is left mapped or held.
  absl::Status MapExtent(int slot, std::int64_t offset, std::int64_t preferred,
                         std::int64_t minimum, Extent* extent)
      ABSL_LOCKS_EXCLUDED(mu);
  // Handles for one extent, reclaiming idle slots' memory when the budget is
  // short. mu is not held.
  // Handles for one extent of between `minimum` and `preferred` bytes per
  // region (the size chosen goes to *bytes); see the policy in the body.
  absl::StatusOr<std::vector<PhysicalHandle>> AcquireHandles(
      std::int64_t minimum, std::int64_t preferred, std::int64_t* bytes)
      ABSL_LOCKS_EXCLUDED(mu);
  // Unmaps an extent's handles at `offset` of the slot's regions; on error
  // maps back what it unmapped. mu is not held.
  absl::Status UnmapExtent(int slot, const Extent& extent)
      ABSL_LOCKS_EXCLUDED(mu);
  // Takes the last extent of the least recently freed idle slot back into
  // the pool and returns its size per region; 0 when no idle slot holds
  // memory. Waits for an idle slot another thread is unmapping or zeroing
  // (never for one being mapped: that thread may itself wait for memory).
  absl::StatusOr<std::int64_t> ReclaimOne() ABSL_LOCKS_EXCLUDED(mu);
  // Waits for (and releases) the slot's fences. The slot is busy; drops mu.
  absl::Status WaitFencesLocked(Slot& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Releases fences that have completed.
  void PruneFencesLocked(Slot& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Unmaps every extent of a slot that is busy (Free without deferral,
  // destruction).
  absl::Status UnmapAllLocked(int slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void WaitNotBusyLocked(int slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    while (slots[slot].busy) state_cv.Wait(&mu);
  }
  // Adopts the slot's next surplus extent (no driver call). False when it
  // has none.
  bool AdoptNextLocked(Slot& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (s.adopted >= static_cast<int>(s.extents.size())) return false;
    s.mapped += s.extents[static_cast<std::size_t>(s.adopted)].bytes;
    ++s.adopted;
    ++stats.adopted_extents;
    return true;
  }
  // Appends a newly mapped extent to a slot without surplus; the release
  // store of `mapped` publishes it to Step's fast path.
  void AppendExtentLocked(Slot& s, Extent extent)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    s.held += extent.bytes;
    ++s.adopted;
    s.extents.push_back(std::move(extent));
    s.mapped += s.extents.back().bytes;
    ++stats.extents_mapped;
  }
  // Takes the last extent off the slot's books (an idle slot's, or an active
  // slot's surplus); RestoreExtentLocked undoes it.
  Extent PopExtentLocked(Slot& s, bool* was_adopted)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    Extent extent = std::move(s.extents.back());
    s.extents.pop_back();
    s.held -= extent.bytes;
    *was_adopted = s.adopted > static_cast<int>(s.extents.size());
    if (*was_adopted) {
      --s.adopted;
      s.mapped -= extent.bytes;
    }
    return extent;
  }
  void RestoreExtentLocked(Slot& s, Extent extent, bool was_adopted)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    s.held += extent.bytes;
    if (was_adopted) {
      ++s.adopted;
      s.mapped += extent.bytes;
    }
    s.extents.push_back(std::move(extent));
  }

  // ---- Public calls' bodies, under mu; *wake asks the caller to wake the
  // thread once mu is dropped.
  absl::StatusOr<int> AllocSlotLocked(std::int64_t expected_tokens,
                                      bool* wake)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  absl::StatusOr<StepResult> StepLocked(absl::Span<const StepRequest> batch,
                                        bool* wake)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  // ---- Background thread ------------------------------------------------------
  void WorkerLoop();
  // One unit of map-ahead work, if any is due: true when it did something.
  bool WorkerMapAheadOnceLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // True when the thread has look-ahead mapping to do for the slot. Reads
  // only Shared<> fields: callable without mu.
  bool NeedsMapAhead(const Slot& s) const {
    return BehindBy(s, opts.map_ahead_tokens);
  }
  // True when less than a quarter of the look-ahead is left: the thread,
  // which also looks every kWorkerPollInterval while slots are active, must
  // be woken now. Step wakes it only then, because a wake-up costs the
  // caller a futex call and, on a busy machine, a context switch (~14 us a
  // step at batch 256 on the 2-core CI machine when Step woke it on every
  // call).
  bool UrgentMapAhead(const Slot& s) const {
    return BehindBy(s, std::max<std::int64_t>(1, opts.map_ahead_tokens / 4));
  }
  // Bytes per region the thread keeps a slot mapped to.
  std::int64_t LookAheadTarget(const Slot& s) const {
    return BytesFor(std::min<std::int64_t>(
        opts.max_tokens,
        std::max<std::int64_t>(s.length, s.hint) + opts.map_ahead_tokens));
  }
  bool BehindBy(const Slot& s, std::int64_t ahead) const {
    if (!worker_running || opts.map_ahead_tokens <= 0 || !s.active) {
      return false;
    }
    const std::int64_t want = std::min<std::int64_t>(
        opts.max_tokens, std::max<std::int64_t>(s.length, s.hint) + ahead);
    return s.mapped < BytesFor(want);
  }
  // Records new work for the thread; the caller then calls WakeWorker()
  // after dropping mu, so the woken thread does not block on it at once.
  void NoteWork() { work_generation.fetch_add(1, std::memory_order_seq_cst); }
  // Flags a slot for the thread when it has look-ahead work. Reads only the
  // slot's Shared<> fields; writes the bitmap only when the bit is clear.
  void MarkIfDue(int slot, const Slot& s) {
    if (!NeedsMapAhead(s)) return;
    std::atomic<std::uint64_t>& word = due_bits[static_cast<std::size_t>(slot / 64)];
    const std::uint64_t bit = std::uint64_t{1} << (slot % 64);
    if ((word.load(std::memory_order_relaxed) & bit) == 0) {
      word.fetch_or(bit, std::memory_order_release);
    }
  }
  // Wakes the thread if it sleeps. Lock-free unless it does: then wake_mu
  // is taken once, so a thread about to sleep cannot miss the new work.
  void WakeWorker() {
    if (worker_sleeping.load(std::memory_order_seq_cst)) {
      { MutexLock lock(&wake_mu); }
      work_cv.Signal();
    }
  }
  // The slot, for Step's lock-free fast path: only Shared<> fields may be
  // touched through it.
  Slot& SlotForFastPath(int slot) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return slots[static_cast<std::size_t>(slot)];
  }
  // Step without the lock when every slot is backed; false to take the
  // slow path instead (nothing changed then).
  bool TryFastStep(absl::Span<const StepRequest> batch);

  // ---- Constant after construction ----------------------------------------
  const KVCacheOptions opts;
  const std::shared_ptr<Backend> backend;
  std::int64_t granularity = 0;
  std::int64_t elem_bytes = 0;
  int num_regions = 0;          // 1 token-major; 2 * layers layer-major.
  std::int64_t token_bytes = 0;  // Bytes per token per region.
  std::int64_t region_stride = 0;  // Virtual bytes per slot per region.
  std::int64_t min_extent = 0;
  std::int64_t max_extent = 0;
  DevicePtr base = 0;
  std::size_t reserved_bytes = 0;
  std::unique_ptr<PhysicalPool> pool;
  std::thread worker;
  // Driver calls this cache made, counted where they happen (without mu).
  std::atomic<std::int64_t> map_calls{0};
  std::atomic<std::int64_t> unmap_calls{0};

  // ---- Guarded by mu ----------------------------------------------------------
  mutable Mutex mu;
  CondVar state_cv;  // A slot stopped being busy; the worker went idle.
  // The thread sleeps on work_cv under wake_mu (not mu), so waking it never
  // needs the cache lock.
  Mutex wake_mu;
  CondVar work_cv;
  std::atomic<std::uint64_t> work_generation{0};
  std::atomic<bool> worker_sleeping{false};
  std::atomic<bool> stop_worker{false};
  // Set with background_error, so Step's fast path can see it lock-free.
  std::atomic<bool> has_background_error{false};
  std::atomic<std::int64_t> step_calls{0};
  // One bit per slot that has look-ahead work, set by the callers (Step,
  // Grow, AllocSlot) and taken by the thread, so the thread reads only those
  // slots: a scan of every slot would make Step's next write to each of them
  // miss in the cache. Sized in Init.
  std::unique_ptr<std::atomic<std::uint64_t>[]> due_bits;
  int due_words = 0;
  std::vector<Slot> slots ABSL_GUARDED_BY(mu);
  std::uint64_t free_seq ABSL_GUARDED_BY(mu) = 0;
  int active_count ABSL_GUARDED_BY(mu) = 0;
  CacheStats stats ABSL_GUARDED_BY(mu);  // Counters kept here; the rest is
                                         // derived in Stats().
  bool shutting_down ABSL_GUARDED_BY(mu) = false;
  absl::Status background_error ABSL_GUARDED_BY(mu);
  std::uint64_t idle_generation ABSL_GUARDED_BY(mu) = 0;
  bool worker_running = false;  // Constant after Init.
};

// ---------------------------------------------------------------------------
// Construction and destruction.

absl::Status KVCache::Impl::Init() {
  const BackendCapabilities& caps = backend->capabilities();
  granularity = static_cast<std::int64_t>(caps.granularity);
  elem_bytes = static_cast<std::int64_t>(DTypeSize(opts.dtype));
  const std::int64_t row =
      static_cast<std::int64_t>(opts.num_kv_heads) * opts.head_dim * elem_bytes;
  if (opts.layout == Layout::kTokenMajor) {
    num_regions = 1;
    token_bytes = row * 2 * opts.num_layers;
  } else {
    num_regions = 2 * opts.num_layers;
    token_bytes = row;
  }
  region_stride = RoundUp(opts.max_tokens * token_bytes, granularity);
  const long double total = static_cast<long double>(region_stride) *
                            opts.max_slots * num_regions;
  if (total > static_cast<long double>(caps.max_reservation_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions: the cache needs %.0Lf bytes of virtual space "
        "(max_slots %d x max_tokens %d x %d bytes per token), more than "
        "backend %s can reserve (max_reservation_bytes %d)",
        total, opts.max_slots, opts.max_tokens, token_bytes * num_regions,
        caps.name, caps.max_reservation_bytes));
  }
  reserved_bytes = static_cast<std::size_t>(total);

  min_extent = std::max(
      granularity,
      RoundUp(static_cast<std::int64_t>(opts.min_extent_bytes), granularity));
  // The cap in bytes if given, else max_extent_tokens' worth; never below
  // the smallest extent.
  const std::int64_t cap =
      opts.max_extent_bytes != 0
          ? static_cast<std::int64_t>(opts.max_extent_bytes)
          : opts.max_extent_tokens * token_bytes;
  max_extent = std::max(min_extent, cap / granularity * granularity);

  std::int64_t budget = static_cast<std::int64_t>(opts.memory_budget_bytes);
  if (budget == 0) {
    budget = caps.physical_memory_bytes > 0
                 ? static_cast<std::int64_t>(caps.physical_memory_bytes)
                 : std::numeric_limits<std::int64_t>::max() / 4;
  }
  if (budget < granularity * num_regions) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.memory_budget_bytes (%d) cannot hold one extent of "
        "every tensor (%d bytes)",
        budget, granularity * num_regions));
  }

  VATTN_ASSIGN_OR_RETURN(base, backend->Reserve(reserved_bytes));
  pool = std::make_unique<PhysicalPool>(backend, budget);
  {
    MutexLock lock(&mu);
    slots.resize(static_cast<std::size_t>(opts.max_slots));
    due_words = (opts.max_slots + 63) / 64;
    due_bits = std::make_unique<std::atomic<std::uint64_t>[]>(
        static_cast<std::size_t>(due_words));
    stats.budget_bytes = budget;
  }
  if (opts.prealloc_handles > 0) {
    const std::int64_t size =
        opts.prealloc_handle_bytes == 0
            ? min_extent
            : RoundUp(static_cast<std::int64_t>(opts.prealloc_handle_bytes),
                      granularity);
    if (size * opts.prealloc_handles > budget) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KVCacheOptions.prealloc_handles: %d handles of %d bytes exceed "
          "the %d-byte budget",
          opts.prealloc_handles, size, budget));
    }
    absl::StatusOr<int> made =
        pool->Fill(static_cast<std::size_t>(size), opts.prealloc_handles);
    if (!made.ok()) return made.status();
  }
  if (opts.map_ahead_tokens > 0 || opts.pool_high_water > 0) {
    worker_running = true;
    worker = std::thread([this] { WorkerLoop(); });
  }
  return absl::OkStatus();
}

void KVCache::Impl::Shutdown() {
  {
    MutexLock lock(&mu);
    shutting_down = true;
    state_cv.SignalAll();
  }
  stop_worker.store(true, std::memory_order_seq_cst);
  {
    MutexLock lock(&wake_mu);
    work_cv.SignalAll();
  }
  if (worker.joinable()) worker.join();
  MutexLock lock(&mu);
  for (int i = 0; i < static_cast<int>(slots.size()); ++i) {
    WaitNotBusyLocked(i);
    Slot& s = slots[i];
    s.busy = true;
    // Errors cannot be reported from a destructor; the backend takes back
    // whatever is left when it is destroyed.
    (void)WaitFencesLocked(s);
    (void)UnmapAllLocked(i);
    s.busy = false;
  }
  {
    mu.Unlock();
    if (pool) {
      (void)pool->DestroyIdle();
      pool.reset();
    }
    if (base != 0) (void)backend->Release(base, reserved_bytes);
    mu.Lock();
  }
}

// ---------------------------------------------------------------------------
// Fences.

void KVCache::Impl::PruneFencesLocked(Slot& s) {
  auto it = s.fences.begin();
  while (it != s.fences.end()) {
    absl::StatusOr<bool> done = backend->FenceDone(*it);
    if (done.ok() && *done) {
      (void)backend->ReleaseFence(*it);
      it = s.fences.erase(it);
    } else {
      ++it;
    }
  }
}

absl::Status KVCache::Impl::WaitFencesLocked(Slot& s) {
  PruneFencesLocked(s);
  if (s.fences.empty()) return absl::OkStatus();
  std::vector<FenceId> fences = s.fences;
  ++stats.fence_waits;
  absl::Status status;
  {
    mu.Unlock();
    for (FenceId f : fences) {
      status.Update(backend->WaitFence(f));
    }
    mu.Lock();
  }
  if (!status.ok()) return status;
  for (FenceId f : s.fences) (void)backend->ReleaseFence(f);
  s.fences.clear();
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Mapping and reclamation.

absl::StatusOr<std::vector<PhysicalHandle>> KVCache::Impl::AcquireHandles(
    std::int64_t minimum, std::int64_t preferred, std::int64_t* bytes) {
  // 1. Without taking memory from anyone: the growth extent, else the
  //    minimum. A larger extent is speculative and never evicts idle slots.
  for (std::int64_t size : {preferred, minimum}) {
    absl::StatusOr<std::vector<PhysicalHandle>> handles = pool->Acquire(
        static_cast<std::size_t>(size), num_regions, /*quiet=*/true);
    if (handles.ok() ||
        handles.status().code() != absl::StatusCode::kResourceExhausted) {
      *bytes = size;
      return handles;
    }
    if (minimum == preferred) break;
  }
  // 2. Reclaim idle slots' extents, one at a time. A reclaimed extent whose
  //    size lies in [minimum, preferred] is mapped as it is (Unmap + Map: no
  //    destroy, no create); otherwise the pool destroys idle handles to make
  //    room for the minimum.
  for (;;) {
    absl::StatusOr<std::int64_t> reclaimed = ReclaimOne();
    if (!reclaimed.ok()) return reclaimed.status();
    if (*reclaimed >= minimum && *reclaimed <= preferred) {
      absl::StatusOr<std::vector<PhysicalHandle>> handles = pool->Acquire(
          static_cast<std::size_t>(*reclaimed), num_regions, /*quiet=*/true);
      if (handles.ok()) {
        *bytes = *reclaimed;
        return handles;
      }
    }
    absl::StatusOr<std::vector<PhysicalHandle>> handles = pool->Acquire(
        static_cast<std::size_t>(minimum), num_regions,
        /*quiet=*/*reclaimed != 0);
    if (handles.ok() || *reclaimed == 0 ||
        handles.status().code() != absl::StatusCode::kResourceExhausted) {
      *bytes = minimum;
      return handles;
    }
  }
}

absl::Status KVCache::Impl::UnmapExtent(int slot, const Extent& extent) {
  for (int r = 0; r < num_regions; ++r) {
    const DevicePtr va =
        static_cast<DevicePtr>(RegionAddress(slot, r) + extent.offset);
    absl::Status status =
        backend->Unmap(va, static_cast<std::size_t>(extent.bytes));
    if (status.ok()) unmap_calls.fetch_add(1, std::memory_order_relaxed);
    if (!status.ok()) {
      // Put back what this call unmapped so the extent stays whole.
      for (int back = 0; back < r; ++back) {
        const DevicePtr bva =
            static_cast<DevicePtr>(RegionAddress(slot, back) + extent.offset);
        absl::Status remap = backend->Map(bva, extent.handles[back]);
        if (remap.ok()) map_calls.fetch_add(1, std::memory_order_relaxed);
        if (!remap.ok()) {
          return absl::InternalError(absl::StrFormat(
              "slot %d: unmapping an extent failed (%s) and mapping back "
              "region %d failed too (%s); the cache is inconsistent",
              slot, status.ToString(), back, remap.ToString()));
        }
      }
      return status;
    }
  }
  return absl::OkStatus();
}

absl::Status KVCache::Impl::MapExtent(int slot, std::int64_t offset,
                                      std::int64_t preferred,
                                      std::int64_t minimum, Extent* extent) {
  std::int64_t bytes = 0;
  absl::StatusOr<std::vector<PhysicalHandle>> handles =
      AcquireHandles(minimum, preferred, &bytes);
  if (!handles.ok()) {
    return absl::Status(
        handles.status().code(),
        absl::StrFormat("slot %d: cannot back %d more bytes per tensor: %s",
                        slot, minimum, handles.status().message()));
  }
  extent->offset = offset;
  extent->bytes = bytes;
  extent->handles.assign(handles->begin(), handles->end());
  int mapped = 0;
  absl::Status status;
  for (; mapped < num_regions; ++mapped) {
    const DevicePtr va =
        static_cast<DevicePtr>(RegionAddress(slot, mapped) + offset);
    status = backend->Map(va, extent->handles[mapped]);
    if (!status.ok()) break;
    map_calls.fetch_add(1, std::memory_order_relaxed);
  }
  if (status.ok() && opts.zero_on_reuse) {
    for (int r = 0; r < num_regions && status.ok(); ++r) {
      status = backend->Zero(
          static_cast<DevicePtr>(RegionAddress(slot, r) + offset),
          static_cast<std::size_t>(bytes));
    }
  }
  if (!status.ok()) {
    for (int r = 0; r < mapped; ++r) {
      if (backend
              ->Unmap(static_cast<DevicePtr>(RegionAddress(slot, r) + offset),
                      static_cast<std::size_t>(bytes))
              .ok()) {
        unmap_calls.fetch_add(1, std::memory_order_relaxed);
      }
    }
    pool->Release(std::move(*handles), static_cast<std::size_t>(bytes));
    return status;
  }
  return absl::OkStatus();
}

absl::Status KVCache::Impl::EnsureBackedLocked(int slot, std::int64_t tokens,
                                               bool* mapped_here) {
  Slot& s = slots[slot];
  const std::int64_t need = BytesFor(tokens);
  // A failed call leaves the slot as it found it: surplus it adopted on the
  // way goes back to being surplus.
  const int adopted_before = s.adopted;
  const std::int64_t mapped_before = s.mapped;
  while (s.mapped < need) {
    // The lock is dropped below: another thread may free the slot meanwhile.
    if (!s.active) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "slot %d was freed by another thread while it was being grown",
          slot));
    }
    if (s.busy) {
      state_cv.Wait(&mu);
      continue;
    }
    if (AdoptNextLocked(s)) continue;  // Already mapped: no driver call.
    const std::int64_t offset = s.mapped;
    const std::int64_t deficit = need - offset;
    const std::int64_t preferred = ExtentSize(offset, deficit);
    const std::int64_t minimum = RoundUp(deficit, granularity);
    s.busy = true;
    s.mapping = true;
    Extent extent;
    absl::Status status;
    {
      mu.Unlock();
      status = MapExtent(slot, offset, preferred, minimum, &extent);
      mu.Lock();
    }
    s.busy = false;
    s.mapping = false;
    state_cv.SignalAll();
    if (!status.ok()) {
      // Nothing was appended (a map that succeeds covers the need), and
      // reclamation only ever takes extents past the adopted ones.
      if (s.active &&
          static_cast<std::size_t>(adopted_before) <= s.extents.size()) {
        s.adopted = adopted_before;
        s.mapped = mapped_before;
      }
      return status;
    }
    AppendExtentLocked(s, std::move(extent));
    if (mapped_here != nullptr) *mapped_here = true;
  }
  if (!s.active) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "slot %d was freed by another thread while it was being grown", slot));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::int64_t> KVCache::Impl::ReclaimOne() {
  MutexLock lock(&mu);
  for (;;) {
    // In order: the least recently freed idle slot whose fences completed;
    // the largest surplus of an active slot whose fences (an earlier
    // request's) completed; then the same two that must wait on the GPU.
    int idle_ready = -1;
    int idle_oldest = -1;
    int surplus_ready = -1;
    int surplus_any = -1;
    bool others_unmapping = false;
    auto surplus = [this](int i) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return slots[i].held - slots[i].mapped;
    };
    for (int i = 0; i < static_cast<int>(slots.size()); ++i) {
      Slot& s = slots[i];
      if (s.extents.empty()) continue;
      if (s.busy) {
        others_unmapping = others_unmapping || (!s.active && !s.mapping);
        continue;
      }
      if (s.active && s.adopted == static_cast<int>(s.extents.size())) {
        continue;  // Everything it holds backs its request.
      }
      PruneFencesLocked(s);
      const bool ready = s.fences.empty();
      if (!s.active) {
        if (idle_oldest < 0 || s.freed_seq < slots[idle_oldest].freed_seq) {
          idle_oldest = i;
        }
        if (ready && (idle_ready < 0 ||
                      s.freed_seq < slots[idle_ready].freed_seq)) {
          idle_ready = i;
        }
      } else {
        if (surplus_any < 0 || surplus(i) > surplus(surplus_any)) {
          surplus_any = i;
        }
        if (ready && (surplus_ready < 0 || surplus(i) > surplus(surplus_ready))) {
          surplus_ready = i;
        }
      }
    }
    int victim = idle_ready;
    if (victim < 0) victim = surplus_ready;
    if (victim < 0) victim = idle_oldest;
    if (victim < 0) victim = surplus_any;
    if (victim < 0) {
      // Memory another thread is taking back (or zeroing) will be free in a
      // moment: wait for it rather than fail.
      if (!others_unmapping) return 0;
      state_cv.Wait(&mu);
      continue;
    }
    Slot& s = slots[victim];
    s.busy = true;
    absl::Status status = WaitFencesLocked(s);
    if (!status.ok()) {
      s.busy = false;
      state_cv.SignalAll();
      return status;
    }
    bool was_adopted = false;
    Extent extent = PopExtentLocked(s, &was_adopted);
    {
      mu.Unlock();
      status = UnmapExtent(victim, extent);
      mu.Lock();
    }
    if (!status.ok()) {
      RestoreExtentLocked(s, std::move(extent), was_adopted);
      s.busy = false;
      state_cv.SignalAll();
      return status;
    }
    stats.reclaimed_bytes += extent.bytes * num_regions;
    ++stats.reclaimed_extents;
    std::vector<PhysicalHandle> handles(extent.handles.begin(),
                                        extent.handles.end());
    pool->Release(std::move(handles), static_cast<std::size_t>(extent.bytes));
    s.busy = false;
    state_cv.SignalAll();
    return extent.bytes;
  }
}

absl::Status KVCache::Impl::UnmapAllLocked(int slot) {
  Slot& s = slots[slot];
  while (!s.extents.empty()) {
    bool was_adopted = false;
    Extent extent = PopExtentLocked(s, &was_adopted);
    absl::Status status;
    {
      mu.Unlock();
      status = UnmapExtent(slot, extent);
      mu.Lock();
    }
    if (!status.ok()) {
      RestoreExtentLocked(s, std::move(extent), was_adopted);
      return status;
    }
    std::vector<PhysicalHandle> handles(extent.handles.begin(),
                                        extent.handles.end());
    pool->Release(std::move(handles), static_cast<std::size_t>(extent.bytes));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// The map-ahead thread.

bool KVCache::Impl::WorkerMapAheadOnceLocked() {
  if (opts.map_ahead_tokens <= 0) return false;
  // The flagged slots, closest to running out first. (Reading every slot
  // here, or once per extent, made Step's next length write to each of
  // them miss in the cache: Step p50 at batch 512 went from 4 to 12 us.)
  struct Due {
    std::int64_t margin;
    int slot;
  };
  std::vector<Due> due;
  bool adopted_any = false;
  const std::uint64_t generation = work_generation.load();
  std::vector<int> flagged;
  for (int w = 0; w < due_words; ++w) {
    std::uint64_t bits =
        due_bits[static_cast<std::size_t>(w)].exchange(0, std::memory_order_acq_rel);
    while (bits != 0) {
      const int b = __builtin_ctzll(bits);
      bits &= bits - 1;
      flagged.push_back(w * 64 + b);
    }
  }
  for (int i : flagged) {
    Slot& s = slots[i];
    if (!s.active || s.busy) continue;
    const std::int64_t target = LookAheadTarget(s);
    // Surplus already mapped is looked ahead for free.
    while (s.mapped < target && AdoptNextLocked(s)) adopted_any = true;
    if (s.mapped >= target) continue;
    // A new request's prompt (the hint) is needed at its first Step.
    due.push_back({BackedTokens(s.mapped) -
                       std::max<std::int64_t>(s.length, s.hint),
                   i});
  }
  std::sort(due.begin(), due.end(), [](const Due& x, const Due& y) {
    return x.margin < y.margin;
  });
  bool did = adopted_any;
  for (std::size_t k = 0; k < due.size(); ++k) {
    const Due& d = due[k];
    // New work was announced (a new request's prompt, a slot nearly out of
    // look-ahead): scan again so it is ordered with the rest, keeping the
    // slots not done yet flagged.
    if (shutting_down || work_generation.load() != generation) {
      for (std::size_t rest = k; rest < due.size(); ++rest) {
        MarkIfDue(due[rest].slot, slots[due[rest].slot]);
      }
      break;
    }
    Slot& s = slots[d.slot];
    // The lock was dropped for earlier slots: look again.
    if (!s.active || s.busy) continue;
    const std::int64_t target = LookAheadTarget(s);
    while (s.mapped < target && AdoptNextLocked(s)) did = true;
    if (s.mapped >= target) continue;
    const std::int64_t offset = s.mapped;
    const std::int64_t deficit = target - offset;
    const std::int64_t preferred = ExtentSize(offset, deficit);
    s.busy = true;
    s.mapping = true;
    Extent extent;
    absl::Status status;
    {
      mu.Unlock();
      status = MapExtent(d.slot, offset, preferred,
                         RoundUp(deficit, granularity), &extent);
      mu.Lock();
    }
    s.busy = false;
    s.mapping = false;
    state_cv.SignalAll();
    if (status.ok()) {
      AppendExtentLocked(s, std::move(extent));
      ++stats.background_extents;
      did = true;
      continue;
    }
    if (status.code() != absl::StatusCode::kResourceExhausted) {
      // Unexpected: sticky, returned by the next foreground call.
      if (background_error.ok()) {
        background_error = status;
        has_background_error.store(true, std::memory_order_release);
      }
    }
    // Out of budget: looking ahead is best effort; the foreground maps (or
    // fails) when the memory is really needed. Stop until something changes.
    return false;
  }
  return did;
}

void KVCache::Impl::WorkerLoop() {
  MutexLock lock(&mu);
  while (!shutting_down) {
    const std::uint64_t generation = work_generation.load();
    bool did = false;
    if (background_error.ok()) {
      did = WorkerMapAheadOnceLocked();
      if (!did && opts.pool_high_water > 0 &&
          pool->IdleCount(static_cast<std::size_t>(max_extent)) <
              opts.pool_low_water) {
        absl::StatusOr<int> made;
        {
          mu.Unlock();
          made = pool->Fill(static_cast<std::size_t>(max_extent),
                            opts.pool_high_water);
          mu.Lock();
        }
        if (made.ok()) {
          stats.background_creates += *made;
          did = *made > 0;
        } else if (made.status().code() !=
                       absl::StatusCode::kResourceExhausted &&
                   background_error.ok()) {
          background_error = made.status();
          has_background_error.store(true, std::memory_order_release);
        }
      }
    }
    if (did) continue;
    idle_generation = generation;
    state_cv.SignalAll();
    // Sleep until woken, or look again after a short poll while requests are
    // active (Step wakes the thread only when a slot is nearly out of
    // look-ahead) and a long one otherwise (for work no call announced, such
    // as memory freed by a fence completing).
    // (A counter, not a scan: reading every slot's line here would make
    // Step's next write to each of them miss.)
    const absl::Duration nap =
        active_count > 0 ? kWorkerPollInterval : absl::Milliseconds(50);
    mu.Unlock();
    {
      MutexLock wake_lock(&wake_mu);
      worker_sleeping.store(true, std::memory_order_seq_cst);
      if (work_generation.load(std::memory_order_seq_cst) == generation &&
          !stop_worker.load()) {
        work_cv.WaitWithTimeout(&wake_mu, nap);
      }
      worker_sleeping.store(false, std::memory_order_relaxed);
    }
    mu.Lock();
  }
}

// ---------------------------------------------------------------------------
// Public API.

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
  auto impl = std::make_unique<Impl>(options, std::move(backend));
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
  if (wake) m.WakeWorker();
  return slot;
}

absl::StatusOr<int> KVCache::Impl::AllocSlotLocked(
    std::int64_t expected_tokens, bool* wake) {
  VATTN_RETURN_IF_ERROR(background_error);
  const std::int64_t want = BytesFor(std::max<std::int64_t>(1, expected_tokens));
  // A request placed in an idle slot must adopt its extents up to the one
  // that covers the hint (an extent cannot be split); what that one holds
  // beyond the hint is waste for the request's life. Extents past it stay
  // surplus: reclaimable, or adopted for free as the request grows.
  // The request will usually decode into that extent, so waste up to the
  // hint's own size (or one decode extent) is accepted.
  const std::int64_t waste_limit = std::max(max_extent, want);
  for (;;) {
    // Best fit: the idle slot that already maps most of the hint, among
    // those whose waste stays within the limit (fresh slots map nothing and
    // waste nothing); ties go to the smaller waste.
    int best = -1;
    std::int64_t best_gain = 0;
    std::int64_t best_waste = 0;
    bool any_busy = false;
    for (int i = 0; i < static_cast<int>(slots.size()); ++i) {
      const Slot& s = slots[i];
      if (s.active) continue;
      if (s.busy) {
        any_busy = true;
        continue;
      }
      std::int64_t through = 0;
      for (const Extent& e : s.extents) {
        if (through >= want) break;
        through += e.bytes;
      }
      const std::int64_t waste = through > want ? through - want : 0;
      const std::int64_t gain =
          waste > waste_limit ? -1 : std::min(through, want);
      if (best < 0 || gain > best_gain ||
          (gain == best_gain && waste < best_waste)) {
        best = i;
        best_gain = gain;
        best_waste = waste;
      }
    }
    if (best < 0) {
      if (any_busy) {
        state_cv.Wait(&mu);
        continue;
      }
      return absl::ResourceExhaustedError(absl::StrFormat(
          "all %d slots are active", opts.max_slots));
    }
    Slot& s = slots[best];
    if (opts.zero_on_reuse && s.used && s.held > 0) {
      s.busy = true;
      absl::Status status = WaitFencesLocked(s);
      const std::int64_t bytes = s.held;
      if (status.ok()) {
        mu.Unlock();
        for (int r = 0; r < num_regions && status.ok(); ++r) {
          status = backend->Zero(
              static_cast<DevicePtr>(RegionAddress(best, r)),
              static_cast<std::size_t>(bytes));
        }
        mu.Lock();
      }
      s.busy = false;
      state_cv.SignalAll();
      if (!status.ok()) return status;
      stats.zeroed_bytes += bytes * num_regions;
    }
    if (s.held > 0) ++stats.reuse_hits;
    // Adopt the extents the hint needs; the rest is surplus.
    const std::int64_t hinted = BytesFor(expected_tokens);
    std::int64_t adopted_bytes = 0;
    int adopted = 0;
    while (adopted < static_cast<int>(s.extents.size()) &&
           adopted_bytes < hinted) {
      adopted_bytes += s.extents[static_cast<std::size_t>(adopted)].bytes;
      ++adopted;
    }
    s.adopted = adopted;
    s.mapped = adopted_bytes;
    s.active = true;
    ++active_count;
    s.used = false;
    s.length = 0;
    s.hint = expected_tokens;
    PruneFencesLocked(s);
    if (NeedsMapAhead(s)) {
      MarkIfDue(best, s);
      NoteWork();
      *wake = true;
    }
    return best;
  }
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
    Impl::Slot& s = m.slots[slot];
    if (s.length < tokens) s.length = tokens;
    s.used = true;
    if (m.NeedsMapAhead(s)) {
      m.MarkIfDue(slot, s);
      m.NoteWork();
      wake = true;
    }
  }
  if (wake) m.WakeWorker();
  return absl::OkStatus();
}

absl::Status KVCache::Shrink(int slot, std::int64_t tokens) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  MutexLock lock(&m.mu);
  VATTN_RETURN_IF_ERROR(m.CheckActiveLocked(slot));
  Impl::Slot& s = m.slots[slot];
  if (tokens < 0 || tokens > s.length) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "Shrink(slot %d, %d): tokens must be in [0, length %d]", slot, tokens,
        s.length));
  }
  s.length = tokens;
  return absl::OkStatus();
}

absl::Status KVCache::Free(int slot, std::optional<Stream> fence) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  MutexLock lock(&m.mu);
  VATTN_RETURN_IF_ERROR(m.CheckActiveLocked(slot));
  Impl::Slot& s = m.slots[slot];
  if (fence.has_value()) {
    VATTN_ASSIGN_OR_RETURN(FenceId id, m.backend->RecordFence(*fence));
    if (id != kCompletedFence) s.fences.push_back(id);
  }
  s.active = false;
  --m.active_count;
  s.length = 0;
  s.hint = 0;
  s.adopted = static_cast<int>(s.extents.size());
  s.mapped = s.held;
  s.freed_seq = ++m.free_seq;
  if (!m.opts.defer_reclaim) {
    m.WaitNotBusyLocked(slot);
    if (s.active) return absl::OkStatus();  // Reused meanwhile.
    s.busy = true;
    absl::Status status = m.WaitFencesLocked(s);
    if (status.ok()) status = m.UnmapAllLocked(slot);
    s.busy = false;
    m.state_cv.SignalAll();
    return status;
  }
  return absl::OkStatus();
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
  if (wake) m.WakeWorker();
  return result;
}

bool KVCache::Impl::TryFastStep(absl::Span<const StepRequest> batch) {
  if (has_background_error.load(std::memory_order_acquire)) return false;
  // Every slot active and backed? Otherwise the slow path reports or maps,
  // under the lock; nothing has changed yet.
  for (const StepRequest& r : batch) {
    const Slot& s = SlotForFastPath(r.slot);
    if (!s.active || s.mapped < BytesFor(r.tokens)) return false;
  }
  bool urgent = false;
  for (const StepRequest& r : batch) {
    Slot& s = SlotForFastPath(r.slot);
    if (s.length < r.tokens) s.length = r.tokens;
    if (!s.used) s.used = true;
    MarkIfDue(r.slot, s);
    urgent = urgent || UrgentMapAhead(s);
  }
  step_calls.fetch_add(1, std::memory_order_relaxed);
  if (urgent) {
    NoteWork();
    WakeWorker();
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
    Slot& s = slots[r.slot];
    if (s.mapped < BytesFor(r.tokens)) {
      // Slow path: the background thread is behind (or off).
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
    if (s.length < r.tokens) s.length = r.tokens;
    s.used = true;
    MarkIfDue(r.slot, s);
    more_work = more_work || NeedsMapAhead(s);
  }
  // Misses took handles from the pool: let the thread refill it too.
  if (worker_running && (more_work || result.misses > 0)) {
    NoteWork();
    *wake = true;
  }
  if (!status.ok()) return status;
  return result;
}

TensorView KVCache::K(int layer) const {
  const Impl& m = *impl_;
  TensorView view;
  if (layer < 0 || layer >= m.opts.num_layers) return view;
  const std::int64_t row = static_cast<std::int64_t>(m.opts.num_kv_heads) *
                           m.opts.head_dim;
  view.dtype = m.opts.dtype;
  view.shape = {m.opts.max_slots, m.opts.max_tokens, m.opts.num_kv_heads,
                m.opts.head_dim};
  std::int64_t offset_bytes = 0;
  if (m.opts.layout == Layout::kTokenMajor) {
    view.strides = {m.region_stride / m.elem_bytes,
                    row * 2 * m.opts.num_layers, m.opts.head_dim, 1};
    offset_bytes = static_cast<std::int64_t>(layer) * 2 * row * m.elem_bytes;
  } else {
    view.strides = {m.region_stride / m.elem_bytes, row, m.opts.head_dim, 1};
    offset_bytes = m.RegionAddress(0, 2 * layer) -
                   static_cast<std::int64_t>(m.base);
  }
  view.data = reinterpret_cast<void*>(m.base +
                                      static_cast<DevicePtr>(offset_bytes));
  return view;
}

TensorView KVCache::V(int layer) const {
  const Impl& m = *impl_;
  TensorView view = K(layer);
  if (view.data == nullptr) return view;
  const std::int64_t delta =
      m.opts.layout == Layout::kTokenMajor
          ? static_cast<std::int64_t>(m.opts.num_kv_heads) * m.opts.head_dim *
                m.elem_bytes
          : m.region_stride * m.opts.max_slots;
  view.data = reinterpret_cast<void*>(reinterpret_cast<std::uintptr_t>(
                                          view.data) +
                                      static_cast<std::uintptr_t>(delta));
  return view;
}

CacheStats KVCache::Stats() const {
  const Impl& m = *impl_;
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
    for (const Impl::Slot& s : m.slots) {
      out.mapped_bytes += s.held * m.num_regions;
      if (s.active) {
        ++out.active_slots;
        out.logical_bytes += s.length * m.token_bytes * m.num_regions;
        out.surplus_bytes += (s.held - s.mapped) * m.num_regions;
      } else if (!s.extents.empty()) {
        ++out.idle_slots_with_memory;
      }
    }
    // Under the cache lock, so a handle moving between a slot and the pool
    // (which happens in two steps, the slot's side under this lock) is
    // never counted on both sides: physical >= mapped + pooled always, with
    // equality when nothing is in flight.
    pool = m.pool->counters();
  }
  out.physical_bytes = pool.physical_bytes;
  out.pooled_bytes = pool.idle_bytes;
  out.peak_physical_bytes = pool.peak_physical_bytes;
  out.create_calls = pool.create_calls;
  out.step_calls = m.step_calls.load(std::memory_order_relaxed);
  out.map_calls = m.map_calls.load(std::memory_order_relaxed);
  out.unmap_calls = m.unmap_calls.load(std::memory_order_relaxed);
  out.destroy_calls = pool.destroy_calls;
  return out;
}

absl::StatusOr<SlotInfo> KVCache::GetSlot(int slot) const {
  const Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  MutexLock lock(&m.mu);
  const Impl::Slot& s = m.slots[slot];
  SlotInfo info;
  info.active = s.active;
  info.length = s.length;
  info.backed_tokens = m.BackedTokens(s.mapped);
  info.mapped_bytes = s.held * m.num_regions;
  info.adopted_bytes = s.mapped * m.num_regions;
  info.extents = static_cast<int>(s.extents.size());
  return info;
}

const KVCacheOptions& KVCache::options() const { return impl_->opts; }

const std::shared_ptr<Backend>& KVCache::backend() const {
  return impl_->backend;
}

std::int64_t KVCache::bytes_per_token() const {
  return impl_->token_bytes * impl_->num_regions;
}

absl::Status KVCache::WaitForBackgroundIdle() {
  Impl& m = *impl_;
  MutexLock lock(&m.mu);
  if (!m.worker_running) return m.background_error;
  m.NoteWork();
  const std::uint64_t target = m.work_generation.load();
  m.mu.Unlock();
  m.WakeWorker();
  m.mu.Lock();
  while (m.idle_generation < target && !m.shutting_down) {
    m.state_cv.Wait(&m.mu);
  }
  return m.background_error;
}

}  // namespace vattn
