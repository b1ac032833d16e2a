// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// CacheGeometry on plain options: no backend. Every figure is computed here
// independently of the class from the layout the headers document.

#include "src/cache_geometry.h"

#include <cstdint>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace vattn {
namespace {

constexpr std::int64_t kMiB = std::int64_t{1} << 20;
constexpr std::size_t kHuge = std::size_t{1} << 46;

KVCacheOptions Llama(Layout layout) {
  KVCacheOptions o;  // 32 layers x 8 heads x 128 dim fp16.
  o.max_slots = 4;
  o.max_tokens = 1000;
  o.layout = layout;
  return o;
}

TEST(CacheGeometryTest, TokenMajorIsOneRegionOfAllLayers) {
  VATTN_ASSERT_OK_AND_ASSIGN(
      CacheGeometry g,
      CacheGeometry::Make(Llama(Layout::kTokenMajor), 2 * kMiB, kHuge));
  EXPECT_EQ(g.num_regions(), 1);
  EXPECT_EQ(g.token_bytes(), 32 * 2 * 8 * 128 * 2);  // 128 KiB.
  EXPECT_EQ(g.bytes_per_token(), g.token_bytes());
  // 1000 tokens x 128 KiB = 125 MiB, rounded up to 126 MiB.
  EXPECT_EQ(g.region_stride(), 126 * kMiB);
  EXPECT_EQ(g.reserved_bytes(), static_cast<std::size_t>(4 * 126 * kMiB));
  EXPECT_EQ(g.RegionOffset(3, 0), 3 * 126 * kMiB);
  // 64 tokens' worth (8 MiB) caps decode extents; one granule starts them.
  EXPECT_EQ(g.min_extent(), 2 * kMiB);
  EXPECT_EQ(g.max_extent(), 8 * kMiB);
}

TEST(CacheGeometryTest, LayerMajorIsTwoRegionsPerLayerRegionMajor) {
  VATTN_ASSERT_OK_AND_ASSIGN(
      CacheGeometry g,
      CacheGeometry::Make(Llama(Layout::kLayerMajor), 2 * kMiB, kHuge));
  EXPECT_EQ(g.num_regions(), 64);
  EXPECT_EQ(g.token_bytes(), 8 * 128 * 2);
  EXPECT_EQ(g.bytes_per_token(), 64 * 8 * 128 * 2);
  EXPECT_EQ(g.region_stride(), 2 * kMiB);  // 1000 x 2 KiB < 2 MiB.
  // Region r of slot s at (r * max_slots + s) strides.
  EXPECT_EQ(g.RegionOffset(1, 5), (5 * 4 + 1) * 2 * kMiB);
}

TEST(CacheGeometryTest, BytesForRoundsUpToTheGranuleAndStopsAtTheStride) {
  VATTN_ASSERT_OK_AND_ASSIGN(
      CacheGeometry g,
      CacheGeometry::Make(Llama(Layout::kTokenMajor), 2 * kMiB, kHuge));
  EXPECT_EQ(g.BytesFor(0), 0);
  EXPECT_EQ(g.BytesFor(1), 2 * kMiB);
  EXPECT_EQ(g.BytesFor(16), 2 * kMiB);
  EXPECT_EQ(g.BytesFor(17), 4 * kMiB);
  EXPECT_EQ(g.BytesFor(1000), 126 * kMiB);
  EXPECT_EQ(g.RoundUpToGranule(2 * kMiB + 1), 4 * kMiB);
  EXPECT_EQ(g.RoundUpToGranule(2 * kMiB), 2 * kMiB);
  EXPECT_EQ(g.BackedTokens(2 * kMiB), 16);
  EXPECT_EQ(g.BackedTokens(3 * kMiB), 24);
  EXPECT_EQ(g.BackedTokens(126 * kMiB), 1000);  // Never above max_tokens.
  // Every token count maps to the smallest granule multiple covering it.
  for (std::int64_t t = 0; t <= 1000; ++t) {
    const std::int64_t b = g.BytesFor(t);
    EXPECT_EQ(b % (2 * kMiB), 0);
    EXPECT_GE(b, t * g.token_bytes());
    EXPECT_LT(b - t * g.token_bytes(), 2 * kMiB);
  }
}

TEST(CacheGeometryTest, ExtentsCoverTheDeficitAndDoubleUpToTheCap) {
  VATTN_ASSERT_OK_AND_ASSIGN(
      CacheGeometry g,
      CacheGeometry::Make(Llama(Layout::kTokenMajor), 2 * kMiB, kHuge));
  // A prefill: one extent of exactly what it needs.
  EXPECT_EQ(g.ExtentSize(0, 31 * kMiB), 32 * kMiB);
  // Decode growth: doubles the mapped size, from one granule to the cap.
  EXPECT_EQ(g.ExtentSize(0, 1), 2 * kMiB);
  EXPECT_EQ(g.ExtentSize(2 * kMiB, 1), 2 * kMiB);
  EXPECT_EQ(g.ExtentSize(4 * kMiB, 1), 4 * kMiB);
  EXPECT_EQ(g.ExtentSize(6 * kMiB, 1), 4 * kMiB);  // Floor power of two.
  EXPECT_EQ(g.ExtentSize(64 * kMiB, 1), 8 * kMiB);
  // Never past the slot's stride.
  EXPECT_EQ(g.ExtentSize(124 * kMiB, 1), 2 * kMiB);
}

TEST(CacheGeometryTest, ViewsFollowTheDocumentedStrides) {
  for (Layout layout : {Layout::kTokenMajor, Layout::kLayerMajor}) {
    VATTN_ASSERT_OK_AND_ASSIGN(CacheGeometry g,
                               CacheGeometry::Make(Llama(layout), 2 * kMiB, kHuge));
    const std::uintptr_t base = std::uintptr_t{1} << 40;
    const TensorView k = g.View(base, 3, false);
    const TensorView v = g.View(base, 3, true);
    EXPECT_EQ(k.shape, (std::array<std::int64_t, 4>{4, 1000, 8, 128}));
    EXPECT_EQ(k.strides[0], g.region_stride() / 2);
    EXPECT_EQ(k.strides[2], 128);
    EXPECT_EQ(k.strides[3], 1);
    const auto addr = [](const TensorView& t) {
      return reinterpret_cast<std::uintptr_t>(t.data);
    };
    if (layout == Layout::kTokenMajor) {
      EXPECT_EQ(k.strides[1], 32 * 2 * 8 * 128);
      EXPECT_EQ(addr(k), base + 3 * 2 * 8 * 128 * 2);
      EXPECT_EQ(addr(v), addr(k) + 8 * 128 * 2);
    } else {
      EXPECT_EQ(k.strides[1], 8 * 128);
      EXPECT_EQ(addr(k), base + static_cast<std::uintptr_t>(g.RegionOffset(0, 6)));
      EXPECT_EQ(addr(v), base + static_cast<std::uintptr_t>(g.RegionOffset(0, 7)));
    }
    EXPECT_EQ(g.View(base, 32, false).data, nullptr);
    EXPECT_EQ(g.View(base, -1, true).data, nullptr);
  }
}

TEST(CacheGeometryTest, RejectsAGranularityThatIsNotAPowerOfTwo) {
  VATTN_EXPECT_CODE(
      CacheGeometry::Make(Llama(Layout::kTokenMajor), 3 * kMiB, kHuge),
      absl::StatusCode::kInvalidArgument);
}

TEST(CacheGeometryTest, RejectsMoreVirtualSpaceThanTheBackendReserves) {
  absl::StatusOr<CacheGeometry> g = CacheGeometry::Make(
      Llama(Layout::kTokenMajor), 2 * kMiB, 4 * 126 * kMiB - 1, "tiny");
  ASSERT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("tiny"), absl::string_view::npos);
  VATTN_EXPECT_OK(CacheGeometry::Make(Llama(Layout::kTokenMajor), 2 * kMiB,
                                      4 * 126 * kMiB)
                      .status());
}

}  // namespace
}  // namespace vattn
