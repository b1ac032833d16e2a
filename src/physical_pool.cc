// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/physical_pool.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"

namespace vattn {

using internal::MutexLock;

PhysicalPool::PhysicalPool(std::shared_ptr<Backend> backend,
                           std::int64_t budget_bytes)
    : backend_(std::move(backend)), budget_bytes_(budget_bytes) {}

PhysicalPool::~PhysicalPool() { (void)DestroyIdle(); }

std::int64_t PhysicalPool::HeadroomLocked() const {
  return budget_bytes_ - counters_.physical_bytes - pending_bytes_;
}

std::int64_t PhysicalPool::Headroom() const {
  MutexLock lock(&mu_);
  return HeadroomLocked();
}

PhysicalPool::Counters PhysicalPool::counters() const {
  MutexLock lock(&mu_);
  return counters_;
}

int PhysicalPool::IdleCount(std::size_t bytes) const {
  MutexLock lock(&mu_);
  auto it = idle_.find(bytes);
  return it == idle_.end() ? 0 : static_cast<int>(it->second.size());
}

absl::StatusOr<bool> PhysicalPool::DestroyOneIdleLocked(std::size_t keep) {
  // Largest idle size other than `keep`: frees the most per driver call.
  std::size_t victim_size = 0;
  for (const auto& [size, handles] : idle_) {
    if (size != keep && !handles.empty() && size > victim_size) {
      victim_size = size;
    }
  }
  if (victim_size == 0) return false;
  std::vector<PhysicalHandle>& list = idle_[victim_size];
  const PhysicalHandle handle = list.back();
  list.pop_back();
  counters_.idle_bytes -= static_cast<std::int64_t>(victim_size);
  absl::Status status;
  {
    mu_.Unlock();
    status = backend_->Destroy(handle);
    mu_.Lock();
  }
  if (!status.ok()) {
    idle_[victim_size].push_back(handle);
    counters_.idle_bytes += static_cast<std::int64_t>(victim_size);
    return status;
  }
  counters_.physical_bytes -= static_cast<std::int64_t>(victim_size);
  ++counters_.destroy_calls;
  return true;
}

absl::Status PhysicalPool::CreateLocked(std::size_t bytes, int count,
                                       std::vector<PhysicalHandle>* created) {
  const std::int64_t need = static_cast<std::int64_t>(bytes) * count;
  pending_bytes_ += need;  // Counted against the budget while unlocked.
  absl::Status status;
  mu_.Unlock();
  for (int i = 0; i < count; ++i) {
    absl::StatusOr<PhysicalHandle> handle = backend_->Create(bytes);
    if (!handle.ok()) {
      status = handle.status();
      break;
    }
    created->push_back(*handle);
  }
  mu_.Lock();
  pending_bytes_ -= need;
  counters_.physical_bytes +=
      static_cast<std::int64_t>(created->size() * bytes);
  counters_.create_calls += static_cast<std::int64_t>(created->size());
  counters_.peak_physical_bytes =
      std::max(counters_.peak_physical_bytes, counters_.physical_bytes);
  return status;
}

absl::StatusOr<std::vector<PhysicalHandle>> PhysicalPool::Acquire(
    std::size_t bytes, int count, bool quiet) {
  std::vector<PhysicalHandle> out;
  out.reserve(static_cast<std::size_t>(count));
  MutexLock lock(&mu_);
  for (;;) {
    // Idle handles of the right size first: no driver call at all.
    if (auto it = idle_.find(bytes); it != idle_.end()) {
      std::vector<PhysicalHandle>& list = it->second;
      while (!list.empty() && static_cast<int>(out.size()) < count) {
        out.push_back(list.back());
        list.pop_back();
        counters_.idle_bytes -= static_cast<std::int64_t>(bytes);
      }
    }
    const int missing = count - static_cast<int>(out.size());
    if (missing == 0) return out;

    const std::int64_t need = static_cast<std::int64_t>(bytes) * missing;
    // Destroy idle handles of other sizes only if that makes enough room:
    // a destroy that still leaves too little would be undone by a create.
    const bool room_after_destroying =
        HeadroomLocked() + counters_.idle_bytes >= need;
    while (room_after_destroying && HeadroomLocked() < need) {
      absl::StatusOr<bool> destroyed = DestroyOneIdleLocked(bytes);
      if (!destroyed.ok()) {
        ReleaseLocked(&out, bytes);
        return destroyed.status();
      }
      if (!*destroyed) break;
    }
    if (HeadroomLocked() < need) {
      ReleaseLocked(&out, bytes);
      if (quiet) {
        // A caller that tries sizes in turn: no message to format.
        static const absl::Status* const kExhausted = new absl::Status(
            absl::ResourceExhaustedError("physical budget exhausted"));
        return *kExhausted;
      }
      return absl::ResourceExhaustedError(absl::StrFormat(
          "physical budget exhausted: %d more handle(s) of %d bytes need %d "
          "bytes, but %d of the %d-byte budget are in use",
          missing, bytes, need, counters_.physical_bytes + pending_bytes_,
          budget_bytes_));
    }

    std::vector<PhysicalHandle> created;
    absl::Status status = CreateLocked(bytes, missing, &created);
    out.insert(out.end(), created.begin(), created.end());
    if (status.ok()) return out;

    // The device refused (out of memory, say). If idle handles of other sizes
    // can go, free one and try again; otherwise keep what was made idle.
    ReleaseLocked(&out, bytes);
    if (status.code() != absl::StatusCode::kResourceExhausted) return status;
    absl::StatusOr<bool> destroyed = DestroyOneIdleLocked(bytes);
    if (!destroyed.ok()) return destroyed.status();
    if (!*destroyed) return status;
  }
}

void PhysicalPool::ReleaseLocked(std::vector<PhysicalHandle>* handles,
                                 std::size_t bytes) {
  if (handles->empty()) return;
  std::vector<PhysicalHandle>& list = idle_[bytes];
  list.insert(list.end(), handles->begin(), handles->end());
  counters_.idle_bytes += static_cast<std::int64_t>(handles->size() * bytes);
  handles->clear();
}

void PhysicalPool::Release(std::vector<PhysicalHandle> handles,
                           std::size_t bytes) {
  MutexLock lock(&mu_);
  ReleaseLocked(&handles, bytes);
}

absl::StatusOr<int> PhysicalPool::Fill(std::size_t bytes, int count) {
  MutexLock lock(&mu_);
  const int idle = static_cast<int>(idle_[bytes].size());
  const std::int64_t affordable =
      std::max<std::int64_t>(0, HeadroomLocked()) /
      static_cast<std::int64_t>(bytes);
  const int missing = static_cast<int>(
      std::min<std::int64_t>(std::max(0, count - idle), affordable));
  if (missing == 0) return 0;
  std::vector<PhysicalHandle> created;
  absl::Status status = CreateLocked(bytes, missing, &created);
  ReleaseLocked(&created, bytes);
  if (!status.ok()) return status;
  return missing;
}

absl::Status PhysicalPool::DestroyIdle() {
  MutexLock lock(&mu_);
  for (;;) {
    absl::StatusOr<bool> destroyed = DestroyOneIdleLocked(0);
    if (!destroyed.ok()) return destroyed.status();
    if (!*destroyed) return absl::OkStatus();
  }
}

}  // namespace vattn
