// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The shape and policy of a KV cache: a plain struct with inline defaults and
// a Validate() that names the offending field.
#ifndef VATTN_OPTIONS_H_
#define VATTN_OPTIONS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "vattn/export.h"

namespace vattn {

class MemoryArbiter;  // vattn/memory_arbiter.h

// Element type of the K and V tensors.
enum class DType : int {
  kFloat16 = 0,
  kBFloat16,
  kFloat32,
  kFloat8E4M3,
  kInt8,
};
// Bytes per element (0 for a value outside the enum).
VATTN_EXPORT std::size_t DTypeSize(DType dtype);
VATTN_EXPORT const char* DTypeName(DType dtype);

// How the cache lays out K and V in virtual memory.
enum class Layout : int {
  // One buffer [slots][max_tokens][layers][2 (K,V)][kv_heads][head_dim]. A
  // slot's KV for every layer is one contiguous range, so any growth is one
  // mapping per extent. K(l) and V(l) are strided views (token stride =
  // layers * 2 * kv_heads * head_dim elements).
  kTokenMajor = 0,
  // Per-layer packed K and V tensors [slots][max_tokens][kv_heads][head_dim]
  // (vAttention's default). Each extent costs 2 * layers mappings.
  kLayerMajor,
};
VATTN_EXPORT const char* LayoutName(Layout layout);

struct KVCacheOptions {
  // ---- Shape ----------------------------------------------------------
  int num_layers = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
  DType dtype = DType::kFloat16;
  // Concurrent requests. Each slot reserves max_tokens of virtual space
  // (address space is nearly free; physical memory is mapped on demand).
  int max_slots = 256;
  // Longest request, in tokens (prompt plus output).
  std::int64_t max_tokens = 8192;
  Layout layout = Layout::kTokenMajor;

  // ---- Physical memory ---------------------------------------------------
  // Cap on physical bytes (mapped extents plus pooled handles). 0: the
  // backend's default budget (BackendCapabilities::default_budget_bytes): on
  // CUDA the device's free memory when the backend was made, less
  // max(1 GiB, 5% of total memory) (see MakeCudaBackend); on Host its
  // physical memory. When a Grow would exceed it, idle slots'
  // extents are taken back first (least recently freed first); only then
  // does Grow return ResourceExhausted, leaving the slot unchanged.
  std::size_t memory_budget_bytes = 0;

  // ---- Extent policy -------------------------------------------------------
  // A Grow that needs B more bytes per region maps ONE extent of at least B
  // (so a prefill of P tokens is one extent). Decode growth uses extents that
  // double with the slot's mapped size, from min_extent_bytes up to a cap:
  // fewer driver calls (the driver charges per handle, not per byte) against
  // at most one extent of waste per request (per tensor in the layer-major
  // layout). Under budget pressure an extent falls back to exactly what the
  // Grow needs. Sizes are rounded to the granularity; min_extent_bytes 0
  // means one granule.
  std::size_t min_extent_bytes = 0;
  // The cap on decode extents, in tokens (converted with the model's bytes
  // per token per tensor, rounded down to the granularity, at least one
  // granule): waste is bounded in tokens whatever the model's size. 64 came
  // from benchmarks/capacity: on a ShareGPT-like mix it keeps 95-96% of a
  // 16-token paged allocator's batch for Llama-3-8B and Mistral-7B (8 MiB
  // extents) at ~65 driver calls per 1000 tokens (docs/BENCHMARKS.md).
  std::int64_t max_extent_tokens = 64;
  // Overrides max_extent_tokens with a cap in bytes when non-zero.
  std::size_t max_extent_bytes = 0;

  // ---- Handle pool -----------------------------------------------------------
  // Handles created up front at Create (of prealloc_handle_bytes each, 0 = one
  // granule), so the first requests need no cuMemCreate. They count against
  // the budget.
  int prealloc_handles = 0;
  std::size_t prealloc_handle_bytes = 0;

  // ---- Reclamation and isolation ---------------------------------------
  // Keep a freed slot's extents mapped until memory is needed elsewhere, so
  // the next request placed there starts with zero driver calls. false unmaps
  // at Free (for comparison; handles still return to the pool).
  bool defer_reclaim = true;
  // Memory handed to a new request in a reused slot (or from a pooled handle)
  // reads as zeros, so no request sees another's keys and values. Costs one
  // memset of the reused bytes at AllocSlot and of every newly mapped extent.
  bool zero_on_reuse = false;

  // ---- Prefix sharing ---------------------------------------------------------
  // Cached prefixes (KVCache::KeepPrefix) held at once. Each may keep a tail
  // extent mapped in a reserved range of its own (virtual space, reserved at
  // the first KeepPrefix: max_prefixes x the slots' stride, nearly free);
  // a KeepPrefix beyond the limit evicts the least recently used prefix no
  // request uses. 0 turns prefix sharing off (KeepPrefix is
  // ResourceExhausted; Fork still works).
  int max_prefixes = 64;

  // ---- Map-ahead (overlap) ---------------------------------------------------
  // Tokens the background thread keeps mapped ahead of each active slot's
  // length, and ahead of an AllocSlot hint. 0 turns the thread off: Step and
  // Grow then map on the caller's thread.
  std::int64_t map_ahead_tokens = 0;
  // Handles of the decode extent size that the background thread keeps in the
  // pool: it creates more when fewer than the low mark are idle, up to the
  // high mark, so cuMemCreate stays off the caller's thread. Both 0: off.
  int pool_low_water = 0;
  int pool_high_water = 0;

  // ---- Shared budget (vattn/memory_arbiter.h) ------------------------------
  // The arbiter whose budget this cache draws its physical memory from,
  // shared with other caches on the same backend; null: the cache has its
  // own budget (memory_budget_bytes), as without an arbiter. With one,
  // memory_budget_bytes must be 0 (the cache's own limit is
  // arbiter_cap_bytes), and KVCache::Create refuses a cache on another
  // backend than the arbiter's, or whose floor does not fit beside the
  // other caches' floors.
  std::shared_ptr<MemoryArbiter> arbiter;
  // Bytes (all tensors) other caches can never reclaim from this one, and
  // that it can always obtain: the arbiter keeps this much of its budget
  // for the cache while it holds less. The sum of all attached caches'
  // floors must fit the arbiter's budget. 0: no guarantee.
  std::size_t arbiter_floor_bytes = 0;
  // The most physical bytes this cache may hold (0: only the arbiter's
  // budget limits it); at least one granule per tensor and at least the
  // floor. KVCache::SetBudget changes it at run time.
  std::size_t arbiter_cap_bytes = 0;
  // The cache's name in MemoryArbiter::Stats (empty: "cache-<id>").
  std::string arbiter_name;

  // InvalidArgument naming the first bad field: a non-positive shape field
  // or max_extent_tokens, an enum value outside its type, a byte size above
  // 2^60, products above 2^60 bytes (the whole cache; max_extent_tokens x
  // bytes per token; prealloc_handles x prealloc_handle_bytes),
  // map_ahead_tokens outside [0, 2^60], min_extent_bytes above
  // max_extent_bytes, negative counts, or pool_low_water above
  // pool_high_water; with an arbiter, memory_budget_bytes not 0 or
  // arbiter_floor_bytes above a non-zero arbiter_cap_bytes; without one,
  // a non-zero arbiter_floor_bytes or arbiter_cap_bytes.
  absl::Status Validate() const;
};

}  // namespace vattn

#endif  // VATTN_OPTIONS_H_
