// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The map-ahead thread and Step. Tests that need "the GPU computed long
// enough for the thread to keep up" model that with WaitForBackgroundIdle(),
// so they are deterministic on any machine (and under TSan); timing itself is
// measured in benchmarks/step_bench.cc, never asserted here.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

// A small Llama-like shape: 4 layers x 2 heads x 64 dim, fp16 = 2 KiB per
// token token-major, so a 2 MiB extent holds 1024 tokens.
KVCacheOptions SmallOptions(Layout layout = Layout::kTokenMajor) {
  KVCacheOptions o;
  o.num_layers = 4;
  o.num_kv_heads = 2;
  o.head_dim = 64;
  o.dtype = DType::kFloat16;
  o.max_slots = 16;
  o.max_tokens = 16384;
  o.layout = layout;
  o.max_extent_bytes = 4 * kMiB;
  return o;
}

std::shared_ptr<Backend> LatencyHost() {
  auto host = MakeHostBackend();
  EXPECT_TRUE(host.ok());
  auto latency = MakeLatencyModelBackend(*host, LatencyCosts::H200());
  EXPECT_TRUE(latency.ok());
  return *latency;
}

// Steady decode of `batch` requests for `steps` steps; the "GPU step" waits
// for the background thread to finish its work. Returns misses after warm-up.
std::int64_t SteadyDecode(KVCache& cache, int batch, int steps, int warmup,
                          bool wait_for_thread) {
  std::vector<StepRequest> reqs;
  for (int i = 0; i < batch; ++i) {
    auto slot = cache.AllocSlot(/*expected_tokens=*/100);
    EXPECT_TRUE(slot.ok());
    reqs.push_back({*slot, 100});
  }
  if (wait_for_thread) {
    EXPECT_TRUE(cache.WaitForBackgroundIdle().ok());
  }
  std::int64_t misses_after_warmup = 0;
  for (int step = 0; step < steps; ++step) {
    auto r = cache.Step(reqs);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return -1;
    if (step >= warmup) misses_after_warmup += r->misses;
    for (StepRequest& q : reqs) ++q.tokens;
    if (wait_for_thread) {
      absl::Status s = cache.WaitForBackgroundIdle();
      EXPECT_TRUE(s.ok()) << s;
    }
  }
  return misses_after_warmup;
}

TEST(MapAheadTest, SteadyDecodeHasNoMissesWhenTheThreadKeepsUp) {
  KVCacheOptions o = SmallOptions();
  o.map_ahead_tokens = 256;
  o.pool_low_water = 2;
  o.pool_high_water = 4;
  auto backend = LatencyHost();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, backend));
  // 10k steps, 8 requests: each crosses many extent boundaries.
  const std::int64_t misses = SteadyDecode(*cache, 8, 10000, 0, true);
  EXPECT_EQ(misses, 0);
  CacheStats st = cache->Stats();
  EXPECT_EQ(st.step_calls, 10000);
  EXPECT_EQ(st.step_misses, 0);
  EXPECT_GT(st.background_extents, 8 * 3) << st.ToString();
  // The thread, not the caller, created the handles in steady state.
  EXPECT_GT(st.background_creates, 0) << st.ToString();
}

TEST(MapAheadTest, WithoutLookAheadEveryBoundaryCrossingIsAMiss) {
  KVCacheOptions o = SmallOptions();
  o.map_ahead_tokens = 0;
  auto backend = LatencyHost();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, backend));
  std::vector<StepRequest> reqs;
  for (int i = 0; i < 4; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache->AllocSlot(0));
    reqs.push_back({slot, 1});
  }
  std::int64_t misses = 0;
  for (int step = 0; step < 6000; ++step) {
    VATTN_ASSERT_OK_AND_ASSIGN(StepResult r, cache->Step(reqs));
    misses += r.misses;
    if (r.misses > 0) {
      EXPECT_GT(r.map_nanos, 0);
    }
    for (StepRequest& q : reqs) ++q.tokens;
  }
  CacheStats st = cache->Stats();
  // Every extent was mapped by Step on the caller's thread.
  EXPECT_EQ(misses, st.extents_mapped);
  EXPECT_EQ(st.step_misses, st.extents_mapped);
  EXPECT_EQ(st.background_extents, 0);
  // 6000 tokens at 2 KiB: extents of 2, 2, 4, 4, ... MiB -> a handful each.
  EXPECT_GE(misses, 4 * 3);
}

TEST(MapAheadTest, PrefillHintIsMappedBeforeStepAsksForIt) {
  KVCacheOptions o = SmallOptions();
  o.map_ahead_tokens = 64;
  auto backend = LatencyHost();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, backend));
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache->AllocSlot(5000));
  VATTN_ASSERT_OK(cache->WaitForBackgroundIdle());
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache->GetSlot(slot));
  EXPECT_GE(info.backed_tokens, 5000 + 64);
  EXPECT_EQ(info.extents, 1) << "a prefill is one extent";
  StepRequest req{slot, 5000};
  VATTN_ASSERT_OK_AND_ASSIGN(StepResult r, cache->Step({&req, 1}));
  EXPECT_EQ(r.misses, 0);
}

TEST(MapAheadTest, BudgetHoldsUnderPressureWhileTheThreadRuns) {
  for (Layout layout : {Layout::kTokenMajor, Layout::kLayerMajor}) {
    SCOPED_TRACE(LayoutName(layout));
    KVCacheOptions o = SmallOptions(layout);
    o.map_ahead_tokens = 512;
    o.pool_low_water = 1;
    o.pool_high_water = 3;
    // Token-major: 2 KiB per token; layer-major: 8 tensors of 256 B per
    // token, one 2 MiB granule each (16 MiB) at the least per slot.
    o.memory_budget_bytes =
        layout == Layout::kTokenMajor ? 24 * kMiB : 64 * kMiB;
    auto host = MakeHostBackend();
    ASSERT_TRUE(host.ok());
    VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, *host));
    std::mt19937_64 rng(11);
    struct Req {
      int slot;
      std::int64_t tokens;
      std::uint16_t tag;
    };
    std::vector<Req> active;
    std::uint16_t next_tag = 1;
    int exhausted = 0;
    const TensorView k0 = cache->K(0);
    auto cell = [&](int slot, std::int64_t t) {
      return reinterpret_cast<std::uint16_t*>(k0.ElementAddress(slot, t, 0, 0));
    };
    for (int step = 0; step < 3000; ++step) {
      if (active.size() < 6 && rng() % 8 == 0) {
        const std::int64_t prompt = 1 + static_cast<std::int64_t>(rng() % 3000);
        auto slot = cache->AllocSlot(prompt);
        if (slot.ok()) {
          absl::Status g = cache->Grow(*slot, prompt);
          if (g.ok()) {
            const std::uint16_t tag = next_tag++;
            for (std::int64_t t = 0; t < prompt; ++t) *cell(*slot, t) = tag;
            active.push_back({*slot, prompt, tag});
          } else {
            ASSERT_EQ(g.code(), absl::StatusCode::kResourceExhausted) << g;
            ++exhausted;
            VATTN_ASSERT_OK(cache->Free(*slot));
          }
        }
      }
      if (!active.empty() && rng() % 40 == 0) {
        const std::size_t victim = rng() % active.size();
        // Every token of a finishing request still holds its data.
        for (std::int64_t t = 0; t < active[victim].tokens; ++t) {
          ASSERT_EQ(*cell(active[victim].slot, t), active[victim].tag)
              << "token " << t;
        }
        VATTN_ASSERT_OK(cache->Free(active[victim].slot));
        active.erase(active.begin() + static_cast<std::ptrdiff_t>(victim));
      }
      std::vector<StepRequest> batch;
      for (const Req& r : active) {
        if (r.tokens < o.max_tokens) batch.push_back({r.slot, r.tokens + 1});
      }
      auto result = cache->Step(batch);
      if (result.ok()) {
        for (Req& r : active) {
          if (r.tokens < o.max_tokens) {
            *cell(r.slot, r.tokens) = r.tag;
            ++r.tokens;
          }
        }
      } else {
        ASSERT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted)
            << result.status();
        ++exhausted;
        // Shed the longest request, as a serving engine would.
        auto longest = std::max_element(
            active.begin(), active.end(),
            [](const Req& a, const Req& b) { return a.tokens < b.tokens; });
        VATTN_ASSERT_OK(cache->Free(longest->slot));
        active.erase(longest);
        // Resynchronize lengths Step may have set before failing.
        for (Req& r : active) {
          auto info = cache->GetSlot(r.slot);
          ASSERT_TRUE(info.ok());
          if (info->length == r.tokens + 1) {
            *cell(r.slot, r.tokens) = r.tag;
            ++r.tokens;
          }
        }
      }
      CacheStats st = cache->Stats();
      ASSERT_LE(st.peak_physical_bytes,
                static_cast<std::int64_t>(o.memory_budget_bytes));
      // Handles the thread holds between the pool and a slot are in neither
      // figure; once it is idle, every byte is one or the other.
      ASSERT_GE(st.physical_bytes, st.mapped_bytes + st.pooled_bytes);
      if (step % 100 == 0) {
        VATTN_ASSERT_OK(cache->WaitForBackgroundIdle());
        st = cache->Stats();
        ASSERT_EQ(st.physical_bytes, st.mapped_bytes + st.pooled_bytes);
      }
    }
    const CacheStats st = cache->Stats();
    // The budget really bound; token-major (2 KiB per token, extents of a
    // few hundred tokens) also took memory back from idle slots and mapped
    // ahead on the thread. Layer-major extents (8192 tokens) outlast prompts.
    EXPECT_GT(exhausted, 0) << st.ToString();
    if (layout == Layout::kTokenMajor) {
      EXPECT_GT(st.reclaimed_extents, 0) << st.ToString();
      EXPECT_GT(st.background_extents, 0) << st.ToString();
    }
    EXPECT_GT(st.step_calls, 2000) << st.ToString();
    cache.reset();
    EXPECT_TRUE((*host)->counters().Empty());
  }
}

// The thread's errors are not sticky (kv_cache.h): WaitForBackgroundIdle
// reports them, and only calls that need the failing driver call fail,
// with their own error.
TEST(MapAheadTest, BackgroundErrorReachesOnlyTheCallsThatNeedIt) {
  KVCacheOptions o = SmallOptions();
  o.map_ahead_tokens = 64;
  auto host = MakeHostBackend();
  ASSERT_TRUE(host.ok());
  // Every Map from the first on fails: the thread hits it first.
  FaultPlan plan;
  plan.rules.push_back({BackendOp::kMap, 1, /*and_after=*/true,
                        absl::StatusCode::kInternal});
  VATTN_ASSERT_OK_AND_ASSIGN(auto fault,
                             FaultInjectionBackend::Create(*host, plan));
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, fault));
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache->AllocSlot(100));
  absl::Status idle = cache->WaitForBackgroundIdle();
  EXPECT_EQ(idle.code(), absl::StatusCode::kInternal) << idle;
  StepRequest req{slot, 10};
  auto r = cache->Step({&req, 1});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(cache->Grow(slot, 10).code(), absl::StatusCode::kInternal);
  VATTN_EXPECT_OK(cache->AllocSlot(0).status());  // Needs no mapping.
  // Every Step that needs a mapping still fails, with its own error.
  EXPECT_EQ(cache->Step({&req, 1}).status().code(),
            absl::StatusCode::kInternal);
  cache.reset();
  EXPECT_TRUE((*host)->counters().Empty());
}

TEST(MapAheadTest, StepRejectsBadInputWithoutChangingAnything) {
  KVCacheOptions o = SmallOptions();
  o.map_ahead_tokens = 16;
  auto host = MakeHostBackend();
  ASSERT_TRUE(host.ok());
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, *host));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlot(0));
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache->AllocSlot(0));
  VATTN_ASSERT_OK(cache->Free(b));
  std::vector<StepRequest> bad_slot = {{a, 10}, {o.max_slots, 1}};
  VATTN_EXPECT_CODE(cache->Step(bad_slot), absl::StatusCode::kInvalidArgument);
  std::vector<StepRequest> too_long = {{a, 10}, {a, o.max_tokens + 1}};
  VATTN_EXPECT_CODE(cache->Step(too_long), absl::StatusCode::kOutOfRange);
  std::vector<StepRequest> freed = {{a, 10}, {b, 1}};
  VATTN_EXPECT_CODE(cache->Step(freed), absl::StatusCode::kFailedPrecondition);
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache->GetSlot(a));
  EXPECT_EQ(info.length, 0) << "a rejected Step must not grow earlier slots";
  EXPECT_EQ(cache->Stats().step_calls, 0);
}

// Several caller threads, each with its own requests, drive Step / AllocSlot
// / Free concurrently with the map-ahead thread; each checks its own data.
TEST(MapAheadTest, ConcurrentCallersAndTheThreadKeepEveryonesData) {
  for (Layout layout : {Layout::kTokenMajor, Layout::kLayerMajor}) {
    SCOPED_TRACE(LayoutName(layout));
    KVCacheOptions o = SmallOptions(layout);
    o.max_slots = 12;
    o.map_ahead_tokens = 128;
    o.pool_low_water = 2;
    o.pool_high_water = 4;
    o.memory_budget_bytes = (layout == Layout::kTokenMajor ? 1 : 8) * 40 * kMiB;
    auto host = MakeHostBackend();
    ASSERT_TRUE(host.ok());
    VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, *host));
    const TensorView v = cache->V(o.num_layers - 1);
    constexpr int kThreads = 3;
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(100 + static_cast<std::uint64_t>(t));
        struct Req {
          int slot;
          std::int64_t tokens;
          std::uint16_t tag;
        };
        std::vector<Req> mine;
        std::uint16_t tag = static_cast<std::uint16_t>(t * 10000 + 1);
        auto cell = [&](int slot, std::int64_t tok) {
          return reinterpret_cast<std::uint16_t*>(
              v.ElementAddress(slot, tok, 1, 63));
        };
        for (int step = 0; step < 400 && failures.load() == 0; ++step) {
          if (mine.size() < 3 && rng() % 4 == 0) {
            const std::int64_t prompt =
                1 + static_cast<std::int64_t>(rng() % 1500);
            auto slot = cache->AllocSlot(prompt);
            if (slot.ok()) {
              StepRequest pre{*slot, prompt};
              auto r = cache->Step({&pre, 1});
              if (r.ok()) {
                for (std::int64_t i = 0; i < prompt; ++i) *cell(*slot, i) = tag;
                mine.push_back({*slot, prompt, tag++});
              } else if (r.status().code() ==
                         absl::StatusCode::kResourceExhausted) {
                if (!cache->Free(*slot).ok()) ++failures;
              } else {
                ++failures;
              }
            } else if (slot.status().code() !=
                       absl::StatusCode::kResourceExhausted) {
              ++failures;
            }
          }
          std::vector<StepRequest> batch;
          for (const Req& r : mine) batch.push_back({r.slot, r.tokens + 1});
          auto r = cache->Step(batch);
          if (r.ok()) {
            for (Req& q : mine) *cell(q.slot, q.tokens++) = q.tag;
          } else if (r.status().code() ==
                     absl::StatusCode::kResourceExhausted) {
            for (Req& q : mine) {
              auto info = cache->GetSlot(q.slot);
              if (info.ok() && info->length == q.tokens + 1) {
                *cell(q.slot, q.tokens++) = q.tag;
              }
            }
            if (!mine.empty()) {
              if (!cache->Free(mine.back().slot).ok()) ++failures;
              mine.pop_back();
            }
          } else {
            ++failures;
          }
          if (!mine.empty() && rng() % 25 == 0) {
            const Req done = mine.front();
            for (std::int64_t i = 0; i < done.tokens; ++i) {
              if (*cell(done.slot, i) != done.tag) {
                ++failures;
                break;
              }
            }
            if (!cache->Free(done.slot).ok()) ++failures;
            mine.erase(mine.begin());
          }
        }
        for (const Req& q : mine) {
          for (std::int64_t i = 0; i < q.tokens; ++i) {
            if (*cell(q.slot, i) != q.tag) {
              ++failures;
              break;
            }
          }
          if (!cache->Free(q.slot).ok()) ++failures;
        }
      });
    }
    for (std::thread& th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
    CacheStats st = cache->Stats();
    EXPECT_GT(st.step_calls, kThreads * 300);
    EXPECT_EQ(st.active_slots, 0);
    EXPECT_LE(st.peak_physical_bytes,
              static_cast<std::int64_t>(o.memory_budget_bytes));
    cache.reset();
    EXPECT_TRUE((*host)->counters().Empty());
  }
}

TEST(MapAheadTest, DestroyingTheCacheWhileTheThreadWorksLeavesNothing) {
  auto backend = LatencyHost();
  for (int round = 0; round < 5; ++round) {
    KVCacheOptions o = SmallOptions();
    o.map_ahead_tokens = 4096;
    o.pool_low_water = 4;
    o.pool_high_water = 8;
    VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, backend));
    for (int i = 0; i < 8; ++i) {
      VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache->AllocSlot(8000));
      (void)slot;
    }
    cache.reset();  // The thread is mid-work: drain and join.
    EXPECT_TRUE(backend->counters().Empty());
  }
}

// The thread sleeps until a call needs it: no wake-ups while the cache is
// idle, nor while requests are active but fully mapped ahead and nobody
// steps (the Step pace is then unknown, so there is no deadline).
TEST(MapAheadTest, NoWakeUpsWhileNothingNeedsTheThread) {
  KVCacheOptions o = SmallOptions();
  o.map_ahead_tokens = 256;
  o.pool_low_water = 2;
  o.pool_high_water = 4;
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, LatencyHost()));
  VATTN_ASSERT_OK(cache->WaitForBackgroundIdle());
  const std::int64_t idle0 = cache->Stats().background_wakeups;
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(cache->Stats().background_wakeups, idle0) << "idle cache";

  std::vector<StepRequest> reqs;
  for (int i = 0; i < 4; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache->AllocSlot(100));
    reqs.push_back({slot, 100});
  }
  VATTN_ASSERT_OK(cache->WaitForBackgroundIdle());
  const std::int64_t held0 = cache->Stats().background_wakeups;
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(cache->Stats().background_wakeups, held0) << "requests held";

  // Steps well inside the look-ahead neither wake the thread nor miss.
  const std::int64_t callers0 = cache->Stats().background_caller_wakeups;
  for (int step = 0; step < 100; ++step) {
    VATTN_ASSERT_OK_AND_ASSIGN(StepResult r, cache->Step(reqs));
    EXPECT_EQ(r.misses, 0);
    for (StepRequest& q : reqs) ++q.tokens;
  }
  EXPECT_EQ(cache->Stats().background_caller_wakeups, callers0);
}

// A slot nearly out of look-ahead wakes a sleeping thread from Step, which
// then maps it without the caller waiting for the mapping.
TEST(MapAheadTest, StepWakesTheThreadWhenASlotIsNearlyOutOfLookAhead) {
  KVCacheOptions o = SmallOptions();
  o.map_ahead_tokens = 256;
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, LatencyHost()));
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache->AllocSlot(100));
  VATTN_ASSERT_OK(cache->WaitForBackgroundIdle());
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache->GetSlot(slot));
  ASSERT_GE(info.backed_tokens, 100 + 256);
  const std::int64_t callers0 = cache->Stats().background_caller_wakeups;
  // Within a quarter of the look-ahead of the end of what is backed.
  StepRequest req{slot, info.backed_tokens - 256 / 4 + 1};
  VATTN_ASSERT_OK_AND_ASSIGN(StepResult r, cache->Step({&req, 1}));
  EXPECT_EQ(r.misses, 0);
  VATTN_ASSERT_OK(cache->WaitForBackgroundIdle());
  EXPECT_GE(cache->Stats().background_caller_wakeups, callers0 + 1);
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo after, cache->GetSlot(slot));
  EXPECT_GE(after.backed_tokens, req.tokens + 256);
}

// A wave of prompts, each announced (AllocSlot) and then grown by the
// caller while the thread maps look-ahead: each prompt is one map, whoever
// maps it, and it covers the look-ahead too. Without look-ahead, one map
// each as well.
TEST(MapAheadTest, APromptIsMappedOnceWhicheverSideGetsToItFirst) {
  for (std::int64_t ahead : {std::int64_t{256}, std::int64_t{0}}) {
    SCOPED_TRACE(absl::StrFormat("map_ahead_tokens %d", ahead));
    KVCacheOptions o = SmallOptions();
    o.map_ahead_tokens = ahead;
    o.max_extent_bytes = 64 * kMiB;  // Prompts fit one extent.
    VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, LatencyHost()));
    std::mt19937_64 rng(7);
    std::uniform_int_distribution<std::int64_t> len(1, 8000);
    std::vector<std::pair<int, std::int64_t>> wave;
    for (int i = 0; i < o.max_slots; ++i) {
      const std::int64_t p = len(rng);
      VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache->AllocSlot(p));
      wave.push_back({slot, p});
    }
    for (const auto& [slot, p] : wave) VATTN_ASSERT_OK(cache->Grow(slot, p));
    VATTN_ASSERT_OK(cache->WaitForBackgroundIdle());
    const CacheStats st = cache->Stats();
    EXPECT_EQ(st.map_calls, o.max_slots) << st.ToString();
    for (const auto& [slot, p] : wave) {
      VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache->GetSlot(slot));
      EXPECT_EQ(info.extents, 1);
      EXPECT_GE(info.backed_tokens, std::min(o.max_tokens, p + ahead));
    }
  }
}

}  // namespace
}  // namespace vattn
