// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The KV cache: per-layer K and V tensors that stay contiguous in virtual
// memory, backed per request by physical extents mapped on demand.
//
//   auto backend = vattn::MakeHostBackend();            // or MakeCudaBackend(0)
//   vattn::KVCacheOptions opts;                          // shape and policy
//   auto cache = vattn::KVCache::Create(opts, *backend);
//   int slot = *(*cache)->AllocSlot(/*expected_tokens=*/prompt_len);
//   (*cache)->Grow(slot, prompt_len);                    // tokens [0, len) backed
//   vattn::TensorView k = (*cache)->K(layer);            // unchanged kernels
//   ...                                                  // read K/V through views
//   (*cache)->Free(slot, stream);                        // memory kept, fenced
#ifndef VATTN_KV_CACHE_H_
#define VATTN_KV_CACHE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "vattn/backend.h"
#include "vattn/export.h"
#include "vattn/memory_arbiter.h"
#include "vattn/options.h"
#include "vattn/stats.h"

namespace vattn {

struct SlotExport;  // vattn/slot_export.h

// A strided 4-D view of one layer's K or V for every slot:
// shape = {max_slots, max_tokens, num_kv_heads, head_dim}; element
// (b, t, h, d) is at data + (b*strides[0] + t*strides[1] + h*strides[2] +
// d*strides[3]) * DTypeSize(dtype) bytes. A request may touch only its own
// slot's backed tokens: [0, SlotInfo::backed_tokens), which AllocSlot's hint,
// Grow, Step and the map-ahead thread extend (never shrink while the slot is
// active). `data` is a device address for device backends.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat16;
  std::array<std::int64_t, 4> shape{};
  std::array<std::int64_t, 4> strides{};  // In elements.

  // Address of element (b, t, h, d), without bounds checks.
  std::uintptr_t ElementAddress(std::int64_t b, std::int64_t t,
                                std::int64_t h, std::int64_t d) const {
    const std::int64_t offset = b * strides[0] + t * strides[1] +
                                h * strides[2] + d * strides[3];
    return reinterpret_cast<std::uintptr_t>(data) +
           static_cast<std::uintptr_t>(offset) * DTypeSize(dtype);
  }
};

// One active request of the coming decode step: after Step returns OK, the
// slot is backed to `tokens` and its length is `tokens`, which counts the
// tokens the step writes; `tokens` may not be below the slot's length.
struct StepRequest {
  int slot = 0;
  std::int64_t tokens = 0;
};

// What one Step cost the caller.
struct StepResult {
  int misses = 0;              // Slots Step had to map on the caller's thread.
  std::int64_t map_nanos = 0;  // Time spent mapping (or waiting for the
                               // background thread) on the caller's thread.
};

// A snapshot of one slot.
struct SlotInfo {
  bool active = false;
  std::int64_t length = 0;         // Logical tokens.
  // Tokens [0, backed_tokens) of the slot may be read and written by the
  // request (see TensorView); with zero_on_reuse, all of them are cleared
  // before another request is placed in the slot.
  std::int64_t backed_tokens = 0;
  std::int64_t mapped_bytes = 0;   // Physical bytes mapped, all tensors.
  // Of mapped_bytes, those backing the request (the rest is surplus an
  // earlier request left in the slot; see CacheStats::surplus_bytes).
  std::int64_t adopted_bytes = 0;
  int extents = 0;
};

// A snapshot of one cached prefix (KVCache::GetPrefix).
struct PrefixInfo {
  std::int64_t tokens = 0;
  // Physical bytes (all tensors) it keeps: its whole extents and its tail.
  std::int64_t bytes = 0;
  std::int64_t tail_bytes = 0;  // Of which the copied tail.
  int whole_extents = 0;        // Extents aliased by every request using it.
  int users = 0;                // Active slots sharing its memory now.
  std::int64_t hits = 0;        // AllocSlotWithPrefix calls that used it.
};

// Tag for KVCache::Free: the caller has made sure that no GPU work still
// reads the slot (it synchronised the streams itself), so no fence is
// recorded and reclamation may unmap the memory at once.
struct NoFence {
  explicit constexpr NoFence() = default;
};
inline constexpr NoFence kNoFence{};

// A virtual address range of the cache (see KVCache::SlotRanges): `bytes`
// bytes from `address`, a device address for device backends.
struct MemoryRange {
  DevicePtr address = 0;
  std::size_t bytes = 0;
};

// Owns a virtual reservation on a backend (shared with the caller), the
// physical handles mapped into it, and (with map_ahead_tokens > 0) one
// background thread; destroying the cache waits for fenced GPU work, then
// unmaps, destroys and releases everything it can (see ~KVCache). Every
// method is thread-safe.
//
// Errors go to the calls they affect. A driver failure is returned by the
// call that made the driver call, or that needed its result: the map-ahead
// thread never fails a later call. After a driver error the thread counts
// it (CacheStats::background_failures), backs off (1 ms doubling to
// 100 ms, reset by a success) and leaves the slot to the foreground; out of
// budget it stops until a call announces new work. Either way the next Step
// or Grow that needs the memory maps it on the caller's thread (a miss) and
// returns that mapping's own error if it fails too. An extent whose mapping
// state a failure left unknown (an unmap, and the mapping back, both failed)
// is quarantined: never handed to a request nor counted as backed, its
// unmap retried on later calls, counted in CacheStats::quarantined_*; a
// slot whose range it blocks returns the unmap's error to its Grow/Step
// until the retry succeeds.
class VATTN_EXPORT KVCache {
 public:
  // InvalidArgument: options fail Validate(), the backend is null, or the
  // cache needs more virtual space than the backend can reserve (the message
  // names the field and both sizes). Also any error of the initial Reserve
  // or of pre-creating handles (nothing is left behind).
  static absl::StatusOr<std::unique_ptr<KVCache>> Create(
      const KVCacheOptions& options, std::shared_ptr<Backend> backend);
  // Joins the background thread, waits for every fence, then unmaps every
  // extent, destroys every handle and releases the reservation. A failed
  // unmap does not stop it: every other extent is still returned and the
  // failed ones retried once; what still cannot be returned is reported on
  // stderr (one line with the counts) and left to the backend, which takes
  // it back when it is destroyed (see Backend's Lifetime contract).
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  // Takes a free slot for a new request with length 0. Prefers an idle slot
  // whose still-mapped memory best fits `expected_tokens` (the prompt
  // length, say), so the request often needs zero driver calls; with map-ahead
  // on, the background thread starts mapping up to the hint at once.
  // InvalidArgument: expected_tokens < 0. OutOfRange: above max_tokens.
  // ResourceExhausted: every slot is active.
  absl::StatusOr<int> AllocSlot(std::int64_t expected_tokens = 0);
  // AllocSlot, with the prefix boundary of the prompt the engine knows
  // (`split_at_tokens`, e.g. the system prompt's length; 0: none): the slot's
  // memory is mapped as one extent up to that boundary, rounded down to the
  // granularity, and separate extents after it, so KeepPrefix(slot,
  // split_at_tokens, id) can later share the prefix whole (see "Prefix
  // sharing" below). Costs one more map per request when the prefix does
  // not end on the first extent's end anyway. The boundary holds for the
  // request's life (Grow, Step and the map-ahead thread respect it).
  // InvalidArgument: split_at_tokens < 0 or expected_tokens < 0. OutOfRange:
  // either above max_tokens. ResourceExhausted as AllocSlot.
  absl::StatusOr<int> AllocSlot(std::int64_t expected_tokens,
                                std::int64_t split_at_tokens);

  // Backs tokens [0, tokens) of the slot and sets its length to
  // max(length, tokens). Maps at most one new extent per call (more only if
  // the background thread raced it). InvalidArgument: bad slot, tokens < 0.
  // OutOfRange: tokens > max_tokens. FailedPrecondition: the slot is not
  // active. ResourceExhausted: the budget cannot hold the extent even after
  // reclaiming idle slots; the slot is then unchanged.
  absl::Status Grow(int slot, std::int64_t tokens);
  // Grow, setting the slot's prefix boundary first (see AllocSlot(expected,
  // split_at_tokens)); a boundary at or below what the slot already maps
  // changes nothing there. Errors as Grow; also InvalidArgument for
  // split_at_tokens < 0 and OutOfRange above max_tokens.
  absl::Status Grow(int slot, std::int64_t tokens,
                    std::int64_t split_at_tokens);

  // Lowers the slot's logical length; unmaps nothing. InvalidArgument: bad
  // slot, tokens < 0 or above the length. FailedPrecondition: not active.
  absl::Status Shrink(int slot, std::int64_t tokens);

  // Ends the slot's request. Its memory stays mapped (unless defer_reclaim is
  // off) for the next request placed there, and is never unmapped or
  // zeroed before a fence recorded here has completed:
  //  - Free(slot) records the fence on the legacy default stream
  //    (Stream{}): it completes once the work queued before it on that
  //    stream and on every blocking stream of the context has finished (the
  //    legacy stream's implicit synchronisation). Safe by default; work on
  //    non-blocking streams or per-thread default streams is not covered:
  //    pass that stream instead. Backends without streams (Host) have
  //    nothing to wait for and keep no fence.
  //  - Free(slot, stream) records it on `stream`.
  //  - Free(slot, kNoFence) records none: for callers that synchronise
  //    themselves; the memory may be unmapped at once.
  //  - Free(slot, std::optional<Stream>) is Free(slot, *fence), or
  //    Free(slot) for std::nullopt.
  // With defer_reclaim off, Free unmaps the slot's extents at once (waiting
  // for the fence first); if an unmap fails the slot is freed all the same,
  // the error is returned, and the memory stays mapped until it is
  // reclaimed. InvalidArgument: bad slot. FailedPrecondition: the slot is
  // not active (double Free). Also the backend's RecordFence errors (then
  // nothing changed): FailedPrecondition on CUDA when the stream is being
  // captured into a CUDA graph.
  absl::Status Free(int slot);
  absl::Status Free(int slot, Stream fence);
  absl::Status Free(int slot, NoFence);
  absl::Status Free(int slot, std::optional<Stream> fence);

  // Prepares one decode step: every listed slot is backed to, and has its
  // length set to, its `tokens`. When the map-ahead thread kept up this is
  // bookkeeping only (no lock); slots it had to map count as misses.
  // Checked before anything changes, with the request's index in the
  // message: InvalidArgument for a bad slot, tokens < 0, tokens below the
  // slot's length, or a slot listed twice; OutOfRange above max_tokens;
  // FailedPrecondition for a slot that is not active. Mapping errors as
  // Grow's, for the first failing request; requests before it stay grown.
  absl::StatusOr<StepResult> Step(absl::Span<const StepRequest> batch);

  // ---- Prefix sharing (docs/DESIGN.md, "Prefix sharing") ----------------
  // A request's first tokens can be another request's, without a copy: the
  // slots map the same physical extents, read-only, and their views read
  // them as their own contiguous KV (unchanged kernels). The engine owns
  // hashing and matching (it names prefixes by a 64-bit id); vattn owns the
  // memory. Whole extents inside the shared tokens are aliased (one map per
  // extent per region, no copy); the tokens of an extent that is only partly
  // shared (the tail) are copied into a fresh extent of the new slot
  // (copy-on-write at share time: the backend's CopyDeviceToDevice, on the
  // call's `stream` on CUDA). The shared part is read-only for every slot
  // that maps it, the owner included: a write through it faults (SIGSEGV on
  // Host, a device fault on CUDA) and the backend's copy calls refuse it
  // (PermissionDenied). A shared extent counts once in physical bytes and in
  // the budget. A cached prefix no active request uses is reclaimable, with
  // the idle slots, when memory is needed (CacheStats::prefix_evictions);
  // memory an active slot maps is never taken from it.
  //
  // Keeps tokens [0, tokens) of an active slot as a cached prefix named
  // `prefix_id`, which outlives the slot's request. The slot's extents
  // inside [0, tokens) become shared and read-only in the slot too (one
  // SetAccess per extent and region the first time); the tokens of the
  // extent that holds token `tokens - 1` but also later ones (the tail) are
  // copied once into memory the prefix keeps (one map and one copy per
  // region). The engine must have written the tokens: the copy is ordered
  // on `stream` (KeepPrefix(slot, tokens, id) uses the legacy default
  // stream, as Free(slot) does). The slot may keep growing and writing
  // tokens >= `tokens` as before.
  // InvalidArgument: bad slot, tokens < 1. OutOfRange: tokens above the
  // slot's length or max_tokens. FailedPrecondition: the slot is not
  // active. AlreadyExists: `prefix_id` names a cached prefix already.
  // ResourceExhausted: the tail's memory does not fit the budget even after
  // reclaiming, or max_prefixes prefixes are cached and none can be
  // evicted. Any failure leaves the cache as it was (a SetAccess done
  // before the failure is undone, retried once if the undo fails). Only
  // when that undo fails twice (two faults after the failure) does an
  // extent of the slot below `tokens` stay read-only: the slot's books mark
  // it so (never handed to another request writable: its memory is
  // unmapped first), a later KeepPrefix or Fork over it sets every region
  // again, and the request must not write those tokens (a write faults; it
  // corrupts nothing). Fork's undo behaves the same.
  absl::Status KeepPrefix(int slot, std::int64_t tokens,
                          std::uint64_t prefix_id);
  absl::Status KeepPrefix(int slot, std::int64_t tokens,
                          std::uint64_t prefix_id, Stream stream);
  // Starts a request whose first `tokens` tokens (up to the prefix's length)
  // are the prefix's, with length `tokens`: its slot maps the prefix's
  // whole extents read-only and a fresh extent that the tail is copied into
  // (ordered on `stream`), backed to max(tokens, expected_tokens); tokens
  // past the prefix's length are backed but hold nothing yet (the engine
  // prefills them). Counts a prefix hit and marks the prefix recently used.
  // The slot is chosen as AllocSlot chooses one (its earlier memory is
  // unmapped first if it does not fit).
  // InvalidArgument: tokens < 1 or expected_tokens < 0. OutOfRange: either
  // above max_tokens. NotFound: no cached prefix has this id (never kept,
  // dropped or evicted). ResourceExhausted: every slot is active, or the
  // budget cannot hold the tail even after reclaiming; nothing changed then.
  absl::StatusOr<int> AllocSlotWithPrefix(std::uint64_t prefix_id,
                                          std::int64_t tokens,
                                          std::int64_t expected_tokens = 0);
  absl::StatusOr<int> AllocSlotWithPrefix(std::uint64_t prefix_id,
                                          std::int64_t tokens,
                                          std::int64_t expected_tokens,
                                          Stream stream);
  // Forgets a cached prefix. Slots that share its memory keep it (the
  // memory goes back when the last of them lets go of it); later
  // AllocSlotWithPrefix calls with this id return NotFound. NotFound: no
  // cached prefix has this id.
  absl::Status DropPrefix(std::uint64_t prefix_id);
  // Starts a request sharing every token of an active one (parallel
  // sampling, beam search): the new slot has the same length, maps the
  // source's whole extents inside it read-only (the source's own mapping of
  // them turns read-only too) and a fresh extent holding a copy of the
  // partly filled last extent's tokens (ordered on `stream`). Both requests
  // then grow independently. InvalidArgument: bad slot. FailedPrecondition:
  // the slot is not active. ResourceExhausted as AllocSlotWithPrefix.
  absl::StatusOr<int> Fork(int slot);
  absl::StatusOr<int> Fork(int slot, Stream stream);
  // A snapshot of one cached prefix; NotFound for an unknown id.
  absl::StatusOr<PrefixInfo> GetPrefix(std::uint64_t prefix_id) const;

  // Views of layer `layer`'s K and V for all slots. An empty view (data ==
  // nullptr) for a layer outside [0, num_layers).
  TensorView K(int layer) const;
  TensorView V(int layer) const;

  CacheStats Stats() const;

  // ---- Elastic memory (vattn/memory_arbiter.h) -----------------------------
  // Changes the cache's physical budget at run time (without an arbiter,
  // memory_budget_bytes; with one, the cache's cap, arbiter_cap_bytes).
  // Growth takes effect at once. Shrinking below what the cache holds first
  // destroys its idle memory (pooled handles, then idle slots' extents,
  // cached prefixes and surplus, least recently used first) until it fits;
  // the new budget stands either way, and creations beyond it are refused
  // (Grow returns ResourceExhausted) until memory is freed. Active memory
  // is never taken. OK when the cache fits the new budget;
  // ResourceExhausted with the bytes held, active and asked for when
  // active memory keeps it above. InvalidArgument (nothing changes): bytes
  // below one granule per tensor, above 2^60, or (with an arbiter) below
  // arbiter_floor_bytes. A backend error while destroying is returned as
  // is (the new budget stands). Thread-safe; takes the cache's lock (not
  // for Step's hot path) and never another cache's.
  absl::Status SetBudget(std::size_t bytes);
  // Returns idle memory to the driver until the cache holds at most
  // `target_bytes` (physical: mapped, pooled and quarantined): pooled
  // handles, then idle slots' extents (cached prefixes and active slots'
  // surplus included), least recently used first, are destroyed, not
  // pooled. Returns the bytes destroyed. Exact when the idle memory comes
  // in pieces that add up to the gap (say, one-granule extents); otherwise
  // it may land below the target by less than one extent. When active
  // memory exceeds the target it stops once nothing idle is left and
  // returns OK with what it destroyed (compare Stats().physical_bytes with
  // the target). The floor does not apply (the cache trims itself). The
  // budget is unchanged; afterwards the background pool refill creates
  // nothing beyond what Trim left until the cache needs a new handle again
  // (a Grow, a Step miss or a look-ahead map that found no pooled handle),
  // so trimmed memory is not re-created behind the caller's back. Backend
  // errors of Destroy or Unmap are returned (what was destroyed stays
  // destroyed; a handle that failed stays pooled, an extent stays mapped
  // or quarantined). Thread-safe, as SetBudget.
  absl::StatusOr<std::size_t> Trim(std::size_t target_bytes);

  // InvalidArgument: bad slot.
  absl::StatusOr<SlotInfo> GetSlot(int slot) const;
  // The virtual ranges that hold tokens [0, tokens) of an active slot, for a
  // transfer engine (NIXL, Mooncake) to read or write them as a whole. The
  // order is fixed by the layout, so two caches of the same shape agree on
  // it range by range: token-major, one range (every layer's K and V of
  // each token, token after token); layer-major, 2 x num_layers ranges, K of
  // layer 0, V of layer 0, K of layer 1, ... (each the slot's tokens of one
  // tensor). Every range is tokens x bytes_per_token() / (number of ranges)
  // bytes; tokens == 0 gives no range. The addresses lie in the cache's
  // reservation, which never moves for the cache's life, so an engine may
  // register them once; they are backed only while the slot is active and
  // backs them (its memory may be unmapped once it is freed).
  // InvalidArgument: bad slot or tokens < 0. FailedPrecondition: the slot is
  // not active. OutOfRange: tokens above the slot's backed tokens
  // (SlotInfo::backed_tokens; Grow it first) or above max_tokens.
  // Thread-safe; takes the cache's lock (not for Step's hot path).
  absl::StatusOr<std::vector<MemoryRange>> SlotRanges(int slot,
                                                      std::int64_t tokens) const;
  // The cache's whole virtual reservation (every slot, every layer). It
  // never moves for the cache's life; most of it is unbacked at any time.
  // For a transport that registers address ranges without pinning pages
  // (UCX over shared memory/CMA or TCP on the Host backend), registering it
  // once covers every SlotRanges; see README, "Scale-out". Thread-safe.
  MemoryRange Reservation() const;

  // ---- Zero-copy handoff to another process (vattn/slot_export.h) -------
  // Exports the extents that back tokens [0, tokens) of an active slot
  // (whole extents: they may back more) for another process to map with
  // ImportSlot: fills *out with their description and appends one new file
  // descriptor per extent and region to *fds (extent-major; the caller owns
  // and closes them, usually through SendSlot). From then on those extents
  // are never pooled, reused by another request or reclaimed: Free unmaps
  // and destroys them at once (the peer keeps the memory alive), and they
  // count in CacheStats::exported_bytes until then. The caller has
  // finished writing the tokens (on CUDA, synchronised the work that wrote
  // them) and writes none of the exported extents afterwards: the importer
  // owns the request from here (it writes past `tokens` into the last
  // extent). Exporting the same tokens again is allowed (new descriptors).
  // InvalidArgument: bad slot, tokens < 0, null out or fds.
  // FailedPrecondition: the slot is not active, or an extent to export is
  // shared (prefix sharing) or imported, or the backend was not made with
  // exportable handles (HostBackendOptions / CudaBackendOptions::
  // exportable_handles). OutOfRange: tokens above the slot's backed tokens.
  // A backend error (out of descriptors: ResourceExhausted) leaves the
  // cache as it was and no descriptor open. Thread-safe; the slot is busy
  // (other calls on it wait) while the descriptors are made.
  absl::Status ExportSlot(int slot, std::int64_t tokens, SlotExport* out,
                          std::vector<int>* fds);
  // Imports another process's ExportSlot into a free slot of this cache,
  // which must have the same shape (layers, heads, head_dim, dtype, layout)
  // on a backend of the same kind and granularity: the slot maps the
  // peer's memory at the same offsets (no copy), its length is e.tokens,
  // and it grows past them with extents of its own. `fds` (e.num_fds() of
  // them) stay the caller's to close; the backend keeps its own references.
  // Imported memory counts in CacheStats::imported_bytes, not in
  // physical_bytes nor the budget; Free unmaps and destroys (releases) it
  // at once, never pooling it. The slot is chosen like AllocSlot's, the
  // emptiest first (an idle slot's memory there is unmapped first).
  // InvalidArgument: another shape (the message names both), e.tokens
  // outside [0, max_tokens] or not backed by the extents, extents not
  // contiguous from 0 or not multiples of the granularity, a descriptor
  // count other than e.num_fds(), or a descriptor that is closed or not an
  // export of this kind of backend (named). ResourceExhausted: every slot
  // is active. Any error leaves the cache, the backend's counters and the
  // process's descriptors as they were. Thread-safe.
  absl::StatusOr<int> ImportSlot(const SlotExport& e,
                                 absl::Span<const int> fds);

  const KVCacheOptions& options() const;
  const std::shared_ptr<Backend>& backend() const;
  // Bytes of K and V, all layers, of one token.
  std::int64_t bytes_per_token() const;
  // Blocks until the map-ahead thread has nothing left to do (for tests and
  // benchmarks). Returns the error of the thread's last failed attempt since
  // the previous call (then forgets it), else OK; the thread's failures
  // never fail other calls.
  absl::Status WaitForBackgroundIdle();

 private:
  struct Impl;
  explicit KVCache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace vattn

#endif  // VATTN_KV_CACHE_H_
