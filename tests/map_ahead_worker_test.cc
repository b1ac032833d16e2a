// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// MapAheadWorker alone: the due set, the wake protocol and WaitIdle, with a
// client that counts rounds. No cache, no backend.

#include "src/map_ahead.h"

#include <atomic>
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
  absl::Duration IdleNap() override { return absl::Seconds(60); }

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

}  // namespace
}  // namespace vattn
