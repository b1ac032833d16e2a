// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// BackendWrapper: every hook forwards to the inner backend's public call.

#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "vattn/backend_wrapper.h"

#include "vattn/backend.h"

namespace vattn {
namespace {

BackendCapabilities WrappedCaps(const Backend& inner, const std::string& kind) {
  BackendCapabilities caps = inner.capabilities();
  caps.name = absl::StrCat(kind, "(", caps.name, ")");
  return caps;
}

}  // namespace

BackendWrapper::BackendWrapper(std::shared_ptr<Backend> inner,
                               const std::string& kind)
    : Backend(WrappedCaps(*inner, kind)), inner_(std::move(inner)) {}

BackendWrapper::BackendWrapper(std::shared_ptr<Backend> inner,
                               BackendCapabilities caps)
    : Backend(std::move(caps)), inner_(std::move(inner)) {}

// By now the subclass is gone, so the hooks below are the plain forwarding
// ones: shutdown is neither charged nor failed on purpose.
BackendWrapper::~BackendWrapper() { ReleaseAllForShutdown(); }

absl::StatusOr<DevicePtr> BackendWrapper::DoReserve(std::size_t bytes) {
  return inner_->Reserve(bytes);
}
absl::Status BackendWrapper::DoRelease(DevicePtr va, std::size_t bytes) {
  return inner_->Release(va, bytes);
}
absl::StatusOr<PhysicalHandle> BackendWrapper::DoCreate(std::size_t bytes) {
  return inner_->Create(bytes);
}
absl::Status BackendWrapper::DoDestroy(PhysicalHandle handle, std::size_t) {
  return inner_->Destroy(handle);
}
absl::Status BackendWrapper::DoMap(DevicePtr va, PhysicalHandle handle,
                                   std::size_t, MapAccess access) {
  return inner_->Map(va, handle, access);
}
absl::Status BackendWrapper::DoSetAccess(DevicePtr va, std::size_t bytes,
                                         MapAccess access) {
  return inner_->SetAccess(va, bytes, access);
}
absl::Status BackendWrapper::DoCopyDeviceToDevice(DevicePtr dst, DevicePtr src,
                                                  std::size_t bytes,
                                                  Stream stream) {
  return inner_->CopyDeviceToDevice(dst, src, bytes, stream);
}
absl::Status BackendWrapper::DoUnmap(DevicePtr va, std::size_t bytes) {
  return inner_->Unmap(va, bytes);
}
absl::StatusOr<int> BackendWrapper::DoExportHandle(PhysicalHandle handle,
                                                   std::size_t) {
  return inner_->ExportHandle(handle);
}
absl::StatusOr<PhysicalHandle> BackendWrapper::DoImportHandle(
    int fd, std::size_t bytes) {
  return inner_->ImportHandle(fd, bytes);
}
absl::Status BackendWrapper::DoZero(DevicePtr va, std::size_t bytes) {
  return inner_->Zero(va, bytes);
}
absl::Status BackendWrapper::DoCopyToDevice(DevicePtr dst, const void* src,
                                            std::size_t bytes) {
  return inner_->CopyToDevice(dst, src, bytes);
}
absl::Status BackendWrapper::DoCopyFromDevice(void* dst, DevicePtr src,
                                              std::size_t bytes) {
  return inner_->CopyFromDevice(dst, src, bytes);
}
absl::StatusOr<FenceId> BackendWrapper::DoRecordFence(Stream stream) {
  return inner_->RecordFence(stream);
}
absl::StatusOr<bool> BackendWrapper::DoFenceDone(FenceId fence) {
  return inner_->FenceDone(fence);
}
absl::Status BackendWrapper::DoWaitFence(FenceId fence) {
  return inner_->WaitFence(fence);
}
absl::Status BackendWrapper::DoReleaseFence(FenceId fence) {
  return inner_->ReleaseFence(fence);
}

}  // namespace vattn
