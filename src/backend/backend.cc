// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The contract checks and counters shared by every backend. Each state change
// is done in three steps so that slow driver calls run without the lock:
// check and mark the objects busy under the lock, call the hook unlocked,
// then commit (or undo the mark) under the lock.

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "src/internal/mutex.h"
#include "vattn/backend.h"
#include "vattn/status.h"

namespace vattn {

using internal::MutexLock;

struct Backend::State {
  struct Reservation {
    std::size_t bytes = 0;
    int mappings = 0;
    bool busy = false;  // A hook on it is running; others must not touch it.
  };
  struct Handle {
    std::size_t bytes = 0;
    int mappings = 0;
    bool busy = false;
    bool imported = false;  // ImportHandle made it (not physical_bytes).
    int exports = 0;        // ExportHandle calls running on it.
  };
  struct Mapping {
    std::size_t bytes = 0;
    PhysicalHandle handle = kInvalidHandle;
    DevicePtr reservation = 0;
    bool busy = false;
    int pins = 0;  // Data calls (Zero, copies) running on it.
    MapAccess access = MapAccess::kReadWrite;
  };

  // Finds the reservation holding [va, va + bytes), or nullptr.
  std::pair<const DevicePtr, Reservation>* FindReservationLocked(
      DevicePtr va, std::size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  bool OverlapsMappingLocked(DevicePtr va, std::size_t bytes) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Nothing when every byte of the range is mapped (by mappings that are not
  // being made or taken down), else the first address that is not.
  std::optional<DevicePtr> FirstUnmappedLocked(DevicePtr va,
                                               std::size_t bytes) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // The start of the first read-only mapping overlapping the range, if any.
  std::optional<DevicePtr> FirstReadOnlyLocked(DevicePtr va,
                                               std::size_t bytes) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Adds `delta` to the pin count of every mapping overlapping the range.
  void PinLocked(DevicePtr va, std::size_t bytes, int delta)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  mutable internal::Mutex mu;
  absl::btree_map<DevicePtr, Reservation> reservations ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<PhysicalHandle, Handle> handles ABSL_GUARDED_BY(mu);
  absl::btree_map<DevicePtr, Mapping> mappings ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<FenceId, int> fences ABSL_GUARDED_BY(mu);
  BackendCounters counters ABSL_GUARDED_BY(mu);
};

const char* BackendOpName(BackendOp op) {
  switch (op) {
    case BackendOp::kReserve:
      return "Reserve";
    case BackendOp::kRelease:
      return "Release";
    case BackendOp::kCreate:
      return "Create";
    case BackendOp::kDestroy:
      return "Destroy";
    case BackendOp::kMap:
      return "Map";
    case BackendOp::kUnmap:
      return "Unmap";
    case BackendOp::kSetAccess:
      return "SetAccess";
  }
  return "Unknown";
}

Backend::Backend(BackendCapabilities caps)
    : caps_(std::move(caps)), state_(std::make_unique<State>()) {}

Backend::~Backend() = default;

BackendCounters Backend::counters() const {
  MutexLock lock(&state_->mu);
  return state_->counters;
}

void Backend::CountFailure() {
  MutexLock lock(&state_->mu);
  ++state_->counters.failed_calls;
}

absl::Status Backend::CheckSize(const char* what, std::size_t bytes) const {
  if (bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: size must be non-zero (backend %s)", what,
                        caps_.name));
  }
  if (bytes % caps_.granularity != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: size %d is not a multiple of the granularity %d (backend %s)",
        what, bytes, caps_.granularity, caps_.name));
  }
  return absl::OkStatus();
}

std::pair<const DevicePtr, Backend::State::Reservation>*
Backend::State::FindReservationLocked(DevicePtr va, std::size_t bytes) {
  auto it = reservations.upper_bound(va);
  if (it == reservations.begin()) return nullptr;
  --it;
  const DevicePtr start = it->first;
  const std::size_t size = it->second.bytes;
  if (va < start || va - start > size || bytes > size - (va - start)) {
    return nullptr;
  }
  return &*it;
}

bool Backend::State::OverlapsMappingLocked(DevicePtr va, std::size_t bytes) const {
  // The mapping starting at or after va must start at or after va + bytes;
  // the one starting before va must end at or before va.
  auto it = mappings.lower_bound(va);
  if (it != mappings.end() && it->first < va + bytes) return true;
  if (it != mappings.begin()) {
    --it;
    if (it->first + it->second.bytes > va) return true;
  }
  return false;
}

std::optional<DevicePtr> Backend::State::FirstUnmappedLocked(
    DevicePtr va, std::size_t bytes) const {
  DevicePtr cursor = va;
  const DevicePtr end = va + bytes;
  auto it = mappings.upper_bound(cursor);
  if (it != mappings.begin()) --it;
  while (cursor < end) {
    if (it == mappings.end() || it->first > cursor ||
        it->first + it->second.bytes <= cursor || it->second.busy) {
      return cursor;
    }
    cursor = it->first + it->second.bytes;
    ++it;
  }
  return std::nullopt;
}

std::optional<DevicePtr> Backend::State::FirstReadOnlyLocked(
    DevicePtr va, std::size_t bytes) const {
  auto it = mappings.upper_bound(va);
  if (it != mappings.begin()) --it;
  for (; it != mappings.end() && it->first < va + bytes; ++it) {
    if (it->first + it->second.bytes > va &&
        it->second.access == MapAccess::kReadOnly) {
      return it->first;
    }
  }
  return std::nullopt;
}

void Backend::State::PinLocked(DevicePtr va, std::size_t bytes, int delta) {
  auto it = mappings.upper_bound(va);
  if (it != mappings.begin()) --it;
  for (; it != mappings.end() && it->first < va + bytes; ++it) {
    if (it->first + it->second.bytes > va) it->second.pins += delta;
  }
}

absl::Status Backend::PinMapped(const char* what, DevicePtr va,
                                std::size_t bytes, bool for_write) {
  // Every range check below compares against va + bytes: refuse a range
  // whose end does not fit in the address space before computing it.
  if (bytes > std::numeric_limits<DevicePtr>::max() - va) {
    CountFailure();
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: range 0x%x + %d runs past the end of the address space (backend "
        "%s)",
        what, va, bytes, caps_.name));
  }
  std::optional<DevicePtr> hole;
  {
    MutexLock lock(&state_->mu);
    hole = state_->FirstUnmappedLocked(va, bytes);
    if (!hole.has_value() && for_write) {
      if (std::optional<DevicePtr> ro = state_->FirstReadOnlyLocked(va, bytes)) {
        ++state_->counters.failed_calls;
        return absl::PermissionDeniedError(absl::StrFormat(
            "%s: range 0x%x + %d touches the read-only mapping at 0x%x (shared "
            "memory no request may write) (backend %s)",
            what, va, bytes, *ro, caps_.name));
      }
    }
    if (!hole.has_value()) {
      state_->PinLocked(va, bytes, +1);
      return absl::OkStatus();
    }
    ++state_->counters.failed_calls;
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s: address 0x%x (of range 0x%x + %d) is not mapped (backend %s)",
      what, *hole, va, bytes, caps_.name));
}

void Backend::Unpin(DevicePtr va, std::size_t bytes) {
  MutexLock lock(&state_->mu);
  state_->PinLocked(va, bytes, -1);
}

absl::StatusOr<DevicePtr> Backend::Reserve(std::size_t bytes) {
  if (absl::Status s = CheckSize("Reserve", bytes); !s.ok()) {
    CountFailure();
    return s;
  }
  if (bytes > caps_.max_reservation_bytes) {
    CountFailure();
    return absl::InvalidArgumentError(absl::StrFormat(
        "Reserve: %d bytes exceeds the backend's max_reservation_bytes %d "
        "(backend %s)",
        bytes, caps_.max_reservation_bytes, caps_.name));
  }
  absl::StatusOr<DevicePtr> va = DoReserve(bytes);
  MutexLock lock(&state_->mu);
  if (!va.ok()) {
    ++state_->counters.failed_calls;
    return va.status();
  }
  state_->reservations[*va] = State::Reservation{bytes, 0, false};
  ++state_->counters.reservations;
  state_->counters.reserved_bytes += static_cast<std::int64_t>(bytes);
  ++state_->counters.calls[static_cast<int>(BackendOp::kReserve)];
  return va;
}

absl::Status Backend::Release(DevicePtr va, std::size_t bytes) {
  {
    MutexLock lock(&state_->mu);
    auto it = state_->reservations.find(va);
    if (it == state_->reservations.end() || it->second.bytes != bytes) {
      ++state_->counters.failed_calls;
      return absl::InvalidArgumentError(absl::StrFormat(
          "Release: 0x%x + %d is not a reservation (backend %s)", va, bytes,
          caps_.name));
    }
    if (it->second.mappings > 0 || it->second.busy) {
      ++state_->counters.failed_calls;
      return absl::FailedPreconditionError(absl::StrFormat(
          "Release: reservation 0x%x still holds %d mapping(s) (backend %s)",
          va, it->second.mappings, caps_.name));
    }
    it->second.busy = true;
  }
  absl::Status s = DoRelease(va, bytes);
  MutexLock lock(&state_->mu);
  if (!s.ok()) {
    state_->reservations[va].busy = false;
    ++state_->counters.failed_calls;
    return s;
  }
  state_->reservations.erase(va);
  --state_->counters.reservations;
  state_->counters.reserved_bytes -= static_cast<std::int64_t>(bytes);
  ++state_->counters.calls[static_cast<int>(BackendOp::kRelease)];
  return absl::OkStatus();
}

absl::StatusOr<PhysicalHandle> Backend::Create(std::size_t bytes) {
  if (absl::Status s = CheckSize("Create", bytes); !s.ok()) {
    CountFailure();
    return s;
  }
  absl::StatusOr<PhysicalHandle> handle = DoCreate(bytes);
  MutexLock lock(&state_->mu);
  if (!handle.ok()) {
    ++state_->counters.failed_calls;
    return handle.status();
  }
  state_->handles[*handle] = State::Handle{bytes, 0, false};
  ++state_->counters.handles;
  state_->counters.physical_bytes += static_cast<std::int64_t>(bytes);
  ++state_->counters.calls[static_cast<int>(BackendOp::kCreate)];
  return handle;
}

absl::StatusOr<std::size_t> Backend::HandleSize(PhysicalHandle handle) const {
  MutexLock lock(&state_->mu);
  auto it = state_->handles.find(handle);
  if (it == state_->handles.end()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "HandleSize: unknown handle %d (backend %s)", handle, caps_.name));
  }
  return it->second.bytes;
}

absl::Status Backend::Destroy(PhysicalHandle handle) {
  std::size_t bytes = 0;
  bool imported = false;
  {
    MutexLock lock(&state_->mu);
    auto it = state_->handles.find(handle);
    if (it == state_->handles.end()) {
      ++state_->counters.failed_calls;
      return absl::InvalidArgumentError(absl::StrFormat(
          "Destroy: unknown handle %d (backend %s)", handle, caps_.name));
    }
    if (it->second.mappings > 0 || it->second.busy ||
        it->second.exports > 0) {
      ++state_->counters.failed_calls;
      return absl::FailedPreconditionError(absl::StrFormat(
          "Destroy: handle %d is still mapped at %d address(es) or being "
          "exported (backend %s)",
          handle, it->second.mappings, caps_.name));
    }
    it->second.busy = true;
    bytes = it->second.bytes;
    imported = it->second.imported;
  }
  absl::Status s = DoDestroy(handle, bytes);
  MutexLock lock(&state_->mu);
  if (!s.ok()) {
    state_->handles[handle].busy = false;
    ++state_->counters.failed_calls;
    return s;
  }
  state_->handles.erase(handle);
  --state_->counters.handles;
  (imported ? state_->counters.imported_bytes
            : state_->counters.physical_bytes) -=
      static_cast<std::int64_t>(bytes);
  ++state_->counters.calls[static_cast<int>(BackendOp::kDestroy)];
  return absl::OkStatus();
}

absl::StatusOr<int> Backend::ExportHandle(PhysicalHandle handle) {
  std::size_t bytes = 0;
  {
    MutexLock lock(&state_->mu);
    if (!caps_.exportable) {
      ++state_->counters.failed_calls;
      return absl::UnimplementedError(absl::StrFormat(
          "ExportHandle: backend %s was not made with exportable handles "
          "(HostBackendOptions / CudaBackendOptions::exportable_handles)",
          caps_.name));
    }
    auto it = state_->handles.find(handle);
    if (it == state_->handles.end()) {
      ++state_->counters.failed_calls;
      return absl::InvalidArgumentError(absl::StrFormat(
          "ExportHandle: unknown handle %d (backend %s)", handle, caps_.name));
    }
    if (it->second.busy) {
      ++state_->counters.failed_calls;
      return absl::FailedPreconditionError(absl::StrFormat(
          "ExportHandle: handle %d is being destroyed (backend %s)", handle,
          caps_.name));
    }
    ++it->second.exports;  // Destroy waits out the hook (fails meanwhile).
    bytes = it->second.bytes;
  }
  absl::StatusOr<int> fd = DoExportHandle(handle, bytes);
  MutexLock lock(&state_->mu);
  --state_->handles[handle].exports;
  if (!fd.ok()) ++state_->counters.failed_calls;
  return fd;
}

absl::StatusOr<PhysicalHandle> Backend::ImportHandle(int fd,
                                                     std::size_t bytes) {
  if (absl::Status s = CheckSize("ImportHandle", bytes); !s.ok()) {
    CountFailure();
    return s;
  }
  if (fd < 0) {
    CountFailure();
    return absl::InvalidArgumentError(absl::StrFormat(
        "ImportHandle: file descriptor %d is negative (backend %s)", fd,
        caps_.name));
  }
  absl::StatusOr<PhysicalHandle> handle = DoImportHandle(fd, bytes);
  bool duplicate = false;
  {
    MutexLock lock(&state_->mu);
    if (!handle.ok()) {
      ++state_->counters.failed_calls;
      return handle.status();
    }
    duplicate = state_->handles.contains(*handle);
    if (!duplicate) {
      State::Handle info;
      info.bytes = bytes;
      info.imported = true;
      state_->handles[*handle] = info;
      ++state_->counters.handles;
      state_->counters.imported_bytes += static_cast<std::int64_t>(bytes);
      return handle;
    }
    ++state_->counters.failed_calls;
  }
  // The driver may answer a second import of one allocation with the handle
  // it gave the first (CUDA does not promise otherwise): drop the reference
  // this import took and leave the live handle's books as they are.
  (void)DoDestroy(*handle, bytes);
  return absl::AlreadyExistsError(absl::StrFormat(
      "ImportHandle: file descriptor %d is memory already imported as handle "
      "%d (backend %s)",
      fd, *handle, caps_.name));
}

absl::Status Backend::Map(DevicePtr va, PhysicalHandle handle,
                          MapAccess access) {
  std::size_t bytes = 0;
  DevicePtr reservation = 0;
  {
    MutexLock lock(&state_->mu);
    auto h = state_->handles.find(handle);
    if (h == state_->handles.end()) {
      ++state_->counters.failed_calls;
      return absl::InvalidArgumentError(absl::StrFormat(
          "Map: unknown handle %d (backend %s)", handle, caps_.name));
    }
    if (h->second.busy) {
      ++state_->counters.failed_calls;
      return absl::FailedPreconditionError(absl::StrFormat(
          "Map: handle %d is being destroyed (backend %s)", handle,
          caps_.name));
    }
    bytes = h->second.bytes;
    if (va % caps_.granularity != 0) {
      ++state_->counters.failed_calls;
      return absl::InvalidArgumentError(absl::StrFormat(
          "Map: address 0x%x is not aligned to the granularity %d (backend "
          "%s)",
          va, caps_.granularity, caps_.name));
    }
    auto* r = state_->FindReservationLocked(va, bytes);
    if (r == nullptr || r->second.busy) {
      ++state_->counters.failed_calls;
      return absl::InvalidArgumentError(absl::StrFormat(
          "Map: range 0x%x + %d is not inside one reservation (backend %s)",
          va, bytes, caps_.name));
    }
    if (state_->OverlapsMappingLocked(va, bytes)) {
      ++state_->counters.failed_calls;
      return absl::FailedPreconditionError(absl::StrFormat(
          "Map: range 0x%x + %d overlaps a live mapping (backend %s)", va,
          bytes, caps_.name));
    }
    reservation = r->first;
    // Claim the range and pin the handle and reservation while the hook runs.
    state_->mappings[va] =
        State::Mapping{bytes, handle, reservation, true, 0, access};
    ++h->second.mappings;
    ++r->second.mappings;
  }
  absl::Status s = DoMap(va, handle, bytes, access);
  MutexLock lock(&state_->mu);
  if (!s.ok()) {
    state_->mappings.erase(va);
    --state_->handles[handle].mappings;
    --state_->reservations[reservation].mappings;
    ++state_->counters.failed_calls;
    return s;
  }
  state_->mappings[va].busy = false;
  ++state_->counters.mappings;
  state_->counters.mapped_bytes += static_cast<std::int64_t>(bytes);
  ++state_->counters.calls[static_cast<int>(BackendOp::kMap)];
  return absl::OkStatus();
}

absl::Status Backend::Unmap(DevicePtr va, std::size_t bytes) {
  State::Mapping mapping;
  {
    MutexLock lock(&state_->mu);
    auto it = state_->mappings.find(va);
    if (it == state_->mappings.end() || it->second.bytes != bytes) {
      ++state_->counters.failed_calls;
      return absl::InvalidArgumentError(absl::StrFormat(
          "Unmap: 0x%x + %d is not exactly one mapping (backend %s)", va,
          bytes, caps_.name));
    }
    if (it->second.busy || it->second.pins > 0) {
      ++state_->counters.failed_calls;
      return absl::FailedPreconditionError(absl::StrFormat(
          "Unmap: mapping 0x%x is busy in another call (backend %s)", va,
          caps_.name));
    }
    it->second.busy = true;
    mapping = it->second;
  }
  absl::Status s = DoUnmap(va, bytes);
  MutexLock lock(&state_->mu);
  if (!s.ok()) {
    state_->mappings[va].busy = false;
    ++state_->counters.failed_calls;
    return s;
  }
  state_->mappings.erase(va);
  --state_->handles[mapping.handle].mappings;
  --state_->reservations[mapping.reservation].mappings;
  --state_->counters.mappings;
  state_->counters.mapped_bytes -= static_cast<std::int64_t>(bytes);
  ++state_->counters.calls[static_cast<int>(BackendOp::kUnmap)];
  return absl::OkStatus();
}

absl::Status Backend::SetAccess(DevicePtr va, std::size_t bytes,
                                MapAccess access) {
  {
    MutexLock lock(&state_->mu);
    auto it = state_->mappings.find(va);
    if (it == state_->mappings.end() || it->second.bytes != bytes) {
      ++state_->counters.failed_calls;
      return absl::InvalidArgumentError(absl::StrFormat(
          "SetAccess: 0x%x + %d is not exactly one mapping (backend %s)", va,
          bytes, caps_.name));
    }
    if (it->second.busy || it->second.pins > 0) {
      ++state_->counters.failed_calls;
      return absl::FailedPreconditionError(absl::StrFormat(
          "SetAccess: mapping 0x%x is busy in another call (backend %s)", va,
          caps_.name));
    }
    it->second.busy = true;
  }
  absl::Status s = DoSetAccess(va, bytes, access);
  MutexLock lock(&state_->mu);
  State::Mapping& m = state_->mappings[va];
  m.busy = false;
  if (!s.ok()) {
    ++state_->counters.failed_calls;
    return s;
  }
  m.access = access;
  ++state_->counters.calls[static_cast<int>(BackendOp::kSetAccess)];
  return absl::OkStatus();
}

absl::StatusOr<MapAccess> Backend::AccessOf(DevicePtr va) const {
  MutexLock lock(&state_->mu);
  auto it = state_->mappings.find(va);
  if (it == state_->mappings.end()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "AccessOf: no mapping starts at 0x%x (backend %s)", va, caps_.name));
  }
  return it->second.access;
}

absl::Status Backend::Zero(DevicePtr va, std::size_t bytes) {
  VATTN_RETURN_IF_ERROR(PinMapped("Zero", va, bytes, /*for_write=*/true));
  absl::Status status = DoZero(va, bytes);
  Unpin(va, bytes);
  if (!status.ok()) CountFailure();
  return status;
}

absl::Status Backend::CopyToDevice(DevicePtr dst, const void* src,
                                   std::size_t bytes) {
  VATTN_RETURN_IF_ERROR(
      PinMapped("CopyToDevice", dst, bytes, /*for_write=*/true));
  absl::Status status = DoCopyToDevice(dst, src, bytes);
  Unpin(dst, bytes);
  if (!status.ok()) CountFailure();
  return status;
}

absl::Status Backend::CopyFromDevice(void* dst, DevicePtr src,
                                     std::size_t bytes) {
  VATTN_RETURN_IF_ERROR(PinMapped("CopyFromDevice", src, bytes));
  absl::Status status = DoCopyFromDevice(dst, src, bytes);
  Unpin(src, bytes);
  if (!status.ok()) CountFailure();
  return status;
}

absl::Status Backend::CopyDeviceToDevice(DevicePtr dst, DevicePtr src,
                                         std::size_t bytes, Stream stream) {
  if ((dst >= src ? dst - src : src - dst) < bytes) {
    CountFailure();
    return absl::InvalidArgumentError(absl::StrFormat(
        "CopyDeviceToDevice: ranges 0x%x and 0x%x of %d bytes overlap "
        "(backend %s)",
        dst, src, bytes, caps_.name));
  }
  VATTN_RETURN_IF_ERROR(PinMapped("CopyDeviceToDevice", src, bytes));
  if (absl::Status s = PinMapped("CopyDeviceToDevice", dst, bytes,
                                 /*for_write=*/true);
      !s.ok()) {
    Unpin(src, bytes);
    return s;
  }
  absl::Status status = DoCopyDeviceToDevice(dst, src, bytes, stream);
  Unpin(dst, bytes);
  Unpin(src, bytes);
  if (!status.ok()) CountFailure();
  return status;
}

absl::Status Backend::DoSetAccess(DevicePtr va, std::size_t bytes,
                                  MapAccess) {
  return absl::UnimplementedError(absl::StrFormat(
      "SetAccess: backend %s cannot change a mapping's access in place "
      "(0x%x + %d)",
      caps_.name, va, bytes));
}

absl::Status Backend::DoCopyDeviceToDevice(DevicePtr dst, DevicePtr src,
                                           std::size_t bytes, Stream) {
  // Staged through host memory in pieces, synchronously.
  constexpr std::size_t kChunk = std::size_t{4} << 20;
  std::vector<unsigned char> buffer(std::min(bytes, kChunk));
  for (std::size_t done = 0; done < bytes;) {
    const std::size_t n = std::min(kChunk, bytes - done);
    VATTN_RETURN_IF_ERROR(DoCopyFromDevice(buffer.data(), src + done, n));
    VATTN_RETURN_IF_ERROR(DoCopyToDevice(dst + done, buffer.data(), n));
    done += n;
  }
  return absl::OkStatus();
}

absl::StatusOr<FenceId> Backend::RecordFence(Stream stream) {
  absl::StatusOr<FenceId> fence = DoRecordFence(stream);
  if (!fence.ok() || *fence == kCompletedFence) return fence;
  MutexLock lock(&state_->mu);
  state_->fences[*fence] = 0;
  ++state_->counters.fences;
  return fence;
}

absl::StatusOr<bool> Backend::FenceDone(FenceId fence) {
  if (fence == kCompletedFence) return true;
  {
    MutexLock lock(&state_->mu);
    if (!state_->fences.contains(fence)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "FenceDone: unknown fence %d (backend %s)", fence, caps_.name));
    }
  }
  return DoFenceDone(fence);
}

absl::Status Backend::WaitFence(FenceId fence) {
  if (fence == kCompletedFence) return absl::OkStatus();
  {
    MutexLock lock(&state_->mu);
    if (!state_->fences.contains(fence)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "WaitFence: unknown fence %d (backend %s)", fence, caps_.name));
    }
  }
  return DoWaitFence(fence);
}

absl::Status Backend::ReleaseFence(FenceId fence) {
  if (fence == kCompletedFence) return absl::OkStatus();
  {
    MutexLock lock(&state_->mu);
    if (state_->fences.erase(fence) == 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "ReleaseFence: unknown fence %d (backend %s)", fence, caps_.name));
    }
    --state_->counters.fences;
  }
  return DoReleaseFence(fence);
}

absl::StatusOr<int> Backend::DoExportHandle(PhysicalHandle, std::size_t) {
  return absl::UnimplementedError(absl::StrFormat(
      "ExportHandle: backend %s cannot export handles", caps_.name));
}
absl::StatusOr<PhysicalHandle> Backend::DoImportHandle(int, std::size_t) {
  return absl::UnimplementedError(absl::StrFormat(
      "ImportHandle: backend %s cannot import handles", caps_.name));
}

absl::StatusOr<FenceId> Backend::DoRecordFence(Stream) {
  return kCompletedFence;
}
absl::StatusOr<bool> Backend::DoFenceDone(FenceId) { return true; }
absl::Status Backend::DoWaitFence(FenceId) { return absl::OkStatus(); }
absl::Status Backend::DoReleaseFence(FenceId) { return absl::OkStatus(); }

void Backend::ReleaseAllForShutdown() {
  // Snapshot under the lock, then go through the public calls so counters
  // stay exact. Errors are ignored: there is nobody left to report them to,
  // and the process is taking back the memory either way.
  std::vector<std::pair<DevicePtr, std::size_t>> maps;
  std::vector<PhysicalHandle> handles;
  std::vector<std::pair<DevicePtr, std::size_t>> ranges;
  std::vector<FenceId> fences;
  {
    MutexLock lock(&state_->mu);
    for (const auto& [va, m] : state_->mappings) maps.emplace_back(va, m.bytes);
    for (const auto& [h, info] : state_->handles) handles.push_back(h);
    for (const auto& [va, r] : state_->reservations) ranges.emplace_back(va, r.bytes);
    for (const auto& [f, unused] : state_->fences) fences.push_back(f);
  }
  // GPU work fenced by a caller that leaked its fences may still read the
  // memory: let it finish before anything is unmapped.
  for (FenceId f : fences) {
    (void)WaitFence(f);
    (void)ReleaseFence(f);
  }
  for (const auto& [va, bytes] : maps) (void)Unmap(va, bytes);
  for (PhysicalHandle h : handles) (void)Destroy(h);
  for (const auto& [va, bytes] : ranges) (void)Release(va, bytes);
}

}  // namespace vattn
