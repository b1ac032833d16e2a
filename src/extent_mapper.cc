// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/extent_mapper.h"

#include <utility>

#include "absl/strings/str_format.h"

namespace vattn {

absl::Status ExtentMapper::MapRegions(int slot, const Extent& extent) {
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
    }
  }
  return status;
}

absl::Status ExtentMapper::UnmapRegions(int slot, const Extent& extent) {
  const std::size_t bytes = static_cast<std::size_t>(extent.bytes);
  for (int r = 0; r < geo_->num_regions(); ++r) {
    absl::Status status = backend_->Unmap(Address(slot, r, extent.offset), bytes);
    if (status.ok()) {
      unmap_calls_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    // Put back what this call unmapped so the extent stays whole.
    for (int back = 0; back < r; ++back) {
      absl::Status remap =
          backend_->Map(Address(slot, back, extent.offset),
                        extent.handles[static_cast<std::size_t>(back)]);
      if (remap.ok()) {
        map_calls_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      return absl::InternalError(absl::StrFormat(
          "slot %d: unmapping an extent failed (%s) and mapping back "
          "region %d failed too (%s); the cache is inconsistent",
          slot, status.ToString(), back, remap.ToString()));
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
  Extent extent;
  extent.offset = s.mapped_bytes();
  absl::Status status;
  mu.Unlock();
  {
    std::int64_t bytes = 0;
    absl::StatusOr<std::vector<PhysicalHandle>> handles =
        owner_->AcquireHandles(minimum, preferred, &bytes);
    if (!handles.ok()) {
      status = absl::Status(
          handles.status().code(),
          absl::StrFormat("slot %d: cannot back %d more bytes per tensor: %s",
                          slot, minimum, handles.status().message()));
    } else {
      extent.bytes = bytes;
      extent.handles.assign(handles->begin(), handles->end());
      status = MapRegions(slot, extent);
      if (!status.ok()) {
        pool_->Release(std::move(*handles), static_cast<std::size_t>(bytes));
      }
    }
  }
  mu.Lock();
  s.set_op(SlotOp::kNone);
  owner_->SlotOpChanged(slot, s);
  slot_cv_->SignalAll();
  if (!status.ok()) return status;
  s.Append(std::move(extent));
  owner_->SlotExtentsChanged(slot, s);
  return absl::OkStatus();
}

absl::StatusOr<std::int64_t> ExtentMapper::UnmapLastLocked(
    internal::Mutex& mu, int slot, Slot& s) {
  bool was_backing = false;
  Extent extent = s.PopLast(&was_backing);
  owner_->SlotExtentsChanged(slot, s);
  mu.Unlock();
  absl::Status status = UnmapRegions(slot, extent);
  mu.Lock();
  if (!status.ok()) {
    s.Restore(std::move(extent), was_backing);
    owner_->SlotExtentsChanged(slot, s);
    return status;
  }
  std::vector<PhysicalHandle> handles(extent.handles.begin(),
                                      extent.handles.end());
  pool_->Release(std::move(handles), static_cast<std::size_t>(extent.bytes));
  return extent.bytes;
}

absl::Status ExtentMapper::UnmapAllLocked(internal::Mutex& mu, int slot,
                                          Slot& s) {
  while (!s.extents().empty()) {
    absl::StatusOr<std::int64_t> bytes = UnmapLastLocked(mu, slot, s);
    if (!bytes.ok()) return bytes.status();
  }
  return absl::OkStatus();
}

}  // namespace vattn
