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
#include <cstdint>
#include <memory>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "vattn/backend.h"
#include "vattn/export.h"
#include "vattn/options.h"
#include "vattn/stats.h"

namespace vattn {

// A strided 4-D view of one layer's K or V for every slot:
// shape = {max_slots, max_tokens, num_kv_heads, head_dim}; element
// (b, t, h, d) is at data + (b*strides[0] + t*strides[1] + h*strides[2] +
// d*strides[3]) * DTypeSize(dtype) bytes. Only tokens a Grow has backed may
// be touched. `data` is a device address for device backends.
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
// slot is backed (and its length set) to `tokens`, which counts the tokens
// the step writes.
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
  std::int64_t backed_tokens = 0;  // Tokens that may be touched.
  std::int64_t mapped_bytes = 0;   // Physical bytes mapped, all tensors.
  // Of mapped_bytes, those backing the request (the rest is surplus an
  // earlier request left in the slot; see CacheStats::surplus_bytes).
  std::int64_t adopted_bytes = 0;
  int extents = 0;
};

// Owns a virtual reservation on a backend (shared with the caller), the
// physical handles mapped into it, and (with map_ahead_tokens > 0) one
// background thread; destroying the cache waits for fenced GPU work, then
// unmaps, destroys and releases everything. Every method is thread-safe.
class VATTN_EXPORT KVCache {
 public:
  // InvalidArgument: options fail Validate(), the backend is null, or the
  // cache needs more virtual space than the backend can reserve (the message
  // names the field and both sizes). Also any error of the initial Reserve
  // or of pre-creating handles (nothing is left behind).
  static absl::StatusOr<std::unique_ptr<KVCache>> Create(
      const KVCacheOptions& options, std::shared_ptr<Backend> backend);
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

  // Backs tokens [0, tokens) of the slot and sets its length to
  // max(length, tokens). Maps at most one new extent per call (more only if
  // the background thread raced it). InvalidArgument: bad slot, tokens < 0.
  // OutOfRange: tokens > max_tokens. FailedPrecondition: the slot is not
  // active. ResourceExhausted: the budget cannot hold the extent even after
  // reclaiming idle slots; the slot is then unchanged.
  absl::Status Grow(int slot, std::int64_t tokens);

  // Lowers the slot's logical length; unmaps nothing. InvalidArgument: bad
  // slot, tokens < 0 or above the length. FailedPrecondition: not active.
  absl::Status Shrink(int slot, std::int64_t tokens);

  // Ends the slot's request. Its memory stays mapped (unless defer_reclaim is
  // off) for the next request placed there. With a fence stream, a fence is
  // recorded on it and the slot's memory is never unmapped before the work
  // queued there has finished. With defer_reclaim off, Free unmaps the
  // slot's extents at once (waiting for the fence first); if an unmap fails
  // the slot is freed all the same, the error is returned, and the memory
  // stays mapped until it is reclaimed. InvalidArgument: bad slot.
  // FailedPrecondition: the slot is not active (double Free).
  absl::Status Free(int slot, std::optional<Stream> fence = std::nullopt);

  // Prepares one decode step: every listed slot is backed to, and has its
  // length set to, its `tokens`. When the map-ahead thread kept up this is
  // bookkeeping only; slots it had to map count as misses. Errors as Grow's,
  // for the first failing request; requests before it stay grown. Also
  // returns the background thread's sticky error, if it had one.
  absl::StatusOr<StepResult> Step(absl::Span<const StepRequest> batch);

  // Views of layer `layer`'s K and V for all slots. An empty view (data ==
  // nullptr) for a layer outside [0, num_layers).
  TensorView K(int layer) const;
  TensorView V(int layer) const;

  CacheStats Stats() const;
  // InvalidArgument: bad slot.
  absl::StatusOr<SlotInfo> GetSlot(int slot) const;

  const KVCacheOptions& options() const;
  const std::shared_ptr<Backend>& backend() const;
  // Bytes of K and V, all layers, of one token.
  std::int64_t bytes_per_token() const;
  // Blocks until the map-ahead thread has nothing left to do (for tests and
  // benchmarks). Returns its sticky error, if any.
  absl::Status WaitForBackgroundIdle();

 private:
  struct Impl;
  explicit KVCache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace vattn

#endif  // VATTN_KV_CACHE_H_
