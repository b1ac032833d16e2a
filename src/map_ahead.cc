// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/map_ahead.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <limits>

namespace vattn {

using internal::MutexLock;

namespace {

// The futex calls on a 32-bit atomic (Linux: std::atomic<uint32_t> is the
// bare word). Spurious returns (EINTR, EAGAIN) are fine: callers loop.
void FutexWait(std::atomic<std::uint32_t>* word, std::uint32_t expected,
               const timespec* timeout) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word),
          FUTEX_WAIT_PRIVATE, expected, timeout, nullptr, 0);
}

void FutexWakeOne(std::atomic<std::uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word),
          FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
}

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t),
              "the futex word must be the bare 32-bit integer");

}  // namespace

MapAheadWorker::MapAheadWorker(int max_slots)
    : words_((max_slots + 63) / 64),
      due_(std::make_unique<std::atomic<std::uint64_t>[]>(
          static_cast<std::size_t>(words_))) {}

MapAheadWorker::~MapAheadWorker() { Stop(); }

void MapAheadWorker::Start(MapAheadClient* client) {
  client_ = client;
  running_ = true;
  thread_ = std::thread([this] { Loop(); });
}

void MapAheadWorker::Stop() {
  stop_.store(true, std::memory_order_seq_cst);
  WakeIfAsleep();
  {
    MutexLock lock(&idle_mu_);
    idle_cv_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
}

void MapAheadWorker::TakeDue(std::vector<int>* slots) {
  for (int w = 0; w < words_; ++w) {
    std::uint64_t bits = due_[static_cast<std::size_t>(w)].exchange(
        0, std::memory_order_acq_rel);
    while (bits != 0) {
      const int b = __builtin_ctzll(bits);
      bits &= bits - 1;
      slots->push_back(w * 64 + b);
    }
  }
}

bool MapAheadWorker::WakeIfAsleep() {
  if (sleep_word_.load(std::memory_order_seq_cst) != kAsleep) return false;
  if (sleep_word_.exchange(kAwake, std::memory_order_seq_cst) != kAsleep) {
    return false;  // Another waker (or the thread itself) got there first.
  }
  FutexWakeOne(&sleep_word_);
  return true;
}

void MapAheadWorker::Wake() {
  if (WakeIfAsleep()) woken_by_callers_.fetch_add(1, std::memory_order_relaxed);
}

void MapAheadWorker::WaitIdle() {
  NoteWork();
  const std::uint64_t target = generation();
  Wake();
  MutexLock lock(&idle_mu_);
  while (idle_generation_ < target && !stopping()) idle_cv_.Wait(&idle_mu_);
}

MapAheadCounters MapAheadWorker::counters() const {
  MapAheadCounters c;
  c.rounds = rounds_.load(std::memory_order_relaxed);
  c.sleeps = sleeps_.load(std::memory_order_relaxed);
  c.wakeups = wakeups_.load(std::memory_order_relaxed);
  c.deadline_wakeups = deadline_wakeups_.load(std::memory_order_relaxed);
  c.woken_by_callers = woken_by_callers_.load(std::memory_order_relaxed);
  return c;
}

bool MapAheadWorker::Sleep(absl::Duration nap) {
  if (nap == absl::InfiniteDuration()) {
    while (sleep_word_.load(std::memory_order_seq_cst) == kAsleep) {
      FutexWait(&sleep_word_, kAsleep, nullptr);
    }
    return false;
  }
  // FUTEX_WAIT's timeout is relative; recompute it after a spurious return.
  using Clock = std::chrono::steady_clock;
  const Clock::time_point deadline =
      Clock::now() + absl::ToChronoNanoseconds(nap);
  while (sleep_word_.load(std::memory_order_seq_cst) == kAsleep) {
    const Clock::duration left = deadline - Clock::now();
    if (left <= Clock::duration::zero()) return true;
    const timespec ts = absl::ToTimespec(absl::FromChrono(left));
    FutexWait(&sleep_word_, kAsleep, &ts);
  }
  return false;
}

void MapAheadWorker::Loop() {
  while (!stopping()) {
    const std::uint64_t generation = this->generation();
    rounds_.fetch_add(1, std::memory_order_relaxed);
    if (client_->RunOnce()) continue;
    const absl::Duration nap = client_->IdleNap();
    // Asleep from here (before WaitIdle's callers are released), so a
    // caller that wakes the thread after WaitIdle returned finds it asleep.
    sleep_word_.store(kAsleep, std::memory_order_seq_cst);
    {
      MutexLock lock(&idle_mu_);
      idle_generation_ = generation;
      idle_cv_.SignalAll();
    }
    if (WorkSince(generation) || stopping()) {
      sleep_word_.store(kAwake, std::memory_order_seq_cst);
      continue;
    }
    sleeps_.fetch_add(1, std::memory_order_relaxed);
    const bool ran_out = Sleep(nap);
    // A nap that ran out leaves the word asleep; a waker may swap it at the
    // same time, which is harmless (its futex-wake then finds no waiter).
    sleep_word_.store(kAwake, std::memory_order_seq_cst);
    wakeups_.fetch_add(1, std::memory_order_relaxed);
    if (ran_out) deadline_wakeups_.fetch_add(1, std::memory_order_relaxed);
  }
}

void StepPace::Observe(std::int64_t steps, std::int64_t now_nanos) {
  if (last_steps_ < 0) {
    last_steps_ = steps;
    last_nanos_ = now_nanos;
    return;
  }
  const std::int64_t ds = steps - last_steps_;
  const std::int64_t dt = now_nanos - last_nanos_;
  if (ds > 0) {
    nanos_per_step_ = std::max<std::int64_t>(1, dt / ds);
  } else if (nanos_per_step_ > 0 && dt > 8 * nanos_per_step_) {
    nanos_per_step_ = 0;  // The callers stopped stepping.
  } else {
    return;  // Too soon to tell: keep measuring from the last observation.
  }
  last_steps_ = steps;
  last_nanos_ = now_nanos;
}

absl::Duration StepPace::NapFor(std::int64_t tokens_left) const {
  if (nanos_per_step_ <= 0) return absl::InfiniteDuration();
  const std::int64_t steps = std::max<std::int64_t>(1, tokens_left);
  if (steps > std::numeric_limits<std::int64_t>::max() / nanos_per_step_) {
    return absl::InfiniteDuration();
  }
  return absl::Nanoseconds(steps * nanos_per_step_);
}

}  // namespace vattn
