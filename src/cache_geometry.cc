// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/cache_geometry.h"

#include "absl/numeric/bits.h"
#include "absl/strings/str_format.h"

namespace vattn {

absl::StatusOr<CacheGeometry> CacheGeometry::Make(
    const KVCacheOptions& options, std::int64_t granularity,
    std::size_t max_reservation_bytes, const char* backend_name) {
  if (granularity <= 0 ||
      !absl::has_single_bit(static_cast<std::uint64_t>(granularity))) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "backend %s: granularity %d is not a power of two", backend_name,
        granularity));
  }
  CacheGeometry g;
  g.num_layers_ = options.num_layers;
  g.num_kv_heads_ = options.num_kv_heads;
  g.head_dim_ = options.head_dim;
  g.dtype_ = options.dtype;
  g.layout_ = options.layout;
  g.max_slots_ = options.max_slots;
  g.max_tokens_ = options.max_tokens;
  g.granularity_ = granularity;
  g.granule_mask_ = granularity - 1;
  g.elem_bytes_ = static_cast<std::int64_t>(DTypeSize(options.dtype));
  const std::int64_t row = static_cast<std::int64_t>(options.num_kv_heads) *
                           options.head_dim * g.elem_bytes_;
  if (options.layout == Layout::kTokenMajor) {
    g.num_regions_ = 1;
    g.token_bytes_ = row * 2 * options.num_layers;
  } else {
    g.num_regions_ = 2 * options.num_layers;
    g.token_bytes_ = row;
  }
  // Validate() bounds the whole cache below 2^60 bytes: nothing here
  // overflows.
  g.region_stride_ = g.RoundUpToGranule(options.max_tokens * g.token_bytes_);
  const long double total = static_cast<long double>(g.region_stride_) *
                            options.max_slots * g.num_regions_;
  if (total > static_cast<long double>(max_reservation_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions: the cache needs %.0Lf bytes of virtual space "
        "(max_slots %d x max_tokens %d x %d bytes per token), more than "
        "backend %s can reserve (max_reservation_bytes %d)",
        total, options.max_slots, options.max_tokens, g.bytes_per_token(),
        backend_name, max_reservation_bytes));
  }
  g.reserved_bytes_ = static_cast<std::size_t>(total);

  g.min_extent_ = std::max(
      granularity,
      g.RoundUpToGranule(static_cast<std::int64_t>(options.min_extent_bytes)));
  // The cap in bytes if given, else max_extent_tokens' worth (Validate()
  // keeps that product in range); never below the smallest extent.
  const std::int64_t cap =
      options.max_extent_bytes != 0
          ? static_cast<std::int64_t>(options.max_extent_bytes)
          : options.max_extent_tokens * g.token_bytes_;
  g.max_extent_ = std::max(g.min_extent_, cap & ~g.granule_mask_);
  return g;
}

std::int64_t CacheGeometry::ExtentSize(std::int64_t mapped,
                                       std::int64_t deficit) const {
  std::int64_t growth = min_extent_;
  if (mapped > 0) {
    const std::int64_t floor_pow2 = static_cast<std::int64_t>(
        absl::bit_floor(static_cast<std::uint64_t>(mapped)));
    growth = std::clamp(floor_pow2, min_extent_, max_extent_);
  }
  const std::int64_t size = std::max(RoundUpToGranule(deficit), growth);
  return std::min(size, region_stride_ - mapped);
}

TensorView CacheGeometry::View(std::uintptr_t base, int layer, bool v) const {
  TensorView view;
  if (layer < 0 || layer >= num_layers_) return view;
  const std::int64_t row = static_cast<std::int64_t>(num_kv_heads_) * head_dim_;
  view.dtype = dtype_;
  view.shape = {max_slots_, max_tokens_, num_kv_heads_, head_dim_};
  std::int64_t offset = 0;
  if (layout_ == Layout::kTokenMajor) {
    // [slot][token][layer][K,V][head][dim] in one region.
    view.strides = {region_stride_ / elem_bytes_, row * 2 * num_layers_,
                    head_dim_, 1};
    offset = (static_cast<std::int64_t>(layer) * 2 + (v ? 1 : 0)) * row *
             elem_bytes_;
  } else {
    // Region 2l is layer l's K, 2l + 1 its V: [slot][token][head][dim].
    view.strides = {region_stride_ / elem_bytes_, row, head_dim_, 1};
    offset = RegionOffset(0, 2 * layer + (v ? 1 : 0));
  }
  view.data = reinterpret_cast<void*>(base + static_cast<std::uintptr_t>(offset));
  return view;
}

}  // namespace vattn
