// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/extent_mapper.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"

namespace vattn {

absl::Status ExtentMapper::MapRegions(int slot, const Extent& extent,
                                      std::vector<char>* left_mapped) {
  left_mapped->clear();
  const int regions = geo_->num_regions();
  const std::size_t bytes = static_cast<std::size_t>(extent.bytes);
  int mapped = 0;
  absl::Status status;
  for (; mapped < regions; ++mapped) {
    status = backend_->Map(Address(slot, mapped, extent.offset),
                           extent.handles[static_cast<std::size_t>(mapped)]);
    if (!status.ok()) break;
    map_calls_.fetch_add(1, std::memory_order_relaxed);
  }
  if (status.ok() && zero_new_) status = Zero(slot, extent.offset, extent.bytes);
  if (status.ok()) return status;
  for (int r = 0; r < mapped; ++r) {
    if (backend_->Unmap(Address(slot, r, extent.offset), bytes).ok()) {
      unmap_calls_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (left_mapped->empty()) left_mapped->assign(regions, 0);
    (*left_mapped)[static_cast<std::size_t>(r)] = 1;
  }
  return status;
}

absl::Status ExtentMapper::UnmapRegions(int slot, const Extent& extent,
                                        std::vector<char>* left_mapped) {
  left_mapped->clear();
  const int regions = geo_->num_regions();
  const std::size_t bytes = static_cast<std::size_t>(extent.bytes);
  for (int r = 0; r < regions; ++r) {
    absl::Status status = backend_->Unmap(Address(slot, r, extent.offset), bytes);
    if (status.ok()) {
      unmap_calls_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    // Put back what this call unmapped so the extent stays whole. If that
    // fails too, the extent is half mapped: regions before `back` are
    // mapped again, [back, r) are not, r and after never were unmapped.
    for (int back = 0; back < r; ++back) {
      absl::Status remap =
          backend_->Map(Address(slot, back, extent.offset),
                        extent.handles[static_cast<std::size_t>(back)]);
      if (remap.ok()) {
        map_calls_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      left_mapped->assign(regions, 1);
      for (int u = back; u < r; ++u) (*left_mapped)[static_cast<std::size_t>(u)] = 0;
      return absl::Status(
          status.code(),
          absl::StrFormat("slot %d: unmapping an extent failed (%s) and "
                          "mapping back region %d failed too (%s); the "
                          "extent is quarantined",
                          slot, status.message(), back, remap.message()));
    }
    return status;
  }
  return absl::OkStatus();
}

absl::Status ExtentMapper::Zero(int slot, std::int64_t offset,
                                std::int64_t bytes) {
  absl::Status status;
  for (int r = 0; r < geo_->num_regions() && status.ok(); ++r) {
    status = backend_->Zero(Address(slot, r, offset),
                            static_cast<std::size_t>(bytes));
  }
  return status;
}

absl::Status ExtentMapper::MapNextLocked(internal::Mutex& mu, int slot,
                                         Slot& s, std::int64_t preferred,
                                         std::int64_t minimum) {
  s.set_op(SlotOp::kMapping);
  owner_->SlotOpChanged(slot, s);
  absl::Status status;
  if (!s.quarantine().empty()) {
    // A quarantined extent may still hold the range this one needs.
    status = RetryQuarantineLocked(mu, slot, s).status();
    if (!status.ok()) {
      status = absl::Status(
          status.code(),
          absl::StrFormat("slot %d: an extent in quarantine still blocks its "
                          "range: %s",
                          slot, status.message()));
    }
  }
  Extent extent;
  extent.offset = s.mapped_bytes();
  std::vector<char> left_mapped;
  std::vector<PhysicalHandle> handles;
  if (status.ok()) {
    mu.Unlock();
    std::int64_t bytes = 0;
    absl::StatusOr<std::vector<PhysicalHandle>> acquired =
        owner_->AcquireHandles(minimum, preferred, &bytes);
    if (!acquired.ok()) {
      status = absl::Status(
          acquired.status().code(),
          absl::StrFormat("slot %d: cannot back %d more bytes per tensor: %s",
                          slot, minimum, acquired.status().message()));
    } else {
      extent.bytes = bytes;
      extent.handles.assign(acquired->begin(), acquired->end());
      handles = std::move(*acquired);
      status = MapRegions(slot, extent, &left_mapped);
      if (!status.ok() && left_mapped.empty()) {
        pool_->Release(std::move(handles), static_cast<std::size_t>(bytes));
      }
    }
    mu.Lock();
  }
  s.set_op(SlotOp::kNone);
  owner_->SlotOpChanged(slot, s);
  slot_cv_->SignalAll();
  if (!status.ok()) {
    if (!left_mapped.empty()) {
      Quarantine(slot, s, std::move(extent), std::move(left_mapped));
    }
    return status;
  }
  s.Append(std::move(extent));
  owner_->SlotExtentsChanged(slot, s);
  return absl::OkStatus();
}

void ExtentMapper::Quarantine(int slot, Slot& s, Extent extent,
                              std::vector<char> mapped) {
  s.quarantine().push_back({std::move(extent), std::move(mapped)});
  owner_->SlotExtentsChanged(slot, s);
}

absl::StatusOr<std::int64_t> ExtentMapper::UnmapLastLocked(
    internal::Mutex& mu, int slot, Slot& s, OnCleanFailure on_failure) {
  bool was_backing = false;
  Extent extent = s.PopLast(&was_backing);
  owner_->SlotExtentsChanged(slot, s);
  std::vector<char> left_mapped;
  mu.Unlock();
  absl::Status status = UnmapRegions(slot, extent, &left_mapped);
  mu.Lock();
  if (!status.ok()) {
    if (left_mapped.empty() && on_failure == OnCleanFailure::kRestore) {
      s.Restore(std::move(extent), was_backing);
      owner_->SlotExtentsChanged(slot, s);
    } else {
      if (left_mapped.empty()) left_mapped.assign(geo_->num_regions(), 1);
      Quarantine(slot, s, std::move(extent), std::move(left_mapped));
    }
    return status;
  }
  std::vector<PhysicalHandle> handles(extent.handles.begin(),
                                      extent.handles.end());
  pool_->Release(std::move(handles), static_cast<std::size_t>(extent.bytes));
  return extent.bytes;
}

absl::Status ExtentMapper::UnmapAllLocked(internal::Mutex& mu, int slot,
                                          Slot& s, OnCleanFailure on_failure) {
  absl::Status first;
  while (!s.extents().empty()) {
    absl::StatusOr<std::int64_t> bytes =
        UnmapLastLocked(mu, slot, s, on_failure);
    if (bytes.ok()) continue;
    first.Update(bytes.status());
    if (on_failure == OnCleanFailure::kRestore) break;
  }
  return first;
}

absl::StatusOr<std::int64_t> ExtentMapper::RetryQuarantineLocked(
    internal::Mutex& mu, int slot, Slot& s) {
  if (s.quarantine().empty()) return 0;
  std::vector<QuarantinedExtent> entries;
  entries.swap(s.quarantine());
  absl::Status first;
  mu.Unlock();
  for (QuarantinedExtent& q : entries) {
    for (int r = 0; r < geo_->num_regions(); ++r) {
      if (q.mapped[static_cast<std::size_t>(r)] == 0) continue;
      absl::Status status = backend_->Unmap(
          Address(slot, r, q.extent.offset),
          static_cast<std::size_t>(q.extent.bytes));
      if (status.ok()) {
        unmap_calls_.fetch_add(1, std::memory_order_relaxed);
        q.mapped[static_cast<std::size_t>(r)] = 0;
      } else if (status.code() == absl::StatusCode::kInvalidArgument) {
        // Nothing mapped exactly there: the failed call never mapped it.
        q.mapped[static_cast<std::size_t>(r)] = 0;
      } else {
        first.Update(status);
      }
    }
  }
  mu.Lock();
  std::int64_t freed = 0;
  for (QuarantinedExtent& q : entries) {
    if (std::find(q.mapped.begin(), q.mapped.end(), 1) != q.mapped.end()) {
      s.quarantine().push_back(std::move(q));
      continue;
    }
    std::vector<PhysicalHandle> handles(q.extent.handles.begin(),
                                        q.extent.handles.end());
    pool_->Release(std::move(handles), static_cast<std::size_t>(q.extent.bytes));
    freed += q.extent.bytes;
  }
  owner_->SlotExtentsChanged(slot, s);
  if (!first.ok()) return first;
  return freed;
}

}  // namespace vattn
