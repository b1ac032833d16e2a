// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Where a cache's bytes are: the regions a slot spans, their strides, how
// many bytes back a number of tokens, how big the next extent is, and the
// K/V views. A value type computed once from the options and the backend's
// granularity; no backend calls, no state.
#ifndef VATTN_SRC_CACHE_GEOMETRY_H_
#define VATTN_SRC_CACHE_GEOMETRY_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "vattn/kv_cache.h"
#include "vattn/options.h"

namespace vattn {

// The address layout of one cache. A slot's tokens live in `num_regions`
// separately mapped ranges (one token-major; 2 x layers layer-major, K and V
// of each layer), each `region_stride` bytes of virtual space per slot,
// region-major: region r of slot s starts at (r * max_slots + s) *
// region_stride from the reservation's base. Copyable; thread-compatible
// (const methods only after Make).
class CacheGeometry {
 public:
  // InvalidArgument: the granularity is not a power of two, or the cache
  // needs more virtual space than `max_reservation_bytes` (the message
  // names max_slots, max_tokens and both sizes). `options` must have passed
  // Validate().
  static absl::StatusOr<CacheGeometry> Make(const KVCacheOptions& options,
                                            std::int64_t granularity,
                                            std::size_t max_reservation_bytes,
                                            const char* backend_name = "");

  int num_regions() const { return num_regions_; }
  std::int64_t granularity() const { return granularity_; }
  // Bytes of one token in one region.
  std::int64_t token_bytes() const { return token_bytes_; }
  // Bytes of one token, K and V of every layer.
  std::int64_t bytes_per_token() const { return token_bytes_ * num_regions_; }
  // Virtual bytes of one slot in one region (granularity-aligned).
  std::int64_t region_stride() const { return region_stride_; }
  // The whole reservation.
  std::size_t reserved_bytes() const { return reserved_bytes_; }
  // Decode extents' bounds per region: min_extent_bytes (at least one
  // granule) and the cap (max_extent_bytes, else max_extent_tokens' worth
  // rounded down to the granularity), never below the minimum.
  std::int64_t min_extent() const { return min_extent_; }
  std::int64_t max_extent() const { return max_extent_; }

  // Offset of region `region` of `slot` from the reservation's base.
  std::int64_t RegionOffset(int slot, int region) const {
    return (static_cast<std::int64_t>(region) * max_slots_ + slot) *
           region_stride_;
  }
  // `bytes` rounded up to the granularity (a mask: it is a power of two).
  std::int64_t RoundUpToGranule(std::int64_t bytes) const {
    return (bytes + granule_mask_) & ~granule_mask_;
  }
  // Bytes per region that back `tokens` (0 <= tokens <= max_tokens): on
  // Step's path, so one multiply and a mask.
  std::int64_t BytesFor(std::int64_t tokens) const {
    return std::min(region_stride_, RoundUpToGranule(tokens * token_bytes_));
  }
  // Tokens that `bytes` per region back.
  std::int64_t BackedTokens(std::int64_t bytes) const {
    return std::min(max_tokens_, bytes / token_bytes_);
  }
  // Size of the next extent for a slot with `mapped` bytes per region that
  // needs at least `deficit` more: one extent covering the deficit and, for
  // decode growth, one that doubles the slot, within [min_extent,
  // max_extent]; never past the slot's stride.
  std::int64_t ExtentSize(std::int64_t mapped, std::int64_t deficit) const;

  // The strided view of layer `layer`'s K (v = false) or V (v = true) over a
  // reservation at `base`; an empty view for a layer out of range.
  TensorView View(std::uintptr_t base, int layer, bool v) const;

 private:
  CacheGeometry() = default;

  int num_layers_ = 0;
  int num_kv_heads_ = 0;
  int head_dim_ = 0;
  DType dtype_ = DType::kFloat16;
  Layout layout_ = Layout::kTokenMajor;
  int max_slots_ = 0;
  std::int64_t max_tokens_ = 0;
  int num_regions_ = 0;
  std::int64_t granularity_ = 0;
  std::int64_t granule_mask_ = 0;
  std::int64_t elem_bytes_ = 0;
  std::int64_t token_bytes_ = 0;
  std::int64_t region_stride_ = 0;
  std::size_t reserved_bytes_ = 0;
  std::int64_t min_extent_ = 0;
  std::int64_t max_extent_ = 0;
};

}  // namespace vattn

#endif  // VATTN_SRC_CACHE_GEOMETRY_H_
