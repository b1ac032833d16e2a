// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// MapAheadWorker alone: the due set, the wake protocol (sleep until woken
// or a deadline, wake-ups counted) and WaitIdle, with a client that counts
// rounds; StepPace's arithmetic. No cache, no backend.

#include "src/map_ahead.h"

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace vattn {
namespace {

// Does `pending` units of work, one per round.
class CountingClient : public MapAheadClient {
 public:
  bool RunOnce() override {
    ++rounds;
    if (pending.load() == 0) return false;
    --pending;
    ++done;
    return true;
  }
  absl::Duration IdleNap() override {
    const std::int64_t n = nap_nanos.load();
    return n < 0 ? absl::InfiniteDuration() : absl::Nanoseconds(n);
  }

  // 60 s unless a test says otherwise; < 0: forever.
  std::atomic<std::int64_t> nap_nanos{60'000'000'000};
  std::atomic<int> pending{0};
  std::atomic<int> done{0};
  std::atomic<int> rounds{0};
};

TEST(MapAheadWorkerTest, TakeDueReturnsEachFlaggedSlotOnceInOrder) {
  MapAheadWorker w(200);
  for (int s : {150, 3, 64, 3, 199, 0}) w.MarkDue(s);
  std::vector<int> due;
  w.TakeDue(&due);
  EXPECT_EQ(due, (std::vector<int>{0, 3, 64, 150, 199}));
  due.clear();
  w.TakeDue(&due);
  EXPECT_TRUE(due.empty());
}

TEST(MapAheadWorkerTest, WaitIdleReturnsAfterTheAnnouncedWorkIsDone) {
  CountingClient client;
  MapAheadWorker w(1);
  w.Start(&client);
  EXPECT_TRUE(w.running());
  w.WaitIdle();
  client.pending = 5;
  w.WaitIdle();  // Sleeps for 60 s unless woken: WaitIdle must wake it.
  EXPECT_EQ(client.done.load(), 5);
  EXPECT_EQ(client.pending.load(), 0);
  w.Stop();
  EXPECT_TRUE(w.stopping());
}

TEST(MapAheadWorkerTest, NoteWorkThenWakeRunsARoundEvenIfTheThreadSleeps) {
  CountingClient client;
  MapAheadWorker w(1);
  w.Start(&client);
  w.WaitIdle();  // Now asleep (60 s nap).
  const int before = client.rounds.load();
  client.pending = 1;
  w.NoteWork();
  w.Wake();
  while (client.done.load() == 0) std::this_thread::yield();
  EXPECT_GT(client.rounds.load(), before);
  w.Stop();
}

TEST(MapAheadWorkerTest, StopJoinsASleepingThreadAndIsIdempotent) {
  CountingClient client;
  MapAheadWorker w(1);
  w.Start(&client);
  w.WaitIdle();
  w.Stop();
  w.Stop();
  w.WaitIdle();  // Returns at once once stopped.
}

TEST(MapAheadWorkerTest, AnIdleThreadSleepsUntilWokenWithNoWakeUps) {
  CountingClient client;
  client.nap_nanos = -1;  // Nothing but announced work can need it.
  MapAheadWorker w(1);
  w.Start(&client);
  w.WaitIdle();
  while (!w.asleep()) std::this_thread::yield();
  const MapAheadCounters before = w.counters();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const MapAheadCounters after = w.counters();
  EXPECT_EQ(after.wakeups, before.wakeups);
  EXPECT_EQ(after.rounds, before.rounds);
  // Announced work wakes it: one wake-up, paid by the caller.
  client.pending = 1;
  w.NoteWork();
  w.Wake();
  while (client.done.load() == 0) std::this_thread::yield();
  w.WaitIdle();
  const MapAheadCounters woken = w.counters();
  EXPECT_GE(woken.wakeups, before.wakeups + 1);
  EXPECT_GE(woken.woken_by_callers, before.woken_by_callers + 1);
  EXPECT_EQ(woken.deadline_wakeups, 0);
  w.Stop();
}

TEST(MapAheadWorkerTest, TheNapsDeadlineWakesTheThread) {
  CountingClient client;
  client.nap_nanos = 5'000'000;  // 5 ms.
  MapAheadWorker w(1);
  w.Start(&client);
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (w.counters().deadline_wakeups < 3 &&
         std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_GE(w.counters().deadline_wakeups, 3);
  EXPECT_EQ(w.counters().woken_by_callers, 0);
  w.Stop();
}

// Many wakers against a thread that sleeps forever between rounds: a lost
// wake-up would leave work undone (the test then times out its wait).
TEST(MapAheadWorkerTest, ConcurrentWakersNeverLoseWork) {
  CountingClient client;
  client.nap_nanos = -1;
  MapAheadWorker w(1);
  w.Start(&client);
  constexpr int kThreads = 4;
  constexpr int kEach = 2000;
  std::vector<std::thread> wakers;
  for (int t = 0; t < kThreads; ++t) {
    wakers.emplace_back([&] {
      for (int i = 0; i < kEach; ++i) {
        ++client.pending;
        w.NoteWork();
        w.Wake();
        if (i % 64 == 0) std::this_thread::yield();
      }
    });
  }
  for (std::thread& t : wakers) t.join();
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (client.done.load() < kThreads * kEach &&
         std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(client.done.load(), kThreads * kEach);
  w.Stop();
}

TEST(StepPaceTest, UnknownUntilStepsAreSeenThenStepsTimesThePace) {
  StepPace pace;
  EXPECT_EQ(pace.NapFor(100), absl::InfiniteDuration());
  pace.Observe(/*steps=*/10, /*now_nanos=*/1'000'000);
  EXPECT_EQ(pace.NapFor(100), absl::InfiniteDuration());
  pace.Observe(110, 101'000'000);  // 100 steps in 100 ms: 1 ms a step.
  EXPECT_EQ(pace.nanos_per_step(), 1'000'000);
  EXPECT_EQ(pace.NapFor(50), absl::Milliseconds(50));
  // A slot already at (or past) its wake margin: one step.
  EXPECT_EQ(pace.NapFor(0), absl::Milliseconds(1));
  EXPECT_EQ(pace.NapFor(-7), absl::Milliseconds(1));
  EXPECT_EQ(pace.NapFor(std::int64_t{1} << 62), absl::InfiniteDuration());
}

TEST(StepPaceTest, ForgetsThePaceWhenCallersStopStepping) {
  StepPace pace;
  pace.Observe(0, 0);
  pace.Observe(100, 100'000'000);  // 1 ms a step.
  // Too soon to say the callers stopped: the pace stays.
  pace.Observe(100, 103'000'000);
  EXPECT_EQ(pace.nanos_per_step(), 1'000'000);
  // Nine steps' time without one: stopped, so no deadline.
  pace.Observe(100, 109'000'000);
  EXPECT_EQ(pace.nanos_per_step(), 0);
  EXPECT_EQ(pace.NapFor(10), absl::InfiniteDuration());
  // They resume: the pace is measured again from the last observation.
  pace.Observe(120, 149'000'000);
  EXPECT_EQ(pace.nanos_per_step(), 2'000'000);
}

}  // namespace
}  // namespace vattn
