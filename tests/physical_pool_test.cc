// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The physical pool (src/physical_pool.h): budget, idle reuse, and when it
// destroys idle handles.

#include "src/physical_pool.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

std::shared_ptr<Backend> Host() {
  auto host = MakeHostBackend();
  EXPECT_TRUE(host.ok());
  return *host;
}

TEST(PhysicalPoolTest, IdleHandlesOfTheSizeAskedForAreReusedWithoutCreating) {
  auto backend = Host();
  PhysicalPool pool(backend, 16 * kMiB);
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> a,
                             pool.Acquire(2 * kMiB, 3));
  EXPECT_EQ(pool.counters().create_calls, 3);
  pool.Release(a, 2 * kMiB);
  EXPECT_EQ(pool.IdleCount(2 * kMiB), 3);
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> b,
                             pool.Acquire(2 * kMiB, 2));
  EXPECT_EQ(pool.counters().create_calls, 3);
  EXPECT_EQ(pool.counters().idle_bytes, std::int64_t{2} << 20);
  pool.Release(b, 2 * kMiB);
}

TEST(PhysicalPoolTest, TheBudgetHoldsAndARefusalChangesNothing) {
  auto backend = Host();
  PhysicalPool pool(backend, 8 * kMiB);
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> a,
                             pool.Acquire(4 * kMiB, 2));
  auto refused = pool.Acquire(2 * kMiB, 1);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("8388608-byte budget"),
            std::string::npos)
      << refused.status();
  auto quiet = pool.Acquire(2 * kMiB, 1, /*quiet=*/true);
  EXPECT_EQ(quiet.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool.counters().physical_bytes, std::int64_t{8} << 20);
  EXPECT_EQ(pool.counters().peak_physical_bytes, std::int64_t{8} << 20);
  EXPECT_EQ(backend->counters().handles, 2);
  pool.Release(a, 4 * kMiB);
}

TEST(PhysicalPoolTest, IdleHandlesOfOtherSizesGoOnlyWhenThatMakesRoom) {
  auto backend = Host();
  PhysicalPool pool(backend, 8 * kMiB);
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> busy,
                             pool.Acquire(4 * kMiB, 1));
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> idle,
                             pool.Acquire(2 * kMiB, 1));
  pool.Release(idle, 2 * kMiB);  // 2 MiB idle, 2 MiB of headroom.
  // 8 MiB cannot fit even if the idle handle goes: it must stay.
  auto refused = pool.Acquire(8 * kMiB, 1, /*quiet=*/true);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool.IdleCount(2 * kMiB), 1);
  EXPECT_EQ(pool.counters().destroy_calls, 0);
  // 4 MiB fits once it goes: destroyed, then created.
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> more,
                             pool.Acquire(4 * kMiB, 1));
  EXPECT_EQ(pool.IdleCount(2 * kMiB), 0);
  EXPECT_EQ(pool.counters().destroy_calls, 1);
  EXPECT_EQ(pool.counters().physical_bytes, std::int64_t{8} << 20);
  pool.Release(busy, 4 * kMiB);
  pool.Release(more, 4 * kMiB);
}

TEST(PhysicalPoolTest, FillStopsAtTheBudgetAndDestroyingThePoolFreesAll) {
  auto backend = Host();
  {
    PhysicalPool pool(backend, 7 * kMiB);
    VATTN_ASSERT_OK_AND_ASSIGN(int made, pool.Fill(2 * kMiB, 10));
    EXPECT_EQ(made, 3);
    EXPECT_EQ(pool.IdleCount(2 * kMiB), 3);
    EXPECT_EQ(pool.Headroom(), std::int64_t{1} << 20);
    VATTN_ASSERT_OK_AND_ASSIGN(made, pool.Fill(2 * kMiB, 2));
    EXPECT_EQ(made, 0) << "already two idle";
  }
  EXPECT_TRUE(backend->counters().Empty());
}

TEST(PhysicalPoolTest, DestroyIdleDestroysEveryHandleInOneBatch) {
  auto backend = Host();
  PhysicalPool pool(backend, 64 * kMiB);
  for (std::size_t size : {2 * kMiB, 4 * kMiB, 8 * kMiB}) {
    VATTN_ASSERT_OK_AND_ASSIGN(int made, pool.Fill(size, 3));
    EXPECT_EQ(made, 3);
  }
  VATTN_ASSERT_OK(pool.DestroyIdle());
  EXPECT_EQ(pool.counters().destroy_calls, 9);
  EXPECT_EQ(pool.counters().destroy_batches, 1);
  EXPECT_EQ(pool.counters().idle_bytes, 0);
  EXPECT_EQ(pool.counters().physical_bytes, 0);
  EXPECT_EQ(backend->counters().handles, 0);
}

TEST(PhysicalPoolTest, MakingRoomDestroysLargestIdleFirstInOneBatch) {
  auto backend = Host();
  PhysicalPool pool(backend, 16 * kMiB);
  VATTN_ASSERT_OK_AND_ASSIGN(int made, pool.Fill(2 * kMiB, 4));  // 8 MiB
  VATTN_ASSERT_OK_AND_ASSIGN(made, pool.Fill(4 * kMiB, 2));       // 16 MiB
  ASSERT_EQ(made, 2);
  // The budget is full of idle handles; one 12 MiB handle needs 12 MiB:
  // both 4 MiB handles (largest first) and two of the 2 MiB ones go, in one
  // batch.
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> big,
                             pool.Acquire(12 * kMiB, 1));
  EXPECT_EQ(pool.IdleCount(4 * kMiB), 0);
  EXPECT_EQ(pool.IdleCount(2 * kMiB), 2);
  EXPECT_EQ(pool.counters().destroy_calls, 4);
  EXPECT_EQ(pool.counters().destroy_batches, 1);
  EXPECT_EQ(pool.counters().physical_bytes, std::int64_t{16} << 20);
  pool.Release(big, 12 * kMiB);
}

TEST(PhysicalPoolTest, AFailedDestroyKeepsThatHandleIdleAndTheOthersGo) {
  auto host = Host();
  VATTN_ASSERT_OK_AND_ASSIGN(
      std::shared_ptr<FaultInjectionBackend> faulty,
      FaultInjectionBackend::Create(host));
  {
    PhysicalPool pool(faulty, 16 * kMiB);
    VATTN_ASSERT_OK_AND_ASSIGN(int made, pool.Fill(2 * kMiB, 3));
    ASSERT_EQ(made, 3);
    faulty->SetPlan(FaultPlan::FailNth(BackendOp::kDestroy, 2));
    const absl::Status status = pool.DestroyIdle();
    EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
    EXPECT_EQ(pool.IdleCount(2 * kMiB), 1);
    EXPECT_EQ(pool.counters().idle_bytes, std::int64_t{2} << 20);
    EXPECT_EQ(pool.counters().physical_bytes, std::int64_t{2} << 20);
    EXPECT_EQ(pool.counters().destroy_calls, 2);
    EXPECT_EQ(host->counters().handles, 1);
    // Tried again, it goes.
    VATTN_ASSERT_OK(pool.DestroyIdle());
    EXPECT_EQ(host->counters().handles, 0);
  }
  EXPECT_TRUE(host->counters().Empty());
}

TEST(PhysicalPoolTest, AcquireCountsIdleHitsAndCreations) {
  auto backend = Host();
  PhysicalPool pool(backend, 16 * kMiB);
  VATTN_ASSERT_OK_AND_ASSIGN(int made, pool.Fill(2 * kMiB, 1));
  ASSERT_EQ(made, 1);
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> a,
                             pool.Acquire(2 * kMiB, 3));
  EXPECT_EQ(pool.counters().idle_hits, 1);
  EXPECT_EQ(pool.counters().idle_misses, 2);
  auto refused = pool.Acquire(16 * kMiB, 1, /*quiet=*/true);
  EXPECT_FALSE(refused.ok());
  EXPECT_EQ(pool.counters().idle_hits, 1) << "a refusal changes nothing";
  EXPECT_EQ(pool.counters().idle_misses, 2);
  pool.Release(a, 2 * kMiB);
}

// ---- Demand-following water marks -------------------------------------------

TEST(PhysicalPoolTest, RefillFollowsRecentDemandNotAFixedCount) {
  auto backend = Host();
  std::int64_t now = 0;
  PhysicalPool::Options o;
  o.max_pooled_fraction = 1.0;
  o.demand_period_nanos = 100;
  o.demand_window = 2;
  o.now_nanos = [&now] { return now; };
  PhysicalPool pool(backend, 256 * kMiB, o);
  const std::size_t size = 4 * kMiB;
  EXPECT_EQ(pool.RefillTarget(size, 32), 0) << "never asked for";
  EXPECT_FALSE(pool.BelowLowWater(size, 32));
  VATTN_ASSERT_OK_AND_ASSIGN(int made, pool.Replenish(size, 32));
  EXPECT_EQ(made, 0) << "nothing pooled for demand that never came";
  // A period that hands out 5 handles: the target is 5, capped by max_count.
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> a,
                             pool.Acquire(size, 2));
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> b,
                             pool.Acquire(size, 3));
  EXPECT_EQ(pool.RefillTarget(size, 32), 5);
  EXPECT_EQ(pool.RefillTarget(size, 3), 3);
  EXPECT_TRUE(pool.BelowLowWater(size, 32));
  // One handle per round, as a background thread that must not hold up a
  // foreground miss would ask.
  VATTN_ASSERT_OK_AND_ASSIGN(made, pool.Replenish(size, 32, /*max_create=*/1));
  EXPECT_EQ(made, 1);
  VATTN_ASSERT_OK_AND_ASSIGN(made, pool.Replenish(size, 32));
  EXPECT_EQ(made, 4);
  EXPECT_EQ(pool.IdleCount(size), 5);
  EXPECT_FALSE(pool.BelowLowWater(size, 32));
  // The next period is still in the window (2 periods): the target holds.
  now = 150;
  EXPECT_EQ(pool.RefillTarget(size, 32), 5);
  // Two periods later the peak has aged out: the target falls to 1, and a
  // refill creates nothing while 5 are idle.
  now = 250;
  EXPECT_EQ(pool.RefillTarget(size, 32), 1);
  VATTN_ASSERT_OK_AND_ASSIGN(made, pool.Replenish(size, 32));
  EXPECT_EQ(made, 0);
  pool.Release(a, size);
  pool.Release(b, size);
}

TEST(PhysicalPoolTest, RefillStaysWithinThePooledShareOfTheBudget) {
  auto backend = Host();
  PhysicalPool::Options o;
  o.max_pooled_fraction = 1.0 / 8;  // 8 MiB of 64 MiB.
  PhysicalPool pool(backend, 64 * kMiB, o);
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> a,
                             pool.Acquire(2 * kMiB, 10));
  EXPECT_EQ(pool.RefillTarget(2 * kMiB, 100), 4);
  // Idle handles of another size count against the same share.
  VATTN_ASSERT_OK_AND_ASSIGN(int made, pool.Fill(4 * kMiB, 1));
  ASSERT_EQ(made, 1);
  EXPECT_EQ(pool.RefillTarget(2 * kMiB, 100), 2);
  VATTN_ASSERT_OK_AND_ASSIGN(made, pool.Replenish(2 * kMiB, 100));
  EXPECT_EQ(made, 2);
  EXPECT_EQ(pool.counters().idle_bytes, std::int64_t{8} << 20);
  pool.Release(a, 2 * kMiB);
}

TEST(PhysicalPoolTest, RefillStopsAtTheBudgetsHeadroom) {
  auto backend = Host();
  PhysicalPool::Options o;
  o.max_pooled_fraction = 1.0;
  PhysicalPool pool(backend, 12 * kMiB, o);
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<PhysicalHandle> a,
                             pool.Acquire(2 * kMiB, 4));
  VATTN_ASSERT_OK_AND_ASSIGN(int made, pool.Replenish(2 * kMiB, 100));
  EXPECT_EQ(made, 2) << "4 MiB of headroom";
  EXPECT_EQ(pool.Headroom(), 0);
  pool.Release(a, 2 * kMiB);
}

// ---- Size classes ---------------------------------------------------------------

TEST(SizeClassesTest, ExactUpToTheStepsThenStepsPerDoubling) {
  const std::int64_t g = 2 * static_cast<std::int64_t>(kMiB);
  SizeClasses c(g, 4);
  EXPECT_EQ(c.Round(0), 0);
  EXPECT_EQ(c.Round(1), g);
  EXPECT_EQ(c.Round(g), g);
  EXPECT_EQ(c.Round(4 * g), 4 * g);
  EXPECT_EQ(c.Round(4 * g + 1), 5 * g);
  // [8, 16) granules: classes 8, 10, 12, 14.
  EXPECT_EQ(c.Round(9 * g), 10 * g);
  EXPECT_EQ(c.Round(15 * g), 16 * g);
  // [64, 128): steps of 16.
  EXPECT_EQ(c.Round(65 * g), 80 * g);
  EXPECT_EQ(c.CountUpTo(4 * g), 4);
  EXPECT_EQ(c.CountUpTo(8 * g), 8);   // 1..4, 5, 6, 7, 8
  EXPECT_EQ(c.CountUpTo(16 * g), 12);
  EXPECT_EQ(c.CountUpTo(15 * g), 11);
  EXPECT_DOUBLE_EQ(c.MaxWasteFraction(), 0.2);
}

TEST(SizeClassesTest, RoundingIsMonotoneBoundedAndIdempotent) {
  const std::int64_t g = 2 * static_cast<std::int64_t>(kMiB);
  for (int steps : {1, 2, 8, 16, 32}) {
    SizeClasses c(g, steps);
    std::int64_t last = 0;
    for (std::int64_t n = 1; n <= 5000; ++n) {
      const std::int64_t b = n * g;
      const std::int64_t r = c.Round(b);
      ASSERT_GE(r, b);
      ASSERT_GE(r, last) << "steps " << steps << " n " << n;
      ASSERT_EQ(r % g, 0);
      ASSERT_EQ(c.Round(r), r);
      ASSERT_LT(static_cast<double>(r - b) / static_cast<double>(r),
                c.MaxWasteFraction() + 1e-12)
          << "steps " << steps << " n " << n;
      last = r;
    }
    // About `steps` classes per doubling: 5000 granules is ~12.3 doublings.
    EXPECT_LE(c.CountUpTo(5000 * g), steps * 13 + 1) << steps;
  }
}

TEST(PhysicalPoolTest, PoolClassesFollowTheBackendsGranularity) {
  auto backend = Host();
  PhysicalPool pool(backend, 16 * kMiB);
  EXPECT_EQ(pool.size_classes().granularity(),
            static_cast<std::int64_t>(backend->granularity()));
  EXPECT_EQ(pool.size_classes().steps_per_doubling(), 16);
}

// What rounding prompts to classes costs on the capacity benchmark's
// production and chat prompt mixes (log-normal, Llama-3-8B's 128 KiB per
// token, 2 MiB granules), against rounding to one granule: printed (it is
// quoted in docs/BENCHMARKS.md) and bounded.
TEST(SizeClassesTest, PromptRoundingWasteOnTheCapacityMixes) {
  const std::int64_t g = 2 * static_cast<std::int64_t>(kMiB);
  const std::int64_t bpt = 128 * 1024;
  struct Mix {
    const char* name;
    double median, sigma;
  };
  for (const Mix& mix : {Mix{"production", 1500, 0.686}, Mix{"chat", 1000, 1.0}}) {
    for (int steps : {4, 8, 16, 32}) {
      SizeClasses c(g, steps);
      std::mt19937_64 rng(20240501);
      std::normal_distribution<double> normal(0, 1);
      double granule_bytes = 0, class_bytes = 0;
      for (int i = 0; i < 20000; ++i) {
        const std::int64_t tokens = std::clamp<std::int64_t>(
            std::llround(std::exp(std::log(mix.median) + mix.sigma * normal(rng))), 1, 16383);
        const std::int64_t exact = (tokens * bpt + g - 1) / g * g;
        granule_bytes += static_cast<double>(exact);
        class_bytes += static_cast<double>(c.Round(exact));
      }
      const double waste = class_bytes / granule_bytes - 1;
      std::printf("prompt classes: %-10s steps %2d: %3d classes up to 16k tokens, %.2f%% more "
                  "bytes than granule rounding\n",
                  mix.name, steps, c.CountUpTo(16384 * bpt), 100 * waste);
      EXPECT_LT(waste, c.MaxWasteFraction() / 1.5) << mix.name << " steps " << steps;
    }
  }
}

}  // namespace
}  // namespace vattn
