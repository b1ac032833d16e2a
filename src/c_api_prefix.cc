// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The C API's prefix sharing (include/vattn/c_api.h, "Prefix sharing") over
// KVCache::KeepPrefix, AllocSlotWithPrefix, DropPrefix, Fork, GetPrefix and
// the split hints of AllocSlot and Grow. Same rules as src/c_api.cc: check
// the pointers, call the C++ API inside Guard, keep a failure's text for
// vattn_last_error(), write outputs only on success.
#include <cstddef>
#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "src/c_api_internal.h"
#include "vattn/c_api.h"
#include "vattn/kv_cache.h"
#include "vattn/stream.h"

namespace vattn {
namespace {

using c_api_internal::CheckStructSize;
using c_api_internal::Fail;
using c_api_internal::Guard;
using c_api_internal::NullArgument;
using c_api_internal::Report;

// The stream a copy is ordered on: none (the C++ overload without one) when
// has_stream is 0.
std::optional<Stream> StreamArg(void* stream, int has_stream) {
  if (has_stream == 0) return std::nullopt;
  return Stream::FromHandle(stream);
}

// *out = the slot of a successful call.
int SlotOut(const char* function, const absl::StatusOr<int>& got, int* out) {
  if (!got.ok()) return Fail(function, got.status());
  *out = *got;
  return VATTN_OK;
}

}  // namespace
}  // namespace vattn

extern "C" {

int vattn_cache_alloc_slot_split(vattn_cache* cache, int64_t expected_tokens,
                                 int64_t split_at_tokens, int* slot) {
  constexpr const char* kFn = "vattn_cache_alloc_slot_split";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (slot == nullptr) return vattn::NullArgument(kFn, "slot");
    return vattn::SlotOut(
        kFn, cache->cache->AllocSlot(expected_tokens, split_at_tokens), slot);
  });
}

int vattn_cache_grow_split(vattn_cache* cache, int slot, int64_t tokens,
                           int64_t split_at_tokens) {
  constexpr const char* kFn = "vattn_cache_grow_split";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    return vattn::Report(kFn,
                         cache->cache->Grow(slot, tokens, split_at_tokens));
  });
}

int vattn_cache_keep_prefix(vattn_cache* cache, int slot, int64_t tokens,
                            uint64_t prefix_id, void* stream, int has_stream) {
  constexpr const char* kFn = "vattn_cache_keep_prefix";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    const std::optional<vattn::Stream> s = vattn::StreamArg(stream, has_stream);
    return vattn::Report(
        kFn, s ? cache->cache->KeepPrefix(slot, tokens, prefix_id, *s)
               : cache->cache->KeepPrefix(slot, tokens, prefix_id));
  });
}

int vattn_cache_alloc_slot_with_prefix(vattn_cache* cache, uint64_t prefix_id,
                                       int64_t tokens, int64_t expected_tokens,
                                       void* stream, int has_stream,
                                       int* slot) {
  constexpr const char* kFn = "vattn_cache_alloc_slot_with_prefix";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (slot == nullptr) return vattn::NullArgument(kFn, "slot");
    const std::optional<vattn::Stream> s = vattn::StreamArg(stream, has_stream);
    return vattn::SlotOut(
        kFn,
        s ? cache->cache->AllocSlotWithPrefix(prefix_id, tokens,
                                              expected_tokens, *s)
          : cache->cache->AllocSlotWithPrefix(prefix_id, tokens,
                                              expected_tokens),
        slot);
  });
}

int vattn_cache_drop_prefix(vattn_cache* cache, uint64_t prefix_id) {
  constexpr const char* kFn = "vattn_cache_drop_prefix";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    return vattn::Report(kFn, cache->cache->DropPrefix(prefix_id));
  });
}

int vattn_cache_fork(vattn_cache* cache, int slot, void* stream,
                     int has_stream, int* child) {
  constexpr const char* kFn = "vattn_cache_fork";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (child == nullptr) return vattn::NullArgument(kFn, "child");
    const std::optional<vattn::Stream> s = vattn::StreamArg(stream, has_stream);
    return vattn::SlotOut(
        kFn, s ? cache->cache->Fork(slot, *s) : cache->cache->Fork(slot),
        child);
  });
}

int vattn_cache_get_prefix(const vattn_cache* cache, uint64_t prefix_id,
                           vattn_prefix_info* out) {
  constexpr const char* kFn = "vattn_cache_get_prefix";
  return vattn::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::NullArgument(kFn, "cache");
    if (out == nullptr) return vattn::NullArgument(kFn, "out");
    const absl::Status size = vattn::CheckStructSize(
        "out", out->struct_size, sizeof(vattn_prefix_info));
    if (!size.ok()) return vattn::Fail(kFn, size);
    const absl::StatusOr<vattn::PrefixInfo> info =
        cache->cache->GetPrefix(prefix_id);
    if (!info.ok()) return vattn::Fail(kFn, info.status());
    out->tokens = info->tokens;
    out->bytes = info->bytes;
    out->tail_bytes = info->tail_bytes;
    out->whole_extents = info->whole_extents;
    out->users = info->users;
    out->hits = info->hits;
    return static_cast<int>(VATTN_OK);
  });
}

}  // extern "C"
