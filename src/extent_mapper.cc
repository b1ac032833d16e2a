// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/extent_mapper.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"
#include "vattn/status.h"

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
                           extent.handles[static_cast<std::size_t>(mapped)],
                           extent.read_only ? MapAccess::kReadOnly
                                            : MapAccess::kReadWrite);
    if (!status.ok()) break;
    map_calls_.fetch_add(1, std::memory_order_relaxed);
  }
  // Only a fresh extent of this cache's pool is cleared: shared and
  // imported memory holds the data it is mapped for.
  if (status.ok() && zero_new_ && extent.origin == ExtentOrigin::kOwn &&
      !extent.read_only) {
    status = Zero(slot, extent.offset, extent.bytes);
  }
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
                        extent.handles[static_cast<std::size_t>(back)],
                        extent.read_only ? MapAccess::kReadOnly
                                         : MapAccess::kReadWrite);
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

absl::Status ExtentMapper::Copy(int dst, int src, std::int64_t offset,
                                std::int64_t bytes, Stream stream) {
  absl::Status status;
  for (int r = 0; r < geo_->num_regions() && status.ok(); ++r) {
    status = backend_->CopyDeviceToDevice(
        Address(dst, r, offset), Address(src, r, offset),
        static_cast<std::size_t>(bytes), stream);
    if (status.ok()) {
      copy_calls_.fetch_add(1, std::memory_order_relaxed);
      copied_bytes_.fetch_add(bytes, std::memory_order_relaxed);
    }
  }
  return status;
}

absl::Status ExtentMapper::SetAccessRegions(int slot, const Extent& extent,
                                            int regions, MapAccess access) {
  for (int r = 0; r < regions; ++r) {
    VATTN_RETURN_IF_ERROR(
        backend_->SetAccess(Address(slot, r, extent.offset),
                            static_cast<std::size_t>(extent.bytes), access));
    set_access_calls_.fetch_add(1, std::memory_order_relaxed);
  }
  return absl::OkStatus();
}

void ExtentMapper::LetGoLocked(Extent extent) {
  switch (extent.origin) {
    case ExtentOrigin::kOwn:
      break;
    case ExtentOrigin::kShared:
      // The handles stay with whoever else holds them.
      if (!ledger_.DropMapping(*extent.shared)) return;
      break;
    case ExtentOrigin::kExported: {
      // Never pooled: another process may still map the memory. The pool
      // handed these handles out, so it keeps the books (physical bytes).
      std::vector<PhysicalHandle> handles(extent.handles.begin(),
                                          extent.handles.end());
      (void)pool_->DestroyHandedOut(std::move(handles),
                                    static_cast<std::size_t>(extent.bytes));
      return;
    }
    case ExtentOrigin::kImported:
      // Another process's memory, never this pool's: Destroy drops this
      // process's reference. It fails only for a handle still mapped,
      // which a let-go extent is not.
      for (PhysicalHandle h : extent.handles) (void)backend_->Destroy(h);
      return;
  }
  std::vector<PhysicalHandle> handles(extent.handles.begin(),
                                      extent.handles.end());
  pool_->Release(std::move(handles), static_cast<std::size_t>(extent.bytes));
}

void ExtentMapper::DropKeepLocked(SharedExtent& shared) {
  if (!ledger_.DropKeep(shared)) return;
  std::vector<PhysicalHandle> handles(shared.handles.begin(),
                                      shared.handles.end());
  pool_->Release(std::move(handles), static_cast<std::size_t>(shared.bytes));
}

absl::StatusOr<std::shared_ptr<SharedExtent>> ExtentMapper::ShareLocked(
    internal::Mutex& mu, int slot, Slot& s, std::size_t index) {
  Extent& extent = s.MutableExtent(index);
  if (extent.origin == ExtentOrigin::kShared && extent.read_only) {
    return extent.shared;
  }
  if (extent.origin != ExtentOrigin::kOwn &&
      extent.origin != ExtentOrigin::kShared) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "slot %d: the extent at offset %d is exported or imported memory, "
        "which cannot be shared",
        slot, extent.offset));
  }
  // A kOwn extent marked read-only is one whose undo below failed: some of
  // its regions may still be writable, so set them all again.
  if (!extent.read_only || extent.origin == ExtentOrigin::kOwn) {
    // The slot is busy (the caller marked it): its extents stay put while
    // the lock is dropped.
    const Extent copy = extent;
    const int regions = geo_->num_regions();
    mu.Unlock();
    absl::Status status;
    int done = 0;
    for (; done < regions; ++done) {
      status = backend_->SetAccess(Address(slot, done, copy.offset),
                                   static_cast<std::size_t>(copy.bytes),
                                   MapAccess::kReadOnly);
      if (!status.ok()) break;
      set_access_calls_.fetch_add(1, std::memory_order_relaxed);
    }
    bool undone = true;
    if (!status.ok()) {
      // Give back write access where this call took it; tried twice, so
      // that one more fault still leaves the owner writable (a region
      // already writable is unchanged by the second try).
      undone = SetAccessRegions(slot, copy, done, MapAccess::kReadWrite).ok() ||
               SetAccessRegions(slot, copy, done, MapAccess::kReadWrite).ok();
    }
    mu.Lock();
    Extent& now = s.MutableExtent(index);
    if (!status.ok()) {
      // Some region is still read-only: the slot's next request must not
      // be handed it (Slot::holds_shared), and the owner does not write
      // below its prefix anyway.
      if (!undone) now.read_only = true;
      return status;
    }
    now.read_only = true;
  }
  Extent& now = s.MutableExtent(index);
  if (now.origin == ExtentOrigin::kOwn) {
    now.shared = ledger_.Make(now.handles, now.offset, now.bytes);
    now.origin = ExtentOrigin::kShared;
    ledger_.AddMapping(*now.shared);
  }
  return now.shared;
}

absl::Status ExtentMapper::MapExistingLocked(internal::Mutex& mu, int slot,
                                             Slot& s, Extent extent) {
  if (extent.offset != s.mapped_bytes() ||
      extent.handles.size() != static_cast<std::size_t>(geo_->num_regions())) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "slot %d: an existing extent at offset %d (%d handles) must follow "
        "the slot's mapped end %d with one handle per region (%d)",
        slot, extent.offset, extent.handles.size(), s.mapped_bytes(),
        geo_->num_regions()));
  }
  s.set_op(SlotOp::kMapping);
  owner_->SlotOpChanged(slot, s);
  absl::Status status;
  if (!s.quarantine().empty()) {
    status = RetryQuarantineLocked(mu, slot, s).status();
    if (!status.ok()) {
      status = absl::Status(
          status.code(),
          absl::StrFormat("slot %d: an extent in quarantine still blocks its "
                          "range: %s",
                          slot, status.message()));
    }
  }
  std::vector<char> left_mapped;
  if (status.ok()) {
    mu.Unlock();
    status = MapRegions(slot, extent, &left_mapped);
    mu.Lock();
  }
  s.set_op(SlotOp::kNone);
  owner_->SlotOpChanged(slot, s);
  slot_cv_->SignalAll();
  if (extent.origin == ExtentOrigin::kShared &&
      (status.ok() || !left_mapped.empty())) {
    // A mapping (or a quarantined, maybe-mapped one) holds a reference.
    ledger_.AddMapping(*extent.shared);
  }
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

absl::Status ExtentMapper::MapNextLocked(internal::Mutex& mu, int slot,
                                         Slot& s, std::int64_t preferred,
                                         std::int64_t minimum) {
  // A prefix boundary ahead: this extent ends there.
  if (const std::int64_t split = s.split_bytes(); split > s.mapped_bytes()) {
    preferred = std::min(preferred, split - s.mapped_bytes());
    minimum = std::min(minimum, preferred);
  }
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
  const std::int64_t bytes = extent.bytes;
  LetGoLocked(std::move(extent));
  return bytes;
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

absl::Status ExtentMapper::UnmapQuarantined(int slot, QuarantinedExtent& q) {
  absl::Status first;
  for (int r = 0; r < geo_->num_regions(); ++r) {
    if (q.mapped[static_cast<std::size_t>(r)] == 0) continue;
    absl::Status status =
        backend_->Unmap(Address(slot, r, q.extent.offset),
                        static_cast<std::size_t>(q.extent.bytes));
    if (status.ok()) {
      unmap_calls_.fetch_add(1, std::memory_order_relaxed);
      q.mapped[static_cast<std::size_t>(r)] = 0;
    } else if (status.code() == absl::StatusCode::kInvalidArgument) {
      q.mapped[static_cast<std::size_t>(r)] = 0;  // Nothing mapped there.
    } else {
      first.Update(status);
    }
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
    freed += q.extent.bytes;
    LetGoLocked(std::move(q.extent));
  }
  owner_->SlotExtentsChanged(slot, s);
  if (!first.ok()) return first;
  return freed;
}

}  // namespace vattn
