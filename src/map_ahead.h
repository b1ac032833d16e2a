// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The map-ahead worker: one background thread, the set of slots flagged as
// having look-ahead work, and the protocol that puts the thread to sleep and
// wakes it. What the thread does on each round (which slot to map, how far,
// when to refill the pool) is the cache's decision, behind MapAheadClient.
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
  // woken earlier.
  virtual absl::Duration IdleNap() = 0;
};

// Owns the thread. MarkDue, NoteWork and Wake are lock-free unless the
// thread sleeps (then Wake takes the wake lock once, so a thread about to
// sleep cannot miss the new work); they may be called from any thread,
// holding any lock. Start and Stop are called once each by the owner.
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
  // Takes (and clears) every flagged slot, in slot order, into *slots.
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
  // Wakes the thread if it sleeps. Call without holding locks the client's
  // RunOnce takes, so the woken thread does not block on them at once.
  void Wake();
  // Announces work, wakes the thread, and blocks until it finished a round
  // that did nothing (or it stopped).
  void WaitIdle();

 private:
  void Loop();

  const int words_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> due_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> stop_{false};
  bool running_ = false;  // Written by Start/Stop only.
  MapAheadClient* client_ = nullptr;
  std::thread thread_;

  // The thread sleeps on work_cv_ under wake_mu_ (not the cache's lock), so
  // waking it never needs the cache lock.
  internal::Mutex wake_mu_;
  internal::CondVar work_cv_;
  internal::CondVar idle_cv_;
  std::uint64_t idle_generation_ ABSL_GUARDED_BY(wake_mu_) = 0;
};

}  // namespace vattn

#endif  // VATTN_SRC_MAP_AHEAD_H_
