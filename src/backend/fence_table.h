// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// FenceTable: the live fences of one backend and the pool of events behind
// them, kept so that an event is never re-recorded while a query of the
// fence it belonged to may still read it.
//
// The race it closes: FenceDone(f) looks f's event up, drops the lock and
// queries the event; meanwhile ReleaseFence(f) returns the event to the pool
// and RecordFence re-records it on a busy stream, so the query answers for
// unrelated work. Here a query pins the fence (Acquire ... EndQuery); a
// fence released while pinned keeps its event out of the pool until the
// last pin ends, and the event goes back to the pool only then.
//
// A template over the event type so that the protocol is unit-tested on the
// CPU with plain integers (tests/backend/fence_table_test.cc); the CUDA
// backend instantiates it with CUevent. Thread-safe: every method takes the
// table's mutex; none calls the driver.
#ifndef VATTN_SRC_BACKEND_FENCE_TABLE_H_
#define VATTN_SRC_BACKEND_FENCE_TABLE_H_

#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "src/internal/mutex.h"
#include "vattn/backend.h"

namespace vattn::internal {

template <typename Event>
class FenceTable {
 public:
  // A fresh event from the pool, or nothing when the pool is empty (the
  // caller creates one).
  std::optional<Event> TakeFree() {
    MutexLock lock(&mu_);
    if (free_.empty()) return std::nullopt;
    Event e = free_.back();
    free_.pop_back();
    return e;
  }
  // Returns an event that no fence uses to the pool.
  void GiveFree(Event e) {
    MutexLock lock(&mu_);
    free_.push_back(e);
  }

  // Registers a recorded event as a new fence; returns its id (never
  // kCompletedFence).
  FenceId Add(Event e) {
    MutexLock lock(&mu_);
    const FenceId id = next_++;
    fences_.emplace(id, Entry{e, 0, false});
    return id;
  }

  // Pins the fence for one query and returns its event; every successful
  // Acquire must be followed by one EndQuery(fence). InvalidArgument: the
  // fence is unknown or already released.
  absl::StatusOr<Event> Acquire(FenceId fence) {
    MutexLock lock(&mu_);
    auto it = fences_.find(fence);
    if (it == fences_.end() || it->second.released) {
      return absl::InvalidArgumentError(
          absl::StrFormat("unknown fence %d", fence));
    }
    ++it->second.queries;
    return it->second.event;
  }
  // Ends a query begun by Acquire. When the fence was released meanwhile and
  // this was its last query, its event goes back to the pool now.
  void EndQuery(FenceId fence) {
    MutexLock lock(&mu_);
    auto it = fences_.find(fence);
    if (it == fences_.end()) return;  // Unreachable when used as documented.
    if (--it->second.queries == 0 && it->second.released) {
      free_.push_back(it->second.event);
      fences_.erase(it);
    }
  }

  // Forgets the fence. Its event goes back to the pool at once when no query
  // holds it, else when the last query ends. InvalidArgument: unknown or
  // already released.
  absl::Status Release(FenceId fence) {
    MutexLock lock(&mu_);
    auto it = fences_.find(fence);
    if (it == fences_.end() || it->second.released) {
      return absl::InvalidArgumentError(
          absl::StrFormat("unknown fence %d", fence));
    }
    if (it->second.queries > 0) {
      it->second.released = true;
      return absl::OkStatus();
    }
    free_.push_back(it->second.event);
    fences_.erase(it);
    return absl::OkStatus();
  }

  // Every event the table holds (pooled, or behind a fence), emptying it;
  // for the owner's destructor, once no call can be running.
  std::vector<Event> TakeAll() {
    MutexLock lock(&mu_);
    std::vector<Event> out = std::move(free_);
    free_.clear();
    for (auto& [id, entry] : fences_) out.push_back(entry.event);
    fences_.clear();
    return out;
  }

  // Fences known (released ones still pinned by a query included), and
  // events in the pool: for tests.
  std::size_t fences() const {
    MutexLock lock(&mu_);
    return fences_.size();
  }
  std::size_t pooled() const {
    MutexLock lock(&mu_);
    return free_.size();
  }

 private:
  struct Entry {
    Event event;
    int queries = 0;        // Acquire'd and not yet EndQuery'd.
    bool released = false;  // Released while queried; gone once queries == 0.
  };

  mutable Mutex mu_;
  FenceId next_ ABSL_GUARDED_BY(mu_) = kCompletedFence + 1;
  absl::flat_hash_map<FenceId, Entry> fences_ ABSL_GUARDED_BY(mu_);
  std::vector<Event> free_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vattn::internal

#endif  // VATTN_SRC_BACKEND_FENCE_TABLE_H_
