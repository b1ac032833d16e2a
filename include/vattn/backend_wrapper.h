// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// BackendWrapper, the base of backends that forward to another backend (the
// latency model, fault injection, tests' instrumented backends). Kept out of
// backend.h, as leveldb keeps EnvWrapper and its test Envs out of env.h.
#ifndef VATTN_BACKEND_WRAPPER_H_
#define VATTN_BACKEND_WRAPPER_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vattn/backend.h"
#include "vattn/export.h"

namespace vattn {

// BackendWrapper: forwards every hook to an inner backend (leveldb's
// EnvWrapper). Wrappers override only the hooks they change and call
// BackendWrapper's to forward. Owns a reference to the inner backend; its
// destructor takes back what is still live through the inner backend with
// the plain forwarding hooks (a wrapper's own behaviour, such as charging
// costs or injecting faults, does not apply at shutdown). Thread-safe like
// every backend.
class VATTN_EXPORT BackendWrapper : public Backend {
 public:
  ~BackendWrapper() override;
  const std::shared_ptr<Backend>& inner() const { return inner_; }

 protected:
  // `kind` names the wrapper: capabilities().name is "kind(inner's name)";
  // the other capabilities are the inner backend's. `inner` is not null.
  BackendWrapper(std::shared_ptr<Backend> inner, const std::string& kind);
  // The same, with capabilities the wrapper states itself (a test backend
  // modelling a device, say); `caps.name` is used as given.
  BackendWrapper(std::shared_ptr<Backend> inner, BackendCapabilities caps);

  absl::StatusOr<DevicePtr> DoReserve(std::size_t bytes) override;
  absl::Status DoRelease(DevicePtr va, std::size_t bytes) override;
  absl::StatusOr<PhysicalHandle> DoCreate(std::size_t bytes) override;
  absl::Status DoDestroy(PhysicalHandle handle, std::size_t bytes) override;
  absl::Status DoMap(DevicePtr va, PhysicalHandle handle, std::size_t bytes,
                     MapAccess access) override;
  absl::Status DoSetAccess(DevicePtr va, std::size_t bytes,
                           MapAccess access) override;
  absl::Status DoCopyDeviceToDevice(DevicePtr dst, DevicePtr src,
                                    std::size_t bytes, Stream stream) override;
  absl::Status DoUnmap(DevicePtr va, std::size_t bytes) override;
  absl::StatusOr<int> DoExportHandle(PhysicalHandle handle,
                                     std::size_t bytes) override;
  absl::StatusOr<PhysicalHandle> DoImportHandle(int fd,
                                                std::size_t bytes) override;
  absl::Status DoZero(DevicePtr va, std::size_t bytes) override;
  absl::Status DoCopyToDevice(DevicePtr dst, const void* src,
                              std::size_t bytes) override;
  absl::Status DoCopyFromDevice(void* dst, DevicePtr src,
                                std::size_t bytes) override;
  absl::StatusOr<FenceId> DoRecordFence(Stream stream) override;
  absl::StatusOr<bool> DoFenceDone(FenceId fence) override;
  absl::Status DoWaitFence(FenceId fence) override;
  absl::Status DoReleaseFence(FenceId fence) override;

 private:
  const std::shared_ptr<Backend> inner_;
};

}  // namespace vattn

#endif  // VATTN_BACKEND_WRAPPER_H_
