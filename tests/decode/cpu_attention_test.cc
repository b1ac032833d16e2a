// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The CPU decode-attention kernel against the float64 reference, on the
// three layouts (token-major view, layer-major view, paged pool), three
// dtypes and GQA groups, with outputs poisoned (NaN) before every run; and
// the fp16 / bf16 converters, the thread pool and the block allocator.
#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "block_allocator.h"
#include "cpu_attention.h"
#include "decode_test_util.h"
#include "gtest/gtest.h"
#include "half.h"
#include "kv_fill.h"
#include "thread_pool.h"

namespace vdecode {
namespace {

using testing::HostKv;
using testing::KvCase;
using testing::Layout;

TEST(HalfTest, EveryHalfRoundTripsThroughFloat) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float f = HalfToFloat(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << h;
      continue;
    }
    ASSERT_EQ(FloatToHalf(f), h) << "half 0x" << std::hex << h;
    ASSERT_EQ(HalfToFloatTable()[h], f);
  }
}

TEST(HalfTest, KnownValuesAndRounding) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // Rounds to infinity.
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);  // Smallest subnormal.
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -26)), 0x0000);  // Below half of it.
  // 1 + 2^-11 is a tie between 1 and 1 + 2^-10: rounds to even (1).
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_FLOAT_EQ(HalfToFloat(0x3555), 0.333251953125f);
}

TEST(Bf16Test, RoundTripAndRounding) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const float f = Bf16ToFloat(static_cast<std::uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBf16(f), b);
  }
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  // 1 + 2^-8 is a tie: to even (1.0); 1 + 3 * 2^-8 rounds up.
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(ThreadPoolTest, RunsEveryItemOnceAcrossManyCalls) {
  ThreadPool pool(3);
  for (int round = 0; round < 200; ++round) {
    const int n = round % 17;
    std::vector<int> hits(static_cast<std::size_t>(n), 0);
    pool.ParallelFor(n, [&](std::int64_t i, int worker) {
      ASSERT_GE(worker, 0);
      ASSERT_LT(worker, pool.size());
      ++hits[static_cast<std::size_t>(i)];
    });
    for (int h : hits) ASSERT_EQ(h, 1);
  }
}

TEST(BlockAllocatorTest, HandsOutEveryBlockOnceAndReusesFreed) {
  BlockAllocator a(4);
  std::set<std::int32_t> got;
  for (int i = 0; i < 4; ++i) got.insert(a.Allocate());
  EXPECT_EQ(got.size(), 4u);
  EXPECT_EQ(a.Allocate(), -1);
  EXPECT_EQ(a.used(), 4);
  a.Free(2);
  EXPECT_EQ(a.Allocate(), 2);
  EXPECT_EQ(a.peak_used(), 4);
}

TEST(RelativeErrorTest, PoisonIsNeverWithinTolerance) {
  std::vector<float> out(8, 1.0f);
  std::vector<double> ref(8, 1.0);
  EXPECT_EQ(RelativeError(out.data(), ref.data(), out.size()), 0.0);
  Poison(out.data(), 1);
  EXPECT_TRUE(std::isinf(RelativeError(out.data(), ref.data(), out.size())));
}

class CpuAttentionTest
    : public ::testing::TestWithParam<std::tuple<DType, Layout, int>> {};

TEST_P(CpuAttentionTest, MatchesFloat64Reference) {
  const auto [dtype, layout, group] = GetParam();
  for (const int head_dim : {64, 128, 40}) {
    KvCase c;
    c.dtype = dtype;
    c.layout = layout;
    c.kv_heads = 2;
    c.q_heads = 2 * group;
    c.head_dim = head_dim;
    c.lengths = {1, 7, 16, 33, 300, 5};
    c.q_scale = head_dim == 40 ? 6.0f : 1.0f;  // One peaky softmax.
    c.seed = static_cast<std::uint32_t>(head_dim * 31 + group);
    HostKv kv(c);
    ThreadPool pool(2);
    DecodeArgs a = kv.HostArgs();
    Poison(kv.out().data(), kv.out().size());
    ASSERT_EQ(CpuDecodeAttention(a, pool), "");
    const std::size_t per = static_cast<std::size_t>(c.q_heads * head_dim);
    for (int i = 0; i < a.num_requests; ++i) {
      std::vector<double> ref;
      ReferenceDecodeAttention(a, i, &ref);
      const double err = RelativeError(kv.out().data() + i * per, ref.data(), per);
      EXPECT_LE(err, testing::ToleranceFor(dtype))
          << DTypeName(dtype) << " " << testing::LayoutName(layout) << " group "
          << group << " dim " << head_dim << " request " << i << " (length "
          << c.lengths[static_cast<std::size_t>(i)] << ")";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllDtypesLayoutsGroups, CpuAttentionTest,
    ::testing::Combine(::testing::Values(DType::kF16, DType::kBF16, DType::kF32),
                       ::testing::Values(Layout::kTokenMajor, Layout::kLayerMajor,
                                         Layout::kPaged),
                       ::testing::Values(1, 4)),
    [](const auto& tp) {
      return std::string(DTypeName(std::get<0>(tp.param))) + "_" +
             testing::LayoutName(std::get<1>(tp.param)) + "_group" +
             std::to_string(std::get<2>(tp.param));
    });

TEST(CpuAttentionTest, RejectsBadShapes) {
  KvCase c;
  HostKv kv(c);
  ThreadPool pool(1);
  DecodeArgs a = kv.HostArgs();
  a.num_q_heads = 7;  // Not a multiple of kv_heads (2).
  EXPECT_NE(CpuDecodeAttention(a, pool), "");
  a = kv.HostArgs();
  a.k.data = nullptr;
  EXPECT_NE(CpuDecodeAttention(a, pool), "");
}

TEST(KvFillTest, WritesTheHashedValuesThroughTheStrides) {
  // Two layers, token-major interleaving, one item of 3 tokens at row 1.
  const int layers = 2, kv_heads = 2, dim = 8;
  const std::int64_t tok = layers * 2 * kv_heads * dim;
  std::vector<std::uint16_t> buf(static_cast<std::size_t>(3 * 4 * tok), 0);
  std::vector<void*> k_layers, v_layers;
  for (int l = 0; l < layers; ++l) {
    k_layers.push_back(buf.data() + (l * 2) * kv_heads * dim);
    v_layers.push_back(buf.data() + (l * 2 + 1) * kv_heads * dim);
  }
  std::vector<void*> ptrs = k_layers;
  ptrs.insert(ptrs.end(), v_layers.begin(), v_layers.end());
  FillArgs f;
  f.k_layers = ptrs.data();
  f.v_layers = ptrs.data() + layers;
  f.layout.dtype = DType::kF16;
  f.layout.stride_token = tok;
  f.layout.stride_row = 4 * tok;
  f.layout.stride_head = dim;
  f.layers = layers;
  f.kv_heads = kv_heads;
  f.head_dim = dim;
  FillItem item{1, 1, 3, 42};
  f.items = &item;
  f.num_items = 1;
  f.max_count = 3;
  f.seed = 9;
  ThreadPool pool(2);
  CpuFillKv(f, pool);
  for (int t = 0; t < 4; ++t) {
    for (int l = 0; l < layers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        for (int e = 0; e < kv_heads * dim; ++e) {
          const std::uint16_t got = buf[static_cast<std::size_t>(
              4 * tok + t * tok + (l * 2 + kv) * kv_heads * dim + e)];
          const std::uint16_t want =
              t == 0 ? 0
                     : FloatToHalf(ElementValue(RowKey(9, 42, l, kv, t),
                                                static_cast<std::uint32_t>(e)));
          ASSERT_EQ(got, want) << "token " << t << " layer " << l << " kv " << kv;
        }
      }
    }
  }
  // Row 0 and row 2 are untouched.
  for (std::int64_t e = 0; e < 4 * tok; ++e) ASSERT_EQ(buf[static_cast<std::size_t>(e)], 0);
}

}  // namespace
}  // namespace vdecode
