// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The map-ahead worker: one background thread, the set of slots flagged as
// having look-ahead work, and the protocol that puts the thread to sleep and
// wakes it. What the thread does on each round (which slot to map, how far,
// when to refill the pool) and how long it may sleep are the cache's
// decisions, behind MapAheadClient; StepPace turns the slots' remaining
// look-ahead into that sleep.
//
// The wake protocol (no mutex on the waker's side):
//   worker: g = generation; RunOnce(); nothing done -> nap = IdleNap();
//           sleep word := asleep (seq_cst); if generation == g: futex-wait
//           on the word while it reads asleep, for at most nap;
//           sleep word := awake.
//   waker:  NoteWork() (generation += 1, seq_cst), then Wake(): if the
//           sleep word reads asleep, swap it to awake and futex-wake.
// Both sides write one seq_cst variable and then read the other's, so at
// least one sees the other: either the worker sees the new generation and
// runs another round, or the waker sees it asleep and wakes it (a wake that
// lands before the futex wait makes the wait return at once, the word no
// longer reading asleep). A waker pays one atomic load while the thread is
// awake, and one atomic swap plus one futex-wake system call when it sleeps;
// it never blocks.
#ifndef VATTN_SRC_MAP_AHEAD_H_
#define VATTN_SRC_MAP_AHEAD_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "src/internal/mutex.h"

namespace vattn {

// What the worker's owner does on the thread. Called from the worker thread
// only, with no lock of the worker's held.
class MapAheadClient {
 public:
  virtual ~MapAheadClient() = default;
  // One round of background work (taking the owner's own locks): true when
  // it did something, so the worker runs another round at once.
  virtual bool RunOnce() = 0;
  // How long the thread may sleep after a round that did nothing, unless
  // woken earlier: absl::InfiniteDuration() when only a caller's work can
  // create more (then the thread does not wake at all until announced work).
  virtual absl::Duration IdleNap() = 0;
};

// The counters of a worker, read with relaxed loads (each is exact; they
// are not a snapshot of one instant together).
struct MapAheadCounters {
  std::int64_t rounds = 0;           // RunOnce calls.
  std::int64_t sleeps = 0;           // Times the thread went to sleep.
  std::int64_t wakeups = 0;          // Returns from a sleep, for any reason.
  std::int64_t deadline_wakeups = 0;  // ... because its nap ran out.
  std::int64_t woken_by_callers = 0;  // Wake() calls that found it asleep.
};

// Owns the thread. MarkDue, NoteWork and Wake never block and take no lock
// (see the protocol above); they may be called from any thread, holding
// any lock. Start and Stop are called once each by the owner. The thread
// allocates nothing per round or per wake.
class MapAheadWorker {
 public:
  explicit MapAheadWorker(int max_slots);
  // Stops the thread if it still runs.
  ~MapAheadWorker();
  MapAheadWorker(const MapAheadWorker&) = delete;
  MapAheadWorker& operator=(const MapAheadWorker&) = delete;

  // Starts the thread; `client` must outlive Stop().
  void Start(MapAheadClient* client);
  // Asks the thread to finish its round and joins it. Idempotent.
  void Stop();
  bool running() const { return running_; }
  bool stopping() const { return stop_.load(std::memory_order_acquire); }

  // Flags a slot as having look-ahead work (writes the bitmap only when the
  // bit is clear, so a flagged slot costs Step one relaxed load).
  void MarkDue(int slot) {
    std::atomic<std::uint64_t>& word = due_[static_cast<std::size_t>(slot) / 64];
    const std::uint64_t bit = std::uint64_t{1} << (slot % 64);
    if ((word.load(std::memory_order_relaxed) & bit) == 0) {
      word.fetch_or(bit, std::memory_order_release);
    }
  }
  // Takes (and clears) every flagged slot, in slot order, into *slots
  // (appended; reserve max_slots once and no call allocates).
  void TakeDue(std::vector<int>* slots);
  // Announces new work: a round that started before it will be followed by
  // another. Call before Wake, and before dropping the lock that protects
  // the state the work depends on.
  void NoteWork() { generation_.fetch_add(1, std::memory_order_seq_cst); }
  // Work announced since `generation()` returned `since`.
  bool WorkSince(std::uint64_t since) const {
    return generation_.load(std::memory_order_seq_cst) != since;
  }
  std::uint64_t generation() const {
    return generation_.load(std::memory_order_seq_cst);
  }
  // Wakes the thread if it sleeps (after NoteWork: a Wake without it may
  // find the thread not yet asleep and be lost). Lock-free; one system call
  // when the thread sleeps. Call without holding locks the client's RunOnce
  // takes, so the woken thread does not block on them at once.
  void Wake();
  // Announces work, wakes the thread, and blocks until it finished a round
  // that did nothing (or it stopped).
  void WaitIdle();

  MapAheadCounters counters() const;
  // True while the thread is in (or about to enter) its sleep.
  bool asleep() const {
    return sleep_word_.load(std::memory_order_acquire) == kAsleep;
  }

 private:
  static constexpr std::uint32_t kAwake = 0;
  static constexpr std::uint32_t kAsleep = 1;

  void Loop();
  // Sleeps while sleep_word_ reads kAsleep, for at most `nap`; true when the
  // nap ran out.
  bool Sleep(absl::Duration nap);
  // Swaps the sleep word to awake and wakes the thread if it read asleep.
  bool WakeIfAsleep();

  const int words_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> due_;
  std::atomic<std::uint64_t> generation_{0};
  // The futex word: kAsleep from just before the thread's last check for
  // work until it wakes (or a waker swaps it back).
  std::atomic<std::uint32_t> sleep_word_{kAwake};
  std::atomic<bool> stop_{false};
  bool running_ = false;  // Written by Start/Stop only.
  MapAheadClient* client_ = nullptr;
  std::thread thread_;

  std::atomic<std::int64_t> rounds_{0};
  std::atomic<std::int64_t> sleeps_{0};
  std::atomic<std::int64_t> wakeups_{0};
  std::atomic<std::int64_t> deadline_wakeups_{0};
  std::atomic<std::int64_t> woken_by_callers_{0};

  // WaitIdle's rendezvous only: never taken by Wake or MarkDue.
  internal::Mutex idle_mu_;
  internal::CondVar idle_cv_;
  std::uint64_t idle_generation_ ABSL_GUARDED_BY(idle_mu_) = 0;
};

// How long the map-ahead thread may sleep before the slot closest to its
// look-ahead needs it: the pace at which callers step (measured from the
// cache's Step count as the thread sees it) times the tokens that slot has
// left before it reaches the wake margin. A value type; the worker thread
// alone uses it.
class StepPace {
 public:
  // A Step count `steps` seen at `now_nanos` (steady clock): updates the
  // measured time per step (an average over the last observations).
  void Observe(std::int64_t steps, std::int64_t now_nanos);
  // Nanoseconds per step; 0 while unknown: until an observation saw steps
  // happen, and again once none happened for 8 measured steps' time.
  std::int64_t nanos_per_step() const { return nanos_per_step_; }
  // The nap for a slot with `tokens_left` of look-ahead above the wake
  // margin (decode adds one token per step per slot): tokens_left steps
  // (at least one) at the measured pace; infinite when no pace is known
  // (none measured yet, or the callers stopped stepping), since then the
  // callers' own wake (Step's, when a slot is nearly out of look-ahead)
  // is what brings the thread back.
  absl::Duration NapFor(std::int64_t tokens_left) const;

 private:
  std::int64_t last_steps_ = -1;
  std::int64_t last_nanos_ = 0;
  std::int64_t nanos_per_step_ = 0;
};

}  // namespace vattn

#endif  // VATTN_SRC_MAP_AHEAD_H_
