// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The physical pool (src/physical_pool.h): budget, idle reuse, and when it
// destroys idle handles.

#include "src/physical_pool.h"

#include <cstdint>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"

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

}  // namespace
}  // namespace vattn
