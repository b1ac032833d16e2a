// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The decode loop end to end on the Host backend: real attention on vattn's
// views (both layouts, three dtypes, map-ahead on and off) and on the paged
// baseline, with attention outputs checked against the float64 reference
// during the run; the plan, the trace parser, and the errors.
#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "cpu_attention.h"
#include "cuda_attention.h"
#include "decode_loop.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "thread_pool.h"
#include "vattn/vattn.h"

namespace vdecode {
namespace {

DecodeConfig TinyConfig() {
  DecodeConfig c;
  c.shape = *ModelPreset("tiny");
  c.device = Device::kCpu;
  c.max_slots = 5;
  c.max_tokens = 512;
  c.threads = 2;
  c.check_samples = 1000;  // Every step is checked.
  auto host = vattn::MakeHostBackend();
  EXPECT_TRUE(host.ok());
  c.backend = *host;
  return c;
}

std::vector<Request> SmallMix() {
  std::vector<Request> r = RandomRequests(14, 1, 120, 1, 24, 7);
  r.push_back({3, 300, 9});  // A long prompt arriving later.
  return r;
}

struct Case {
  DType dtype;
  vattn::Layout layout;
  std::int64_t map_ahead;
};

class BatchDecodeTest : public ::testing::TestWithParam<Case> {};

TEST_P(BatchDecodeTest, VattnAndPagedMatchTheReferenceOnTheSameSteps) {
  const Case p = GetParam();
  DecodeConfig c = TinyConfig();
  c.shape.dtype = p.dtype;
  c.layout = p.layout;
  c.map_ahead_tokens = p.map_ahead;
  const std::vector<Request> reqs = SmallMix();
  std::int64_t want_tokens = 0, want_prefill = 0;
  for (const Request& r : reqs) {
    want_tokens += r.output_tokens;
    want_prefill += r.prompt_tokens;
  }
  int progress_calls = 0;
  bool saw_final = false;
  c.progress = [&](const ProgressInfo& info) {
    ++progress_calls;
    saw_final = saw_final || info.final;
    EXPECT_LE(info.tokens_done, info.tokens_total);
  };
  c.progress_interval_s = 0;

  std::map<Engine, RunResult> results;
  for (Engine e : {Engine::kVattn, Engine::kPaged}) {
    c.engine = e;
    absl::StatusOr<RunResult> r = RunDecode(c, reqs);
    ASSERT_TRUE(r.ok()) << EngineName(e) << ": " << r.status();
    EXPECT_EQ(r->generated_tokens, want_tokens);
    EXPECT_EQ(r->prefill_tokens, want_prefill);
    EXPECT_EQ(r->requests, static_cast<std::int64_t>(reqs.size()));
    EXPECT_EQ(r->steps, static_cast<std::int64_t>(PlanSteps(reqs, c.max_slots).size()));
    EXPECT_LE(r->max_batch, c.max_slots);
    EXPECT_EQ(static_cast<std::int64_t>(r->checks.size()), r->steps);
    EXPECT_LE(r->max_rel_error, r->tolerance);
    EXPECT_GT(r->tokens_per_s, 0);
    EXPECT_GT(r->attention_us, 0);
    EXPECT_GE(r->peak_physical_bytes, r->peak_logical_bytes);
    EXPECT_GT(r->peak_logical_bytes, 0);
    results[e] = *std::move(r);
  }
  EXPECT_GT(results[Engine::kVattn].driver_calls, 0);
  EXPECT_EQ(results[Engine::kPaged].driver_calls, 0);
  EXPECT_EQ(results[Engine::kVattn].steps, results[Engine::kPaged].steps);
  EXPECT_EQ(results[Engine::kVattn].peak_logical_bytes,
            results[Engine::kPaged].peak_logical_bytes);
  EXPECT_GT(progress_calls, 2);
  EXPECT_TRUE(saw_final);
}

INSTANTIATE_TEST_SUITE_P(
    Host, BatchDecodeTest,
    ::testing::Values(Case{DType::kF16, vattn::Layout::kTokenMajor, 256},
                      Case{DType::kF16, vattn::Layout::kLayerMajor, 256},
                      Case{DType::kBF16, vattn::Layout::kTokenMajor, 0},
                      Case{DType::kF32, vattn::Layout::kLayerMajor, 0}),
    [](const auto& tp) {
      return std::string(DTypeName(tp.param.dtype)) + "_" +
             (tp.param.layout == vattn::Layout::kTokenMajor ? "token_major"
                                                              : "layer_major") +
             (tp.param.map_ahead > 0 ? "_map_ahead" : "_sync");
    });

// The CPU kernel on vattn's own views, written through TensorView strides:
// unchanged kernel, vattn memory.
TEST(BatchDecodeViewsTest, CpuKernelReadsVattnViewsOfBothLayouts) {
  for (vattn::Layout layout : {vattn::Layout::kTokenMajor, vattn::Layout::kLayerMajor}) {
    auto backend = vattn::MakeHostBackend();
    ASSERT_TRUE(backend.ok());
    vattn::KVCacheOptions o;
    o.num_layers = 3;
    o.num_kv_heads = 2;
    o.head_dim = 64;
    o.dtype = vattn::DType::kFloat32;
    o.max_slots = 4;
    o.max_tokens = 256;
    o.layout = layout;
    auto cache = vattn::KVCache::Create(o, *backend);
    ASSERT_TRUE(cache.ok()) << cache.status();
    const std::vector<std::int32_t> lengths = {5, 100, 1};
    std::vector<std::int32_t> rows;
    for (std::int32_t len : lengths) {
      auto slot = (*cache)->AllocSlot(len);
      ASSERT_TRUE(slot.ok());
      VATTN_ASSERT_OK((*cache)->Grow(*slot, len));
      rows.push_back(*slot);
      // Write every element of every layer through the views.
      for (int l = 0; l < o.num_layers; ++l) {
        for (const vattn::TensorView& v : {(*cache)->K(l), (*cache)->V(l)}) {
          for (int t = 0; t < len; ++t) {
            for (int h = 0; h < o.num_kv_heads; ++h) {
              for (int d = 0; d < o.head_dim; ++d) {
                *reinterpret_cast<float*>(v.ElementAddress(*slot, t, h, d)) =
                    static_cast<float>(((*slot * 131 + t * 31 + h * 7 + d + l * 3) % 23) - 11) / 7.0f;
              }
            }
          }
        }
      }
    }
    std::vector<float> q(lengths.size() * 8 * 64);
    for (std::size_t j = 0; j < q.size(); ++j) q[j] = static_cast<float>(j % 13) / 13.0f - 0.5f;
    std::vector<float> out(q.size());
    ThreadPool pool(2);
    for (int l = 0; l < o.num_layers; ++l) {
      DecodeArgs a;
      a.num_q_heads = 8;
      a.num_kv_heads = 2;
      a.head_dim = 64;
      const vattn::TensorView k = (*cache)->K(l), v = (*cache)->V(l);
      a.k = {k.data, DType::kF32, k.strides[0], k.strides[1], k.strides[2], k.strides[3]};
      a.v = {v.data, DType::kF32, v.strides[0], v.strides[1], v.strides[2], v.strides[3]};
      a.num_requests = static_cast<int>(lengths.size());
      a.rows = rows.data();
      a.lengths = lengths.data();
      a.q = q.data();
      a.out = out.data();
      Poison(out.data(), out.size());
      ASSERT_EQ(CpuDecodeAttention(a, pool), "");
      for (int i = 0; i < a.num_requests; ++i) {
        std::vector<double> ref;
        ReferenceDecodeAttention(a, i, &ref);
        EXPECT_LE(RelativeError(out.data() + i * 8 * 64, ref.data(), ref.size()), 1e-5)
            << vattn::LayoutName(layout) << " layer " << l << " request " << i;
      }
    }
  }
}

TEST(PlanTest, FifoWithinMaxSlotsAndEveryRequestRunsItsOutputLength) {
  std::vector<Request> reqs = RandomRequests(20, 1, 10, 1, 9, 3);
  reqs[5].arrival_step = 40;  // Arrives after a gap...
  reqs.push_back({100, 4, 2});  // ...and one after everything is idle.
  const std::vector<PlannedStep> plan = PlanSteps(reqs, 4);
  std::vector<int> seen(reqs.size(), 0);
  std::vector<std::int64_t> first(reqs.size(), -1), last(reqs.size(), -1);
  std::int64_t prev_step = -1;
  for (const PlannedStep& p : plan) {
    EXPECT_GT(p.step, prev_step);
    prev_step = p.step;
    EXPECT_LE(p.active.size(), 4u);
    EXPECT_FALSE(p.active.empty());
    for (int id : p.active) {
      const std::size_t i = static_cast<std::size_t>(id);
      EXPECT_GE(p.step, reqs[i].arrival_step);
      ++seen[i];
      if (first[i] < 0) first[i] = p.step;
      if (last[i] >= 0) {
        EXPECT_EQ(last[i], p.step - 1) << "request " << id << " paused";
      }
      last[i] = p.step;
    }
  }
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(seen[i], reqs[i].output_tokens) << "request " << i;
  }
  EXPECT_EQ(first.back(), 100);  // The idle gap was skipped, not stepped.
  // Peak blocks: at least the blocks of the biggest single step.
  EXPECT_GT(PeakBlocks(reqs, plan, 16), 0);
}

TEST(TraceTest, ParsesRowsSkipsHeaderAndNamesBadLines) {
  auto t = ParseTraceCsv("arrival,prompt_tokens,output_tokens\n0,10,5\n\n2.7, 3 ,1\n");
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->size(), 2u);
  EXPECT_EQ((*t)[1].arrival_step, 2);
  EXPECT_EQ((*t)[1].prompt_tokens, 3);
  auto bad = ParseTraceCsv("0,10,5\n1,0,5\n");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("line 2"), absl::string_view::npos);
  EXPECT_FALSE(ParseTraceCsv("").ok());
}

TEST(RunDecodeErrorsTest, TooLongRequestsAndMissingDevice) {
  DecodeConfig c = TinyConfig();
  std::vector<Request> reqs = {{0, 500, 13}};  // 513 > max_tokens 512.
  VATTN_EXPECT_CODE(RunDecode(c, reqs), absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(RunDecode(c, {}), absl::StatusCode::kInvalidArgument);
  int devices = 0;
  if (cuda::DeviceCount(&devices) != "" || devices == 0) {
    c.device = Device::kCuda;
    VATTN_EXPECT_CODE(RunDecode(c, {{0, 4, 4}}), absl::StatusCode::kUnavailable);
  }
}

TEST(BatchDecodeMemoryTest, BothEnginesRunUnderOneBudgetAndReportWhereTheMemoryIs) {
  DecodeConfig c = TinyConfig();
  c.check_samples = 0;
  c.max_extent_tokens = 32;
  c.map_ahead_tokens = 1;
  const std::vector<Request> reqs = SmallMix();
  const std::int64_t bpt = c.shape.BytesPerToken();
  const std::int64_t peak_blocks = PeakBlocks(reqs, PlanSteps(reqs, c.max_slots), 16);
  c.budget_bytes = DefaultBudgetBytes(reqs, c.max_slots, c.shape);
  EXPECT_EQ(c.budget_bytes % (std::int64_t{2} << 20), 0);
  EXPECT_GE(static_cast<double>(c.budget_bytes),
            1.25 * static_cast<double>(peak_blocks * 16 * bpt));
  EXPECT_GE(c.budget_bytes,
            (c.max_slots + c.max_slots / 4 + 1) * (std::int64_t{2} << 20));

  std::map<Engine, RunResult> results;
  for (Engine e : {Engine::kPaged, Engine::kVattn}) {
    c.engine = e;
    absl::StatusOr<RunResult> r = RunDecode(c, reqs);
    ASSERT_TRUE(r.ok()) << EngineName(e) << ": " << r.status();
    EXPECT_EQ(r->budget_bytes, c.budget_bytes);
    EXPECT_LE(r->peak_physical_bytes, c.budget_bytes) << EngineName(e);
    EXPECT_GE(r->peak_in_use_bytes, r->peak_logical_bytes) << EngineName(e);
    EXPECT_GE(r->peak_in_use_overlap_bytes, r->peak_in_use_bytes) << EngineName(e);
    EXPECT_LE(r->peak_in_use_overlap_bytes, r->peak_physical_bytes) << EngineName(e);
    results[e] = *std::move(r);
  }
  const RunResult& paged = results[Engine::kPaged];
  // The paged pool is the whole budget; what backs the batch is exactly the
  // plan's peak in blocks.
  EXPECT_EQ(paged.peak_physical_bytes, c.budget_bytes / (16 * bpt) * 16 * bpt);
  EXPECT_EQ(paged.peak_in_use_bytes, peak_blocks * 16 * bpt);
  EXPECT_EQ(paged.peak_reclaimable_bytes, 0);
  // Free blocks peak when the fewest are in use.
  EXPECT_GE(paged.peak_pooled_bytes, paged.peak_physical_bytes - paged.peak_in_use_bytes);
  EXPECT_LE(paged.peak_pooled_bytes, paged.peak_physical_bytes);
  const RunResult& vattn = results[Engine::kVattn];
  EXPECT_GT(vattn.peak_reclaimable_bytes, 0) << "freed slots keep their extents";

  // A budget that holds no block is refused, naming it.
  c.engine = Engine::kPaged;
  c.budget_bytes = 16 * bpt - 1;
  absl::StatusOr<RunResult> refused = RunDecode(c, reqs);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("budget_bytes"), std::string::npos)
      << refused.status();
}

}  // namespace
}  // namespace vdecode
