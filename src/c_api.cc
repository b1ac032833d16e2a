// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The C API (include/vattn/c_api.h) over the C++ one. Each entry point checks
// its pointers, converts, calls the C++ API inside Guard (which turns a
// std::bad_alloc, or anything else thrown by a dependency, into a status), and
// stores a failing status's text in a thread-local string for
// vattn_last_error().
#include "vattn/c_api.h"

#include "src/c_api_internal.h"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "vattn/backend.h"
#include "vattn/kv_cache.h"
#include "vattn/options.h"
#include "vattn/stats.h"

namespace vattn {
namespace {

using c_api_internal::CheckStructSize;
using c_api_internal::Fail;
using c_api_internal::Guard;
using c_api_internal::NullArgument;
using c_api_internal::Report;

// The C codes are absl's.
#define VATTN_C_SAME_CODE_(c, absl_code)                                  \
  static_assert(static_cast<int>(absl::StatusCode::absl_code) == (c), \
                #c " differs from absl::StatusCode::" #absl_code)
VATTN_C_SAME_CODE_(VATTN_OK, kOk);
VATTN_C_SAME_CODE_(VATTN_CANCELLED, kCancelled);
VATTN_C_SAME_CODE_(VATTN_UNKNOWN, kUnknown);
VATTN_C_SAME_CODE_(VATTN_INVALID_ARGUMENT, kInvalidArgument);
VATTN_C_SAME_CODE_(VATTN_DEADLINE_EXCEEDED, kDeadlineExceeded);
VATTN_C_SAME_CODE_(VATTN_NOT_FOUND, kNotFound);
VATTN_C_SAME_CODE_(VATTN_ALREADY_EXISTS, kAlreadyExists);
VATTN_C_SAME_CODE_(VATTN_PERMISSION_DENIED, kPermissionDenied);
VATTN_C_SAME_CODE_(VATTN_RESOURCE_EXHAUSTED, kResourceExhausted);
VATTN_C_SAME_CODE_(VATTN_FAILED_PRECONDITION, kFailedPrecondition);
VATTN_C_SAME_CODE_(VATTN_ABORTED, kAborted);
VATTN_C_SAME_CODE_(VATTN_OUT_OF_RANGE, kOutOfRange);
VATTN_C_SAME_CODE_(VATTN_UNIMPLEMENTED, kUnimplemented);
VATTN_C_SAME_CODE_(VATTN_INTERNAL, kInternal);
VATTN_C_SAME_CODE_(VATTN_UNAVAILABLE, kUnavailable);
VATTN_C_SAME_CODE_(VATTN_DATA_LOSS, kDataLoss);
VATTN_C_SAME_CODE_(VATTN_UNAUTHENTICATED, kUnauthenticated);
#undef VATTN_C_SAME_CODE_

static_assert(static_cast<int>(DType::kFloat16) == VATTN_DTYPE_FLOAT16 &&
                  static_cast<int>(DType::kBFloat16) == VATTN_DTYPE_BFLOAT16 &&
                  static_cast<int>(DType::kFloat32) == VATTN_DTYPE_FLOAT32 &&
                  static_cast<int>(DType::kFloat8E4M3) ==
                      VATTN_DTYPE_FLOAT8_E4M3 &&
                  static_cast<int>(DType::kInt8) == VATTN_DTYPE_INT8,
              "vattn_dtype differs from vattn::DType");
static_assert(static_cast<int>(Layout::kTokenMajor) ==
                      VATTN_LAYOUT_TOKEN_MAJOR &&
                  static_cast<int>(Layout::kLayerMajor) ==
                      VATTN_LAYOUT_LAYER_MAJOR,
              "vattn_layout differs from vattn::Layout");

KVCacheOptions FromC(const vattn_cache_options& c) {
  KVCacheOptions o;
  o.num_layers = c.num_layers;
  o.num_kv_heads = c.num_kv_heads;
  o.head_dim = c.head_dim;
  o.dtype = static_cast<DType>(c.dtype);
  o.max_slots = c.max_slots;
  o.max_tokens = c.max_tokens;
  o.layout = static_cast<Layout>(c.layout);
  o.memory_budget_bytes = c.memory_budget_bytes;
  o.min_extent_bytes = c.min_extent_bytes;
  o.max_extent_tokens = c.max_extent_tokens;
  o.max_extent_bytes = c.max_extent_bytes;
  o.prealloc_handles = c.prealloc_handles;
  o.prealloc_handle_bytes = c.prealloc_handle_bytes;
  o.defer_reclaim = c.defer_reclaim != 0;
  o.zero_on_reuse = c.zero_on_reuse != 0;
  o.map_ahead_tokens = c.map_ahead_tokens;
  o.pool_low_water = c.pool_low_water;
  o.pool_high_water = c.pool_high_water;
  o.max_prefixes = c.max_prefixes;
  if (c.arbiter != nullptr) o.arbiter = c.arbiter->arbiter;
  o.arbiter_floor_bytes = c.arbiter_floor_bytes;
  o.arbiter_cap_bytes = c.arbiter_cap_bytes;
  if (c.arbiter_name != nullptr) o.arbiter_name = c.arbiter_name;
  return o;
}

void ToC(const KVCacheOptions& o, vattn_cache_options* c) {
  c->struct_size = sizeof(vattn_cache_options);
  c->num_layers = o.num_layers;
  c->num_kv_heads = o.num_kv_heads;
  c->head_dim = o.head_dim;
  c->dtype = static_cast<int>(o.dtype);
  c->max_slots = o.max_slots;
  c->max_tokens = o.max_tokens;
  c->layout = static_cast<int>(o.layout);
  c->memory_budget_bytes = o.memory_budget_bytes;
  c->min_extent_bytes = o.min_extent_bytes;
  c->max_extent_tokens = o.max_extent_tokens;
  c->max_extent_bytes = o.max_extent_bytes;
  c->prealloc_handles = o.prealloc_handles;
  c->prealloc_handle_bytes = o.prealloc_handle_bytes;
  c->defer_reclaim = o.defer_reclaim ? 1 : 0;
  c->zero_on_reuse = o.zero_on_reuse ? 1 : 0;
  c->map_ahead_tokens = o.map_ahead_tokens;
  c->pool_low_water = o.pool_low_water;
  c->pool_high_water = o.pool_high_water;
  c->max_prefixes = o.max_prefixes;
  // A C handle to o.arbiter would need an owner, and the name storage:
  // options filled here name neither; the caller sets them.
  c->arbiter = nullptr;
  c->arbiter_floor_bytes = o.arbiter_floor_bytes;
  c->arbiter_cap_bytes = o.arbiter_cap_bytes;
  c->arbiter_name = nullptr;
}

void ToC(const CacheStats& s, vattn_cache_stats* c) {
  c->physical_bytes = s.physical_bytes;
  c->pooled_bytes = s.pooled_bytes;
  c->mapped_bytes = s.mapped_bytes;
  c->surplus_bytes = s.surplus_bytes;
  c->logical_bytes = s.logical_bytes;
  c->budget_bytes = s.budget_bytes;
  c->peak_physical_bytes = s.peak_physical_bytes;
  c->active_slots = s.active_slots;
  c->idle_slots_with_memory = s.idle_slots_with_memory;
  c->create_calls = s.create_calls;
  c->destroy_calls = s.destroy_calls;
  c->map_calls = s.map_calls;
  c->unmap_calls = s.unmap_calls;
  c->grow_calls = s.grow_calls;
  c->extents_mapped = s.extents_mapped;
  c->reuse_hits = s.reuse_hits;
  c->adopted_extents = s.adopted_extents;
  c->reclaimed_bytes = s.reclaimed_bytes;
  c->reclaimed_extents = s.reclaimed_extents;
  c->fence_waits = s.fence_waits;
  c->zeroed_bytes = s.zeroed_bytes;
  c->step_calls = s.step_calls;
  c->step_misses = s.step_misses;
  c->step_map_nanos = s.step_map_nanos;
  c->background_extents = s.background_extents;
  c->background_creates = s.background_creates;
  c->background_wakeups = s.background_wakeups;
  c->background_deadline_wakeups = s.background_deadline_wakeups;
  c->background_caller_wakeups = s.background_caller_wakeups;
  c->quarantined_extents = s.quarantined_extents;
  c->quarantined_bytes = s.quarantined_bytes;
  c->background_failures = s.background_failures;
  c->shared_bytes = s.shared_bytes;
  c->shared_saved_bytes = s.shared_saved_bytes;
  c->cached_prefixes = s.cached_prefixes;
  c->cached_prefix_bytes = s.cached_prefix_bytes;
  c->prefix_hits = s.prefix_hits;
  c->forks = s.forks;
  c->prefix_evictions = s.prefix_evictions;
  c->cow_copied_bytes = s.cow_copied_bytes;
  c->copy_calls = s.copy_calls;
  c->set_access_calls = s.set_access_calls;
  c->exported_bytes = s.exported_bytes;
  c->imported_bytes = s.imported_bytes;
  c->exported_slots = s.exported_slots;
  c->imported_slots = s.imported_slots;
}

// A new backend handle in *out, or the factory's error.
int WrapBackend(const char* function,
                absl::StatusOr<std::shared_ptr<Backend>> made,
                vattn_backend** out) {
  if (!made.ok()) return Fail(function, made.status());
  *out = new vattn_backend{*std::move(made)};
  return VATTN_OK;
}

int View(const char* function, const vattn_cache* cache, int layer, bool k,
         vattn_tensor_view* out) {
  if (cache == nullptr) return NullArgument(function, "cache");
  if (out == nullptr) return NullArgument(function, "out");
  const int layers = cache->cache->options().num_layers;
  if (layer < 0 || layer >= layers) {
    return Fail(function, absl::InvalidArgumentError(absl::StrCat(
                              "layer ", layer, " is outside [0, ", layers,
                              ")")));
  }
  const TensorView view = k ? cache->cache->K(layer) : cache->cache->V(layer);
  out->data = view.data;
  out->dtype = static_cast<int>(view.dtype);
  for (int i = 0; i < 4; ++i) {
    out->shape[i] = view.shape[i];
    out->strides[i] = view.strides[i];
  }
  return VATTN_OK;
}

}  // namespace
}  // namespace vattn

extern "C" {

const char* vattn_last_error(void) {
  const char* text = vattn::c_api_internal::last_error_text;
  return text != nullptr ? text : "";
}

int vattn_dtype_size(int dtype, size_t* out) {
  constexpr const char* kFn = "vattn_dtype_size";
  return vattn::Guard(kFn, [&] {
    if (out == nullptr) return vattn::NullArgument(kFn, "out");
    const std::size_t size = vattn::DTypeSize(static_cast<vattn::DType>(dtype));
    if (size == 0) {
      return vattn::Fail(kFn, absl::InvalidArgumentError(absl::StrCat(
                                  "dtype ", dtype, " is not a vattn_dtype")));
    }
    *out = size;
    return static_cast<int>(VATTN_OK);
  });
}

int vattn_backend_host(vattn_backend** out) {
  constexpr const char* kFn = "vattn_backend_host";
  if (out == nullptr) return vattn::NullArgument(kFn, "out");
  *out = nullptr;
  return vattn::Guard(kFn, [&] {
    return vattn::WrapBackend(kFn, vattn::MakeHostBackend(), out);
  });
}

int vattn_backend_cuda(int device, vattn_backend** out) {
  constexpr const char* kFn = "vattn_backend_cuda";
  if (out == nullptr) return vattn::NullArgument(kFn, "out");
  *out = nullptr;
  return vattn::Guard(kFn, [&] {
    return vattn::WrapBackend(kFn, vattn::MakeCudaBackend(device), out);
  });
}

void vattn_backend_release(vattn_backend* backend) { delete backend; }

int vattn_cuda_device_count(int* out) {
  constexpr const char* kFn = "vattn_cuda_device_count";
  return vattn::Guard(kFn, [&] {
    if (out == nullptr) return vattn::NullArgument(kFn, "out");
    const absl::StatusOr<int> count = vattn::CudaDeviceCount();
    if (!count.ok()) return vattn::Fail(kFn, count.status());
    *out = *count;
    return static_cast<int>(VATTN_OK);
  });
}

void vattn_cache_options_default(vattn_cache_options* options) {
  if (options == nullptr) return;
  vattn::ToC(vattn::KVCacheOptions{}, options);
}

int vattn_cache_create(const vattn_cache_options* options,
                       vattn_backend* backend, vattn_cache** out) {
  constexpr const char* kFn = "vattn_cache_create";
  if (out == nullptr) return vattn::NullArgument(kFn, "out");
  *out = nullptr;
  return vattn::Guard(kFn, [&] {
    if (options == nullptr) return vattn::NullArgument(kFn, "options");
    if (backend == nullptr) return vattn::NullArgument(kFn, "backend");
    const absl::Status size = vattn::CheckStructSize(
        "options", options->struct_size, sizeof(vattn_cache_options));
    if (!size.ok()) return vattn::Fail(kFn, size);
    absl::StatusOr<std::unique_ptr<vattn::KVCache>> cache =
        vattn::KVCache::Create(vattn::FromC(*options), backend->backend);
    if (!cache.ok()) return vattn::Fail(kFn, cache.status());
    *out = new vattn_cache{*std::move(cache)};
    return static_cast<int>(VATTN_OK);
  });
}

void vattn_cache_destroy(vattn_cache* cache) { delete cache; }

int vattn_cache_alloc_slot(vattn_cache* cache, int64_t expected_tokens,
                           int* slot) {
  constexpr const char* kFn = "vattn_cache_alloc_slot";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (slot == nullptr) return vattn::NullArgument(kFn, "slot");
    const absl::StatusOr<int> got = cache->cache->AllocSlot(expected_tokens);
    if (!got.ok()) return vattn::Fail(kFn, got.status());
    *slot = *got;
    return static_cast<int>(VATTN_OK);
  });
}

int vattn_cache_grow(vattn_cache* cache, int slot, int64_t tokens) {
  constexpr const char* kFn = "vattn_cache_grow";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    return vattn::Report(kFn, cache->cache->Grow(slot, tokens));
  });
}

int vattn_cache_shrink(vattn_cache* cache, int slot, int64_t tokens) {
  constexpr const char* kFn = "vattn_cache_shrink";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    return vattn::Report(kFn, cache->cache->Shrink(slot, tokens));
  });
}

int vattn_cache_free(vattn_cache* cache, int slot, void* stream,
                     int has_fence) {
  constexpr const char* kFn = "vattn_cache_free";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (has_fence == 0) return vattn::Report(kFn, cache->cache->Free(slot));
    return vattn::Report(
        kFn, cache->cache->Free(slot, vattn::Stream::FromHandle(stream)));
  });
}

int vattn_cache_free_no_fence(vattn_cache* cache, int slot) {
  constexpr const char* kFn = "vattn_cache_free_no_fence";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    return vattn::Report(kFn, cache->cache->Free(slot, vattn::kNoFence));
  });
}

int vattn_cache_step(vattn_cache* cache, const vattn_step_request* requests,
                     size_t n, vattn_step_result* result) {
  constexpr const char* kFn = "vattn_cache_step";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (requests == nullptr && n != 0) {
      return vattn::NullArgument(kFn, "requests (with n > 0)");
    }
    // The layouts of vattn_step_request and StepRequest are not promised to
    // match, so copy, into a per-thread buffer that keeps its capacity (Step
    // is on every decode step's path; this allocates only when the batch
    // outgrows the largest so far on this thread).
    thread_local std::vector<vattn::StepRequest> batch;
    batch.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      batch[i].slot = requests[i].slot;
      batch[i].tokens = requests[i].tokens;
    }
    const absl::StatusOr<vattn::StepResult> step =
        cache->cache->Step(absl::MakeConstSpan(batch));
    if (!step.ok()) return vattn::Fail(kFn, step.status());
    if (result != nullptr) {
      result->misses = step->misses;
      result->map_nanos = step->map_nanos;
    }
    return static_cast<int>(VATTN_OK);
  });
}

int vattn_cache_k(const vattn_cache* cache, int layer,
                  vattn_tensor_view* out) {
  constexpr const char* kFn = "vattn_cache_k";
  return vattn::Guard(kFn,
                      [&] { return vattn::View(kFn, cache, layer, true, out); });
}

int vattn_cache_v(const vattn_cache* cache, int layer,
                  vattn_tensor_view* out) {
  constexpr const char* kFn = "vattn_cache_v";
  return vattn::Guard(
      kFn, [&] { return vattn::View(kFn, cache, layer, false, out); });
}

int vattn_cache_get_stats(const vattn_cache* cache, vattn_cache_stats* out) {
  constexpr const char* kFn = "vattn_cache_get_stats";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (out == nullptr) return vattn::NullArgument(kFn, "out");
    const absl::Status size = vattn::CheckStructSize(
        "out", out->struct_size, sizeof(vattn_cache_stats));
    if (!size.ok()) return vattn::Fail(kFn, size);
    vattn::ToC(cache->cache->Stats(), out);
    return static_cast<int>(VATTN_OK);
  });
}

int vattn_cache_get_slot(const vattn_cache* cache, int slot,
                         vattn_slot_info* out) {
  constexpr const char* kFn = "vattn_cache_get_slot";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (out == nullptr) return vattn::NullArgument(kFn, "out");
    const absl::Status size = vattn::CheckStructSize(
        "out", out->struct_size, sizeof(vattn_slot_info));
    if (!size.ok()) return vattn::Fail(kFn, size);
    const absl::StatusOr<vattn::SlotInfo> info = cache->cache->GetSlot(slot);
    if (!info.ok()) return vattn::Fail(kFn, info.status());
    out->active = info->active ? 1 : 0;
    out->extents = info->extents;
    out->length = info->length;
    out->backed_tokens = info->backed_tokens;
    out->mapped_bytes = info->mapped_bytes;
    out->adopted_bytes = info->adopted_bytes;
    return static_cast<int>(VATTN_OK);
  });
}

int vattn_cache_bytes_per_token(const vattn_cache* cache, int64_t* out) {
  constexpr const char* kFn = "vattn_cache_bytes_per_token";
  if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
  if (out == nullptr) return vattn::NullArgument(kFn, "out");
  *out = cache->cache->bytes_per_token();
  return static_cast<int>(VATTN_OK);
}

int vattn_cache_slot_ranges(const vattn_cache* cache, int slot, int64_t tokens,
                            vattn_memory_range* out, size_t capacity,
                            size_t* count) {
  constexpr const char* kFn = "vattn_cache_slot_ranges";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (count == nullptr) return vattn::NullArgument(kFn, "count");
    if (out == nullptr && capacity > 0) return vattn::NullArgument(kFn, "out");
    const absl::StatusOr<std::vector<vattn::MemoryRange>> ranges =
        cache->cache->SlotRanges(slot, tokens);
    if (!ranges.ok()) return vattn::Fail(kFn, ranges.status());
    *count = ranges->size();
    if (capacity < ranges->size()) {
      return vattn::Fail(kFn, absl::InvalidArgumentError(absl::StrCat(
                                  "capacity ", capacity, " is below the ",
                                  ranges->size(), " ranges of slot ", slot)));
    }
    for (std::size_t i = 0; i < ranges->size(); ++i) {
      out[i].address = static_cast<uint64_t>((*ranges)[i].address);
      out[i].bytes = (*ranges)[i].bytes;
    }
    return static_cast<int>(VATTN_OK);
  });
}

int vattn_cache_reservation(const vattn_cache* cache, vattn_memory_range* out) {
  constexpr const char* kFn = "vattn_cache_reservation";
  if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
  if (out == nullptr) return vattn::NullArgument(kFn, "out");
  const vattn::MemoryRange r = cache->cache->Reservation();
  out->address = static_cast<uint64_t>(r.address);
  out->bytes = r.bytes;
  return static_cast<int>(VATTN_OK);
}

}  // extern "C"
