// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "thread_pool.h"

#include <algorithm>

namespace vdecode {

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) {
    threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }
  for (int w = 1; w < threads; ++w) {
    workers_.emplace_back([this, w] { WorkerLoop(w); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    shutdown_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::RunItems(
    int worker, const std::function<void(std::int64_t, int)>& fn,
    std::int64_t n) {
  for (;;) {
    const std::int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n) break;
    fn(i, worker);
  }
}

void ThreadPool::WorkerLoop(int worker) {
  std::uint64_t seen = 0;
  const std::function<void(std::int64_t, int)>* fn = nullptr;
  std::int64_t n = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return shutdown_ || generation_ != seen; });
      if (shutdown_) return;
      seen = generation_;
      // A worker that wakes after the call it was woken for has returned
      // finds no function and goes back to sleep; one that finds a call
      // holds busy_ so that call cannot return before it has finished.
      fn = fn_;
      n = n_;
      if (fn == nullptr) continue;
      ++busy_;
    }
    RunItems(worker, *fn, n);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--busy_ == 0) done_.notify_all();
    }
  }
}

void ThreadPool::ParallelFor(
    std::int64_t n, const std::function<void(std::int64_t, int)>& fn) {
  if (n <= 0) return;
  std::lock_guard<std::mutex> call_lock(call_mu_);
  if (workers_.empty() || n == 1) {
    for (std::int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    n_ = n;
    next_.store(0, std::memory_order_relaxed);
    ++generation_;
  }
  wake_.notify_all();
  RunItems(0, fn, n);
  // Every item has been claimed once the caller's RunItems returns; the
  // workers that claimed some hold busy_ until they have finished them.
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [&] { return busy_ == 0; });
  fn_ = nullptr;
  n_ = 0;
}

}  // namespace vdecode
