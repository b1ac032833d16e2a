// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// A fixed pool of std::threads for data-parallel loops. ParallelFor(n, fn)
// runs fn(i) for every i in [0, n) on the workers and the calling thread and
// returns when all have finished. One ParallelFor at a time (calls from
// several threads are serialized); the destructor joins the workers.
#ifndef VATTN_EXAMPLES_DECODE_THREAD_POOL_H_
#define VATTN_EXAMPLES_DECODE_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace vdecode {

class ThreadPool {
 public:
  // threads <= 0: std::thread::hardware_concurrency(). The caller counts as
  // one of them, so threads - 1 workers are started.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // Runs fn(0) ... fn(n - 1); `worker` (0 .. size()-1) names the thread,
  // for per-thread scratch space.
  void ParallelFor(std::int64_t n,
                   const std::function<void(std::int64_t i, int worker)>& fn);

 private:
  void WorkerLoop(int worker);
  void RunItems(int worker,
                const std::function<void(std::int64_t, int)>& fn,
                std::int64_t n);

  std::mutex call_mu_;  // Serializes ParallelFor calls.
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  // Guarded by mu_.
  std::uint64_t generation_ = 0;
  int busy_ = 0;
  bool shutdown_ = false;
  const std::function<void(std::int64_t, int)>* fn_ = nullptr;
  std::int64_t n_ = 0;
  // Next item to take; reset under mu_ before a generation starts.
  std::atomic<std::int64_t> next_{0};
  std::vector<std::thread> workers_;
};

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_THREAD_POOL_H_
