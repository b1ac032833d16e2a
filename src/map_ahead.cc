// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/map_ahead.h"

namespace vattn {

using internal::MutexLock;

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
  {
    MutexLock lock(&wake_mu_);
    work_cv_.SignalAll();
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

void MapAheadWorker::Wake() {
  if (sleeping_.load(std::memory_order_seq_cst)) {
    { MutexLock lock(&wake_mu_); }
    work_cv_.Signal();
  }
}

void MapAheadWorker::WaitIdle() {
  NoteWork();
  const std::uint64_t target = generation();
  Wake();
  MutexLock lock(&wake_mu_);
  while (idle_generation_ < target && !stopping()) idle_cv_.Wait(&wake_mu_);
}

void MapAheadWorker::Loop() {
  while (!stopping()) {
    const std::uint64_t generation = this->generation();
    if (client_->RunOnce()) continue;
    const absl::Duration nap = client_->IdleNap();
    MutexLock lock(&wake_mu_);
    idle_generation_ = generation;
    idle_cv_.SignalAll();
    sleeping_.store(true, std::memory_order_seq_cst);
    if (!WorkSince(generation) && !stopping()) {
      work_cv_.WaitWithTimeout(&wake_mu_, nap);
    }
    sleeping_.store(false, std::memory_order_relaxed);
  }
}

}  // namespace vattn
