// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// FenceTable (src/backend/fence_table.h), the CUDA backend's fence and event
// bookkeeping, on the CPU with integers for events. Issue 11 item 5: a
// FenceDone racing ReleaseFence and a new RecordFence must never query an
// event that was already re-recorded for another fence.

#include "src/backend/fence_table.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace vattn {
namespace {

using Table = internal::FenceTable<int>;

TEST(FenceTableTest, ReleasedFenceKeepsItsEventWhileQueried) {
  Table t;
  const FenceId f = t.Add(7);
  VATTN_ASSERT_OK_AND_ASSIGN(int e, t.Acquire(f));  // A FenceDone starts.
  EXPECT_EQ(e, 7);
  VATTN_ASSERT_OK(t.Release(f));                    // ReleaseFence races it.
  // A new RecordFence must not get event 7 while the query still reads it.
  EXPECT_EQ(t.TakeFree(), std::nullopt);
  EXPECT_EQ(t.pooled(), 0u);
  // The fence is gone for everyone else.
  VATTN_EXPECT_CODE(t.Acquire(f), absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(t.Release(f), absl::StatusCode::kInvalidArgument);
  t.EndQuery(f);                                    // The query ends.
  EXPECT_EQ(t.TakeFree(), std::optional<int>(7));
  EXPECT_EQ(t.fences(), 0u);
}

TEST(FenceTableTest, UnqueriedReleaseRecyclesAtOnce) {
  Table t;
  const FenceId a = t.Add(1);
  const FenceId b = t.Add(2);
  EXPECT_NE(a, b);
  EXPECT_NE(a, kCompletedFence);
  VATTN_ASSERT_OK(t.Release(a));
  EXPECT_EQ(t.TakeFree(), std::optional<int>(1));
  // Two queries at once: the event returns after the second ends.
  VATTN_ASSERT_OK(t.Acquire(b).status());
  VATTN_ASSERT_OK(t.Acquire(b).status());
  VATTN_ASSERT_OK(t.Release(b));
  t.EndQuery(b);
  EXPECT_EQ(t.pooled(), 0u);
  t.EndQuery(b);
  EXPECT_EQ(t.pooled(), 1u);
  VATTN_EXPECT_CODE(t.Acquire(kCompletedFence),
                    absl::StatusCode::kInvalidArgument);
}

TEST(FenceTableTest, TakeAllReturnsEveryEvent) {
  Table t;
  t.GiveFree(1);
  const FenceId f = t.Add(2);
  const FenceId g = t.Add(3);
  VATTN_ASSERT_OK(t.Acquire(g).status());
  VATTN_ASSERT_OK(t.Release(g));  // Pinned, released.
  (void)f;
  std::vector<int> all = t.TakeAll();
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(t.fences(), 0u);
  EXPECT_EQ(t.pooled(), 0u);
}

// Threads record (take an event, "record" it under a new owner, add it),
// query and release at random. Each event carries the fence that last
// recorded it; a query that sees another fence's mark read a re-recorded
// event: the bug.
TEST(FenceTableTest, QueriesNeverSeeAReRecordedEvent) {
  constexpr int kEvents = 4;
  constexpr int kThreads = 4;
  constexpr int kIterations = 20000;
  Table t;
  std::atomic<FenceId> owner[kEvents];
  for (int i = 0; i < kEvents; ++i) {
    owner[i] = kCompletedFence;
    t.GiveFree(i);
  }
  std::atomic<int> wrong{0};
  std::atomic<std::int64_t> queries{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < kThreads; ++w) {
    threads.emplace_back([&, w] {
      std::uint32_t x = 12345u + static_cast<std::uint32_t>(w);
      std::vector<FenceId> mine;
      for (int i = 0; i < kIterations; ++i) {
        x = x * 1664525u + 1013904223u;
        const std::uint32_t op = x >> 30;
        if (op == 0 || mine.empty()) {
          std::optional<int> e = t.TakeFree();
          if (!e.has_value()) continue;
          // "cuEventRecord": the event now belongs to the new fence. The id
          // is not known until Add, so mark it as in flight first.
          owner[*e].store(~FenceId{0});
          const FenceId f = t.Add(*e);
          owner[*e].store(f);
          mine.push_back(f);
        } else if (op == 3) {
          const FenceId f = mine.back();
          mine.pop_back();
          VATTN_EXPECT_OK(t.Release(f));
        } else {
          // Query someone's fence: ours, or one id nearby (maybe another
          // thread's, maybe released meanwhile: then Acquire fails).
          const FenceId f = mine[x % mine.size()] + (x >> 8) % 3;
          absl::StatusOr<int> e = t.Acquire(f);
          if (!e.ok()) continue;
          // "cuEventQuery", slow enough for the others to race it.
          for (int k = 0; k < 4; ++k) {
            if (owner[*e].load() != f) ++wrong;
            std::this_thread::yield();
          }
          ++queries;
          t.EndQuery(f);
        }
      }
      for (FenceId f : mine) VATTN_EXPECT_OK(t.Release(f));
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0) << "a query read an event re-recorded for "
                                "another fence";
  EXPECT_GT(queries.load(), 0);
  EXPECT_EQ(t.fences(), 0u);
  EXPECT_EQ(t.pooled(), static_cast<std::size_t>(kEvents));
}

}  // namespace
}  // namespace vattn
