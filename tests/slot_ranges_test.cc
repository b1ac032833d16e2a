// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// KVCache::SlotRanges on the Host backend: the ranges' number, order, sizes
// and addresses per layout, checked against the K/V views (a byte written
// through a view must land where the ranges say, in the documented order);
// addresses that do not move as a slot grows; and every error code.

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"
#include "vattn/c_api.h"
#include "vattn/kv_cache.h"
#include "vattn/options.h"

namespace vattn {
namespace {

constexpr std::size_t kGranularity = std::size_t{64} << 10;

KVCacheOptions SmallOptions(Layout layout) {
  KVCacheOptions o;
  o.num_layers = 3;
  o.num_kv_heads = 2;
  o.head_dim = 8;
  o.dtype = DType::kFloat32;
  o.max_slots = 4;
  o.max_tokens = 4096;
  o.layout = layout;
  o.map_ahead_tokens = 0;
  return o;
}

std::unique_ptr<KVCache> MakeCache(const KVCacheOptions& o) {
  HostBackendOptions h;
  h.granularity = kGranularity;
  auto backend = MakeHostBackend(h);
  EXPECT_TRUE(backend.ok()) << testing::Describe(backend);
  auto cache = KVCache::Create(o, *std::move(backend));
  EXPECT_TRUE(cache.ok()) << testing::Describe(cache);
  return cache.ok() ? *std::move(cache) : nullptr;
}

// A value unique to each element's coordinates.
float Tag(int slot, std::int64_t t, int layer, int kv, int h, int d) {
  return static_cast<float>(((((slot * 4096 + t) * 3 + layer) * 2 + kv) * 2 + h) * 8 + d);
}

class SlotRangesTest : public ::testing::TestWithParam<Layout> {};

TEST_P(SlotRangesTest, RangesHoldTheSlotsTokensInTheDocumentedOrder) {
  const KVCacheOptions o = SmallOptions(GetParam());
  std::unique_ptr<KVCache> cache = MakeCache(o);
  ASSERT_NE(cache, nullptr);
  // Two slots, so a range that strays into the neighbour shows.
  VATTN_ASSERT_OK_AND_ASSIGN(const int other, cache->AllocSlot(0));
  VATTN_ASSERT_OK_AND_ASSIGN(const int slot, cache->AllocSlot(0));
  constexpr std::int64_t kTokens = 300;
  VATTN_ASSERT_OK(cache->Grow(other, kTokens));
  VATTN_ASSERT_OK(cache->Grow(slot, kTokens));
  for (int s : {other, slot}) {
    for (int l = 0; l < o.num_layers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        const TensorView view = kv == 0 ? cache->K(l) : cache->V(l);
        for (std::int64_t t = 0; t < kTokens; ++t) {
          for (int h = 0; h < o.num_kv_heads; ++h) {
            for (int d = 0; d < o.head_dim; ++d) {
              *reinterpret_cast<float*>(view.ElementAddress(s, t, h, d)) =
                  Tag(s, t, l, kv, h, d);
            }
          }
        }
      }
    }
  }

  VATTN_ASSERT_OK_AND_ASSIGN(const std::vector<MemoryRange> ranges,
                             cache->SlotRanges(slot, kTokens));
  const bool token_major = GetParam() == Layout::kTokenMajor;
  ASSERT_EQ(ranges.size(), token_major ? 1u : 2u * o.num_layers);
  std::size_t total = 0;
  for (const MemoryRange& r : ranges) {
    EXPECT_EQ(r.bytes, ranges[0].bytes);
    total += r.bytes;
  }
  EXPECT_EQ(total, static_cast<std::size_t>(kTokens * cache->bytes_per_token()));

  // The ranges, concatenated in order, are the documented byte stream:
  // token-major [token][layer][K,V][head][dim]; layer-major
  // [layer][K,V][token][head][dim].
  std::vector<float> expected;
  if (token_major) {
    for (std::int64_t t = 0; t < kTokens; ++t)
      for (int l = 0; l < o.num_layers; ++l)
        for (int kv = 0; kv < 2; ++kv)
          for (int h = 0; h < o.num_kv_heads; ++h)
            for (int d = 0; d < o.head_dim; ++d)
              expected.push_back(Tag(slot, t, l, kv, h, d));
  } else {
    for (int l = 0; l < o.num_layers; ++l)
      for (int kv = 0; kv < 2; ++kv)
        for (std::int64_t t = 0; t < kTokens; ++t)
          for (int h = 0; h < o.num_kv_heads; ++h)
            for (int d = 0; d < o.head_dim; ++d)
              expected.push_back(Tag(slot, t, l, kv, h, d));
  }
  std::vector<float> got(total / sizeof(float));
  std::size_t at = 0;
  for (const MemoryRange& r : ranges) {
    std::memcpy(reinterpret_cast<char*>(got.data()) + at,
                reinterpret_cast<const void*>(r.address), r.bytes);
    at += r.bytes;
  }
  ASSERT_EQ(got.size(), expected.size());
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < got.size(); ++i) mismatches += got[i] != expected[i];
  EXPECT_EQ(mismatches, 0u);

  // The first range starts at the slot's first element of K(0).
  EXPECT_EQ(ranges[0].address, cache->K(0).ElementAddress(slot, 0, 0, 0));
}

TEST_P(SlotRangesTest, AddressesStayPutAsTheSlotGrows) {
  const KVCacheOptions o = SmallOptions(GetParam());
  std::unique_ptr<KVCache> cache = MakeCache(o);
  ASSERT_NE(cache, nullptr);
  VATTN_ASSERT_OK_AND_ASSIGN(const int slot, cache->AllocSlot(0));
  VATTN_ASSERT_OK(cache->Grow(slot, 1));
  VATTN_ASSERT_OK_AND_ASSIGN(const std::vector<MemoryRange> small,
                             cache->SlotRanges(slot, 1));
  VATTN_ASSERT_OK(cache->Grow(slot, 4000));
  VATTN_ASSERT_OK_AND_ASSIGN(const std::vector<MemoryRange> large,
                             cache->SlotRanges(slot, 4000));
  ASSERT_EQ(small.size(), large.size());
  for (std::size_t i = 0; i < small.size(); ++i) {
    EXPECT_EQ(small[i].address, large[i].address) << "range " << i;
    EXPECT_EQ(large[i].bytes, small[i].bytes * 4000);
  }
  VATTN_ASSERT_OK_AND_ASSIGN(const std::vector<MemoryRange> none,
                             cache->SlotRanges(slot, 0));
  EXPECT_TRUE(none.empty());
}

TEST_P(SlotRangesTest, EveryRangeOfEverySlotLiesInTheReservation) {
  const KVCacheOptions o = SmallOptions(GetParam());
  std::unique_ptr<KVCache> cache = MakeCache(o);
  ASSERT_NE(cache, nullptr);
  const MemoryRange whole = cache->Reservation();
  EXPECT_GE(whole.bytes, static_cast<std::size_t>(o.max_slots * o.max_tokens *
                                                  cache->bytes_per_token()));
  EXPECT_EQ(whole.address, reinterpret_cast<DevicePtr>(cache->K(0).data));
  for (int i = 0; i < o.max_slots; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(const int slot, cache->AllocSlot(0));
    VATTN_ASSERT_OK(cache->Grow(slot, o.max_tokens));
    VATTN_ASSERT_OK_AND_ASSIGN(const std::vector<MemoryRange> ranges,
                               cache->SlotRanges(slot, o.max_tokens));
    for (const MemoryRange& r : ranges) {
      EXPECT_GE(r.address, whole.address);
      EXPECT_LE(r.address + r.bytes, whole.address + whole.bytes);
    }
  }
}

TEST_P(SlotRangesTest, BadInputIsRefusedWithItsCode) {
  const KVCacheOptions o = SmallOptions(GetParam());
  std::unique_ptr<KVCache> cache = MakeCache(o);
  ASSERT_NE(cache, nullptr);
  VATTN_EXPECT_CODE(cache->SlotRanges(-1, 1), absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(cache->SlotRanges(o.max_slots, 1),
                    absl::StatusCode::kInvalidArgument);
  // Never allocated.
  VATTN_EXPECT_CODE(cache->SlotRanges(0, 0), absl::StatusCode::kFailedPrecondition);
  VATTN_ASSERT_OK_AND_ASSIGN(const int slot, cache->AllocSlot(0));
  VATTN_EXPECT_CODE(cache->SlotRanges(slot, -1), absl::StatusCode::kInvalidArgument);
  VATTN_ASSERT_OK(cache->Grow(slot, 100));
  VATTN_ASSERT_OK_AND_ASSIGN(const SlotInfo info, cache->GetSlot(slot));
  VATTN_EXPECT_OK(cache->SlotRanges(slot, info.backed_tokens));
  VATTN_EXPECT_CODE(cache->SlotRanges(slot, info.backed_tokens + 1),
                    absl::StatusCode::kOutOfRange);
  VATTN_EXPECT_CODE(cache->SlotRanges(slot, o.max_tokens + 1),
                    absl::StatusCode::kOutOfRange);
  VATTN_ASSERT_OK(cache->Free(slot));
  VATTN_EXPECT_CODE(cache->SlotRanges(slot, 1), absl::StatusCode::kFailedPrecondition);
}

// The C ABI mirror: the same ranges as the C++ call, the count query, and
// the codes for a short buffer and bad input.
TEST(SlotRangesCApiTest, MirrorsTheCppCall) {
  vattn_cache_options o;
  vattn_cache_options_default(&o);
  o.num_layers = 2;
  o.num_kv_heads = 2;
  o.head_dim = 8;
  o.dtype = VATTN_DTYPE_FLOAT32;
  o.max_slots = 2;
  o.max_tokens = 1024;
  o.layout = VATTN_LAYOUT_LAYER_MAJOR;
  vattn_backend* backend = nullptr;
  ASSERT_EQ(vattn_backend_host(&backend), VATTN_OK) << vattn_last_error();
  vattn_cache* cache = nullptr;
  ASSERT_EQ(vattn_cache_create(&o, backend, &cache), VATTN_OK) << vattn_last_error();
  vattn_backend_release(backend);
  int slot = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache, 0, &slot), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(cache, slot, 100), VATTN_OK);

  std::size_t count = 99;
  ASSERT_EQ(vattn_cache_slot_ranges(cache, slot, 100, nullptr, 0, &count),
            VATTN_INVALID_ARGUMENT);  // The count is set all the same.
  EXPECT_EQ(count, 4u);
  std::vector<vattn_memory_range> ranges(3);
  EXPECT_EQ(vattn_cache_slot_ranges(cache, slot, 100, ranges.data(), 3, &count),
            VATTN_INVALID_ARGUMENT);
  EXPECT_NE(std::string(vattn_last_error()).find("capacity 3"), std::string::npos)
      << vattn_last_error();
  ranges.resize(4);
  ASSERT_EQ(vattn_cache_slot_ranges(cache, slot, 100, ranges.data(), 4, &count),
            VATTN_OK) << vattn_last_error();
  ASSERT_EQ(count, 4u);
  for (int i = 0; i < 4; ++i) {
    vattn_tensor_view view;
    ASSERT_EQ((i % 2 == 0 ? vattn_cache_k : vattn_cache_v)(cache, i / 2, &view), VATTN_OK);
    const std::uint64_t first =
        reinterpret_cast<std::uint64_t>(view.data) +
        static_cast<std::uint64_t>(slot * view.strides[0]) * sizeof(float);
    EXPECT_EQ(ranges[static_cast<std::size_t>(i)].address, first) << "range " << i;
    EXPECT_EQ(ranges[static_cast<std::size_t>(i)].bytes, 100u * 2 * 8 * sizeof(float));
  }
  vattn_memory_range whole;
  ASSERT_EQ(vattn_cache_reservation(cache, &whole), VATTN_OK);
  vattn_tensor_view k0;
  ASSERT_EQ(vattn_cache_k(cache, 0, &k0), VATTN_OK);
  EXPECT_EQ(whole.address, reinterpret_cast<std::uint64_t>(k0.data));
  EXPECT_GE(whole.bytes, 2u * 1024 * 2 * 2 * 2 * 8 * sizeof(float));
  EXPECT_EQ(vattn_cache_reservation(cache, nullptr), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_reservation(nullptr, &whole), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_slot_ranges(cache, slot, 100, nullptr, 4, &count),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_slot_ranges(cache, slot, 100, ranges.data(), 4, nullptr),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_slot_ranges(nullptr, slot, 100, ranges.data(), 4, &count),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_slot_ranges(cache, 7, 1, ranges.data(), 4, &count),
            VATTN_INVALID_ARGUMENT);
  // Above max_tokens (the 2 MiB granule backs all 1024 tokens here).
  EXPECT_EQ(vattn_cache_slot_ranges(cache, slot, 1025, ranges.data(), 4, &count),
            VATTN_OUT_OF_RANGE);
  EXPECT_EQ(vattn_cache_slot_ranges(cache, 1 - slot, 1, ranges.data(), 4, &count),
            VATTN_FAILED_PRECONDITION);
  vattn_cache_destroy(cache);
}

INSTANTIATE_TEST_SUITE_P(Layouts, SlotRangesTest,
                         ::testing::Values(Layout::kTokenMajor, Layout::kLayerMajor),
                         [](const ::testing::TestParamInfo<Layout>& p) {
                           return std::string(LayoutName(p.param)) == "token-major"
                                      ? std::string("TokenMajor")
                                      : std::string("LayerMajor");
                         });

}  // namespace
}  // namespace vattn
