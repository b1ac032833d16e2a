// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Randomized model-based tests of the KV cache: long seeded sequences of
// AllocSlot / Grow / Shrink / Free / Step under a tight budget, checked after
// every operation against a simple reference model, the data written through
// the views, and the backend's own counters. Then fault injection at every
// backend call index of a scenario. The seed is printed on failure.

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

// What the cache should hold, per slot.
struct ModelSlot {
  bool active = false;
  std::int64_t length = 0;
  std::uint32_t request = 0;  // Distinguishes requests placed in one slot.
};

std::uint16_t Pattern(int slot, std::uint32_t request, std::int64_t token,
                      int which) {
  return static_cast<std::uint16_t>((slot * 131 + request * 31 + token * 7 +
                                     which * 3 + 1) &
                                    0xffff);
}

class Harness {
 public:
  Harness(Layout layout, std::size_t budget, std::uint64_t seed,
          FaultPlan plan = {})
      : rng_(seed) {
    auto host = MakeHostBackend();
    EXPECT_TRUE(host.ok());
    auto fault = FaultInjectionBackend::Create(*host, std::move(plan));
    EXPECT_TRUE(fault.ok());
    fault_ = *fault;
    inner_ = *host;
    opts_.num_layers = 2;
    opts_.num_kv_heads = 2;
    opts_.head_dim = 64;
    opts_.dtype = DType::kFloat16;
    opts_.max_slots = 6;
    // Token-major: 1 KiB per token, 2 MiB = 2048 tokens. Layer-major:
    // 256 B per token per tensor, 2 MiB = 8192 tokens.
    opts_.max_tokens = layout == Layout::kTokenMajor ? 12000 : 40000;
    opts_.layout = layout;
    opts_.memory_budget_bytes = budget;
    opts_.max_extent_bytes = 8 * kMiB;
    model_.resize(static_cast<std::size_t>(opts_.max_slots));
  }

  absl::Status Open() {
    auto cache = KVCache::Create(opts_, fault_);
    if (!cache.ok()) return cache.status();
    cache_ = std::move(*cache);
    return absl::OkStatus();
  }
  void Close() { cache_.reset(); }

  KVCache& cache() { return *cache_; }
  FaultInjectionBackend& fault() { return *fault_; }
  Backend& inner() { return *inner_; }
  std::mt19937_64& rng() { return rng_; }
  const KVCacheOptions& opts() const { return opts_; }

  // Writes the pattern of tokens [from, to) of a slot: K of layer 0 and V of
  // the last layer, element (token, head 0, dim 0) and (token, last, last).
  void Write(int slot, std::int64_t from, std::int64_t to) {
    const ModelSlot& m = model_[static_cast<std::size_t>(slot)];
    for (std::int64_t t = from; t < to; ++t) {
      for (int which = 0; which < 4; ++which) {
        *Element(slot, t, which) = Pattern(slot, m.request, t, which);
      }
    }
  }

  // Checks the model against the cache: lengths, backing, data, budget and
  // the backend's counters.
  void Verify(const char* after, bool check_data = true) {
    SCOPED_TRACE(after);
    CacheStats st = cache_->Stats();
    std::int64_t active = 0;
    for (int s = 0; s < opts_.max_slots; ++s) {
      const ModelSlot& m = model_[static_cast<std::size_t>(s)];
      auto info = cache_->GetSlot(s);
      ASSERT_TRUE(info.ok());
      ASSERT_EQ(info->active, m.active) << "slot " << s;
      if (!m.active) continue;
      ++active;
      ASSERT_EQ(info->length, m.length) << "slot " << s;
      ASSERT_GE(info->backed_tokens, m.length) << "slot " << s;
      if (!check_data) continue;
      for (std::int64_t t = 0; t < m.length; ++t) {
        for (int which = 0; which < 4; ++which) {
          ASSERT_EQ(*Element(s, t, which), Pattern(s, m.request, t, which))
              << "slot " << s << " token " << t << " element " << which;
        }
      }
    }
    ASSERT_EQ(st.active_slots, active);
    ASSERT_LE(st.physical_bytes,
              static_cast<std::int64_t>(opts_.memory_budget_bytes));
    ASSERT_LE(st.peak_physical_bytes,
              static_cast<std::int64_t>(opts_.memory_budget_bytes));
    ASSERT_EQ(st.physical_bytes,
              st.mapped_bytes + st.pooled_bytes + st.quarantined_bytes);
    const BackendCounters c = inner_->counters();
    ASSERT_EQ(c.physical_bytes, st.physical_bytes);
    // A quarantined extent may still be mapped in some of its regions.
    ASSERT_GE(c.mapped_bytes, st.mapped_bytes);
    ASSERT_LE(c.mapped_bytes, st.mapped_bytes + st.quarantined_bytes);
    ASSERT_EQ(c.reservations, 1);
  }

  // Sum over active slots of adopted bytes: memory nobody may take back
  // (surplus beyond it is reclaimable).
  std::int64_t PinnedBytes() {
    std::int64_t pinned = 0;
    for (int s = 0; s < opts_.max_slots; ++s) {
      auto info = cache_->GetSlot(s);
      if (info.ok() && info->active) pinned += info->adopted_bytes;
    }
    return pinned;
  }

  std::int64_t RegionBytesFor(std::int64_t tokens) const {
    const std::int64_t per_token =
        cache_->bytes_per_token() /
        (opts_.layout == Layout::kTokenMajor ? 1 : 2 * opts_.num_layers);
    const std::int64_t g = 2 * kMiB;
    return (tokens * per_token + g - 1) / g * g;
  }
  int Regions() const {
    return opts_.layout == Layout::kTokenMajor ? 1 : 2 * opts_.num_layers;
  }

  std::vector<ModelSlot>& model() { return model_; }

 private:
  std::uint16_t* Element(int slot, std::int64_t token, int which) {
    const int last = opts_.num_layers - 1;
    TensorView v = which < 2 ? cache_->K(0) : cache_->V(last);
    const std::int64_t h = which % 2 == 0 ? 0 : opts_.num_kv_heads - 1;
    const std::int64_t d = which % 2 == 0 ? 0 : opts_.head_dim - 1;
    return reinterpret_cast<std::uint16_t*>(v.ElementAddress(slot, token, h, d));
  }

  std::mt19937_64 rng_;
  std::shared_ptr<Backend> inner_;
  std::shared_ptr<FaultInjectionBackend> fault_;
  KVCacheOptions opts_;
  std::unique_ptr<KVCache> cache_;
  std::vector<ModelSlot> model_;
};

// One random operation, applied to the cache and the model. Returns false
// when an assertion failed.
void RandomOp(Harness& h, bool expect_faults) {
  std::mt19937_64& rng = h.rng();
  const KVCacheOptions& o = h.opts();
  std::vector<ModelSlot>& model = h.model();
  auto pick_slot = [&]() {
    // Mostly valid slots, sometimes out of range.
    std::uniform_int_distribution<int> d(-1, o.max_slots);
    return rng() % 10 == 0 ? d(rng)
                           : static_cast<int>(rng() % static_cast<unsigned>(
                                                           o.max_slots));
  };
  auto tokens_for = [&](std::int64_t base) {
    switch (rng() % 6) {
      case 0:
        return static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(
                                                     o.max_tokens + 8));
      case 1:
        return base + static_cast<std::int64_t>(rng() % 4000);
      default:
        return base + 1;  // Decode.
    }
  };
  const int op = static_cast<int>(rng() % 100);
  if (op < 15) {  // AllocSlot.
    const std::int64_t hint =
        static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(
                                               o.max_tokens + 4)) -
        2;
    int active = 0;
    for (const ModelSlot& m : model) active += m.active ? 1 : 0;
    absl::StatusOr<int> slot = h.cache().AllocSlot(hint);
    if (hint < 0) {
      ASSERT_EQ(slot.status().code(), absl::StatusCode::kInvalidArgument);
    } else if (hint > o.max_tokens) {
      ASSERT_EQ(slot.status().code(), absl::StatusCode::kOutOfRange);
    } else if (active == o.max_slots) {
      ASSERT_EQ(slot.status().code(), absl::StatusCode::kResourceExhausted);
    } else {
      ASSERT_TRUE(slot.ok()) << testing::Describe(slot);
      ModelSlot& m = model[static_cast<std::size_t>(*slot)];
      ASSERT_FALSE(m.active);
      m.active = true;
      m.length = 0;
      ++m.request;
    }
  } else if (op < 60) {  // Grow.
    const int slot = pick_slot();
    const bool valid = slot >= 0 && slot < o.max_slots;
    const std::int64_t base =
        valid ? model[static_cast<std::size_t>(slot)].length : 0;
    const std::int64_t tokens = tokens_for(base);
    const std::int64_t pinned = h.PinnedBytes();
    absl::Status s = h.cache().Grow(slot, tokens);
    if (!valid) {
      ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    } else if (tokens > o.max_tokens) {
      ASSERT_EQ(s.code(), absl::StatusCode::kOutOfRange);
    } else if (!model[static_cast<std::size_t>(slot)].active) {
      ASSERT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    } else if (s.ok()) {
      ModelSlot& m = model[static_cast<std::size_t>(slot)];
      if (tokens > m.length) {
        const std::int64_t old = m.length;
        m.length = tokens;
        h.Write(slot, old, tokens);
      }
    } else if (s.code() == absl::StatusCode::kResourceExhausted &&
               !expect_faults) {
      // Legitimate only when active slots pin too much: idle slots and the
      // pool must have been given up first.
      auto info = h.cache().GetSlot(slot);
      ASSERT_TRUE(info.ok());
      const std::int64_t need =
          h.RegionBytesFor(tokens) * h.Regions() - info->adopted_bytes;
      ASSERT_GT(pinned + need,
                static_cast<std::int64_t>(o.memory_budget_bytes))
          << "ResourceExhausted with reclaimable memory: " << s;
    } else {
      ASSERT_TRUE(expect_faults) << s;
    }
  } else if (op < 70) {  // Shrink.
    const int slot = pick_slot();
    const bool valid = slot >= 0 && slot < o.max_slots;
    const std::int64_t length =
        valid ? model[static_cast<std::size_t>(slot)].length : 0;
    const std::int64_t tokens =
        static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(
                                              length + 3)) -
        1;
    absl::Status s = h.cache().Shrink(slot, tokens);
    if (!valid) {
      ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    } else if (!model[static_cast<std::size_t>(slot)].active) {
      ASSERT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    } else if (tokens < 0 || tokens > length) {
      ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    } else {
      ASSERT_TRUE(s.ok()) << s;
      model[static_cast<std::size_t>(slot)].length = tokens;
    }
  } else if (op < 85) {  // Free.
    const int slot = pick_slot();
    const bool valid = slot >= 0 && slot < o.max_slots;
    absl::Status s = h.cache().Free(slot);
    if (!valid) {
      ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    } else if (!model[static_cast<std::size_t>(slot)].active) {
      ASSERT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    } else if (s.ok()) {
      model[static_cast<std::size_t>(slot)].active = false;
    } else {
      ASSERT_TRUE(expect_faults) << s;
    }
  } else {  // Step over every active slot: one decode token each.
    std::vector<StepRequest> batch;
    for (int s = 0; s < o.max_slots; ++s) {
      const ModelSlot& m = model[static_cast<std::size_t>(s)];
      if (m.active && m.length < o.max_tokens) {
        batch.push_back({s, m.length + 1});
      }
    }
    absl::StatusOr<StepResult> r = h.cache().Step(batch);
    if (r.ok()) {
      for (const StepRequest& q : batch) {
        ModelSlot& m = model[static_cast<std::size_t>(q.slot)];
        const std::int64_t old = m.length;
        m.length = q.tokens;
        h.Write(q.slot, old, q.tokens);
      }
    } else {
      // Requests before the failing one stay grown: resynchronize the model
      // from the cache (lengths only grow by one here).
      ASSERT_TRUE(expect_faults ||
                  r.status().code() == absl::StatusCode::kResourceExhausted)
          << r.status();
      for (const StepRequest& q : batch) {
        ModelSlot& m = model[static_cast<std::size_t>(q.slot)];
        auto info = h.cache().GetSlot(q.slot);
        ASSERT_TRUE(info.ok());
        if (info->length == q.tokens && m.length != q.tokens) {
          const std::int64_t old = m.length;
          m.length = q.tokens;
          h.Write(q.slot, old, q.tokens);
        } else if (info->length != q.tokens && !expect_faults) {
          // The failing request: legitimate only when what active slots pin
          // (now) plus what it needs exceeds the budget.
          const std::int64_t need =
              h.RegionBytesFor(q.tokens) * h.Regions() - info->adopted_bytes;
          ASSERT_GT(h.PinnedBytes() + need,
                    static_cast<std::int64_t>(o.memory_budget_bytes))
              << "Step failed with reclaimable memory: " << r.status();
          break;
        }
      }
    }
  }
}

class ModelTest : public ::testing::TestWithParam<Layout> {};

TEST_P(ModelTest, RandomSequencesMatchTheModel) {
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    SCOPED_TRACE(absl::StrFormat("seed %d (layout %s)", seed,
                                 LayoutName(GetParam())));
    // Budget of 24 MiB per tensor group: room for a few slots, so pressure
    // and reclamation happen all the time.
    const std::size_t budget =
        GetParam() == Layout::kTokenMajor ? 24 * kMiB : 4 * 24 * kMiB;
    Harness h(GetParam(), budget, seed);
    VATTN_ASSERT_OK(h.Open());
    for (int i = 0; i < 1200; ++i) {
      ASSERT_NO_FATAL_FAILURE(RandomOp(h, /*expect_faults=*/false))
          << "operation " << i;
      // Data in full every few operations; counters and lengths always.
      ASSERT_NO_FATAL_FAILURE(
          h.Verify("after a random operation", /*check_data=*/i % 8 == 0))
          << "operation " << i;
    }
    CacheStats st = h.cache().Stats();
    EXPECT_GT(st.reclaimed_extents, 0) << "the budget never bound";
    EXPECT_GT(st.reuse_hits, 0);
    h.Close();
    EXPECT_TRUE(h.inner().counters().Empty());
    EXPECT_TRUE(h.fault().counters().Empty());
  }
}

// Runs a fixed scenario with the nth backend call failing; every operation
// either succeeds or leaves the model's state in place, and nothing leaks.
void RunScenario(Harness& h, bool expect_faults) {
  for (int i = 0; i < 200; ++i) {
    ASSERT_NO_FATAL_FAILURE(RandomOp(h, expect_faults)) << "operation " << i;
    ASSERT_NO_FATAL_FAILURE(h.Verify("after an operation")) << "operation "
                                                            << i;
  }
}

TEST_P(ModelTest, FaultAtEveryBackendCallLeavesTheCacheConsistent) {
  const std::uint64_t seed = 7;
  const std::size_t budget =
      GetParam() == Layout::kTokenMajor ? 10 * kMiB : 4 * 10 * kMiB;
  std::int64_t total_calls = 0;
  {
    Harness h(GetParam(), budget, seed);
    VATTN_ASSERT_OK(h.Open());
    ASSERT_NO_FATAL_FAILURE(RunScenario(h, /*expect_faults=*/false));
    total_calls = h.fault().seen();
    h.Close();
    ASSERT_TRUE(h.inner().counters().Empty());
  }
  ASSERT_GT(total_calls, 20);
  std::int64_t injected = 0;
  for (std::int64_t n = 1; n <= total_calls; ++n) {
    SCOPED_TRACE(absl::StrFormat("seed %d, failing backend call #%d of %d",
                                 seed, n, total_calls));
    Harness h(GetParam(), budget, seed, FaultPlan::FailNthAny(n));
    absl::Status open = h.Open();
    if (!open.ok()) {
      // Only the reservation can fail at Create; nothing may be left.
      EXPECT_TRUE(h.inner().counters().Empty());
      ++injected;
      continue;
    }
    ASSERT_NO_FATAL_FAILURE(RunScenario(h, /*expect_faults=*/true));
    injected += h.fault().injected();
    h.Close();
    ASSERT_TRUE(h.inner().counters().Empty()) << "leak after the fault";
  }
  // The scenario diverges once a call fails, but most indices must hit.
  EXPECT_GT(injected, total_calls / 2);
}

// Two consecutive backend calls fail (a failed call and its rollback, say),
// at every point of the scenario, the destructor included: the cache stays
// consistent with the model and gives everything back.
TEST_P(ModelTest, TwoConsecutiveFaultsAtEveryBackendCallLeaveNothingBehind) {
  const std::uint64_t seed = 11;
  const std::size_t budget =
      GetParam() == Layout::kTokenMajor ? 10 * kMiB : 4 * 10 * kMiB;
  std::int64_t total_calls = 0;
  {
    Harness h(GetParam(), budget, seed);
    VATTN_ASSERT_OK(h.Open());
    ASSERT_NO_FATAL_FAILURE(RunScenario(h, /*expect_faults=*/false));
    total_calls = h.fault().seen();
    h.Close();
  }
  ASSERT_GT(total_calls, 20);
  std::int64_t injected = 0;
  for (std::int64_t n = 1; n <= total_calls; ++n) {
    SCOPED_TRACE(absl::StrFormat("seed %d, failing backend calls #%d and #%d "
                                 "of %d",
                                 seed, n, n + 1, total_calls));
    FaultPlan plan;
    for (std::int64_t nth : {n, n + 1}) {
      FaultRule rule;
      rule.nth = nth;  // Any op.
      plan.rules.push_back(rule);
    }
    Harness h(GetParam(), budget, seed, plan);
    absl::Status open = h.Open();
    if (!open.ok()) {
      EXPECT_TRUE(h.inner().counters().Empty());
      ++injected;
      continue;
    }
    ASSERT_NO_FATAL_FAILURE(RunScenario(h, /*expect_faults=*/true));
    injected += h.fault().injected();
    h.Close();
    ASSERT_TRUE(h.inner().counters().Empty()) << "leak after the faults";
  }
  EXPECT_GT(injected, total_calls / 2);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ModelTest,
                         ::testing::Values(Layout::kTokenMajor,
                                           Layout::kLayerMajor),
                         [](const ::testing::TestParamInfo<Layout>& p) {
                           return p.param == Layout::kTokenMajor
                                      ? std::string("TokenMajor")
                                      : std::string("LayerMajor");
                         });

}  // namespace
}  // namespace vattn
