// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "vattn/options.h"

#include "absl/strings/str_format.h"

namespace vattn {

std::size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    case DType::kFloat8E4M3:
    case DType::kInt8:
      return 1;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
    case DType::kFloat8E4M3:
      return "float8_e4m3";
    case DType::kInt8:
      return "int8";
  }
  return "unknown";
}

const char* LayoutName(Layout layout) {
  switch (layout) {
    case Layout::kTokenMajor:
      return "token-major";
    case Layout::kLayerMajor:
      return "layer-major";
  }
  return "unknown";
}

namespace {

absl::Status Positive(const char* field, std::int64_t value) {
  if (value > 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrFormat("KVCacheOptions.%s must be positive, got %d", field,
                      value));
}

}  // namespace

absl::Status KVCacheOptions::Validate() const {
  for (const auto& [field, value] :
       {std::pair<const char*, std::int64_t>{"num_layers", num_layers},
        {"num_kv_heads", num_kv_heads},
        {"head_dim", head_dim},
        {"max_slots", max_slots},
        {"max_tokens", max_tokens},
        {"max_extent_tokens", max_extent_tokens}}) {
    if (absl::Status s = Positive(field, value); !s.ok()) return s;
  }
  if (DTypeSize(dtype) == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.dtype has no such value (%d)", static_cast<int>(dtype)));
  }
  if (layout != Layout::kTokenMajor && layout != Layout::kLayerMajor) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KVCacheOptions.layout has no such value (%d)",
                        static_cast<int>(layout)));
  }
  // Products that size the reservation must not overflow: bound each factor
  // so that slots * tokens * layers * 2 * heads * dim * 8 stays below 2^62.
  const long double total = static_cast<long double>(max_slots) * max_tokens *
                            num_layers * 2 * num_kv_heads * head_dim *
                            static_cast<long double>(DTypeSize(dtype));
  if (total > static_cast<long double>(std::int64_t{1} << 60)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions: max_slots x max_tokens x num_layers x 2 x "
        "num_kv_heads x head_dim x dtype size = %.3Le bytes overflows the "
        "address space",
        total));
  }
  // Byte sizes are converted to signed 64-bit arithmetic inside the cache; a
  // value near SIZE_MAX (say, -1 meant as "unlimited") would wrap negative
  // and, for prealloc_handle_bytes, round to a zero-byte handle size.
  constexpr std::size_t kMaxBytes = std::size_t{1} << 60;
  for (const auto& [field, value] :
       {std::pair<const char*, std::size_t>{"memory_budget_bytes",
                                            memory_budget_bytes},
        {"min_extent_bytes", min_extent_bytes},
        {"max_extent_bytes", max_extent_bytes},
        {"prealloc_handle_bytes", prealloc_handle_bytes},
        {"arbiter_floor_bytes", arbiter_floor_bytes},
        {"arbiter_cap_bytes", arbiter_cap_bytes}}) {
    if (value > kMaxBytes) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KVCacheOptions.%s (%d) is beyond any address space (at most 2^60)",
          field, value));
    }
  }
  if (max_extent_bytes != 0 && min_extent_bytes > max_extent_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.min_extent_bytes (%d) exceeds max_extent_bytes (%d)",
        min_extent_bytes, max_extent_bytes));
  }
  if (max_prefixes < 0 || max_prefixes > (1 << 20)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.max_prefixes must be in [0, %d], got %d", 1 << 20,
        max_prefixes));
  }
  if (prealloc_handles < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.prealloc_handles must be >= 0, got %d",
        prealloc_handles));
  }
  // The look-ahead is added to a length (at most max_tokens, below 2^60):
  // bound it so the sum cannot overflow.
  constexpr std::int64_t kMaxLookAhead = std::int64_t{1} << 60;
  if (map_ahead_tokens < 0 || map_ahead_tokens > kMaxLookAhead) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.map_ahead_tokens must be in [0, 2^60], got %d",
        map_ahead_tokens));
  }
  // The decode extent cap in bytes: max_extent_tokens x bytes per token
  // (all layers, K and V; each tensor's share is smaller).
  const long double cap_bytes =
      static_cast<long double>(max_extent_tokens) * num_layers * 2 *
      num_kv_heads * head_dim * static_cast<long double>(DTypeSize(dtype));
  if (max_extent_bytes == 0 && cap_bytes > static_cast<long double>(kMaxBytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.max_extent_tokens (%d) x %d bytes per token = %.3Le "
        "bytes is beyond any address space (at most 2^60)",
        max_extent_tokens,
        static_cast<std::int64_t>(num_layers) * 2 * num_kv_heads * head_dim *
            static_cast<std::int64_t>(DTypeSize(dtype)),
        cap_bytes));
  }
  // Handles created up front: their total must be computable (Create checks
  // it against the budget). 0 bytes means one granule: always small enough.
  const long double prealloc_total =
      static_cast<long double>(prealloc_handles) *
      static_cast<long double>(prealloc_handle_bytes);
  if (prealloc_total > static_cast<long double>(kMaxBytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.prealloc_handles (%d) x prealloc_handle_bytes (%d) = "
        "%.3Le bytes is beyond any address space (at most 2^60)",
        prealloc_handles, prealloc_handle_bytes, prealloc_total));
  }
  if (pool_low_water < 0 || pool_high_water < pool_low_water) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.pool_low_water (%d) and pool_high_water (%d) need "
        "0 <= low <= high",
        pool_low_water, pool_high_water));
  }
  // The shared budget's per-cache options (vattn/memory_arbiter.h).
  if (arbiter == nullptr) {
    if (arbiter_floor_bytes != 0 || arbiter_cap_bytes != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KVCacheOptions.arbiter_%s_bytes (%d) needs an arbiter "
          "(KVCacheOptions.arbiter is null; memory_budget_bytes is this "
          "cache's own budget)",
          arbiter_floor_bytes != 0 ? "floor" : "cap",
          arbiter_floor_bytes != 0 ? arbiter_floor_bytes : arbiter_cap_bytes));
    }
  } else {
    if (memory_budget_bytes != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KVCacheOptions.memory_budget_bytes (%d) must be 0 with an arbiter: "
          "the arbiter's budget is shared, arbiter_cap_bytes limits this "
          "cache",
          memory_budget_bytes));
    }
    if (arbiter_cap_bytes != 0 && arbiter_floor_bytes > arbiter_cap_bytes) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KVCacheOptions.arbiter_floor_bytes (%d) exceeds arbiter_cap_bytes "
          "(%d)",
          arbiter_floor_bytes, arbiter_cap_bytes));
    }
  }
  return absl::OkStatus();
}

}  // namespace vattn
