// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The CUDA backend: the driver's virtual-memory management API for one device
// (cuMemAddressReserve / cuMemCreate / cuMemMap + cuMemSetAccess / cuMemUnmap
// / cuMemRelease / cuMemAddressFree), with the driver loaded at run time
// (cuda_driver.h). The contract checks and counters live in Backend; this
// file only talks to the driver.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "src/backend/cuda_driver.h"
#include "vattn/backend.h"
#include "vattn/status.h"

#if defined(VATTN_HAVE_CUDA_HEADERS)
#include "absl/container/flat_hash_map.h"
#include "src/internal/mutex.h"
#endif

namespace vattn {

#if defined(VATTN_HAVE_CUDA_HEADERS)
namespace {

using internal::CudaDriver;
using internal::Mutex;
using internal::MutexLock;

// DESIGN.md: 64 TiB reserved in microseconds on an H200; 128 TiB refused.
constexpr std::size_t kMaxReservationBytes = std::size_t{64} << 40;

// Makes `context` current on the calling thread for one scope and puts the
// thread's previous context back afterwards, so a caller that drives another
// device on the same thread is not disturbed. Costs one cuCtxGetCurrent (a
// thread-local read in the driver) when the context is already current.
class ScopedContext {
 public:
  ScopedContext(const CudaDriver& driver, CUcontext context)
      : driver_(driver) {
    CUcontext current = nullptr;
    if (driver_.cuCtxGetCurrent(&current) != CUDA_SUCCESS) current = nullptr;
    if (current == context) return;
    status_ = VATTN_CU_STATUS(driver_.cuCtxSetCurrent(context));
    if (status_.ok()) {
      previous_ = current;
      restore_ = true;
    }
  }
  ~ScopedContext() {
    if (restore_) (void)driver_.cuCtxSetCurrent(previous_);
  }
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;

  // Not OK when the context could not be made current.
  const absl::Status& status() const { return status_; }

 private:
  const CudaDriver& driver_;
  absl::Status status_;
  CUcontext previous_ = nullptr;
  bool restore_ = false;
};

// One device's VMM backend. Owns a retained reference to the device's primary
// context (released by the destructor, after everything live has been taken
// back) and the CUevents behind its fences; thread-safe: every method may be
// called from any thread, the hooks make the context current per call and
// guard the fence table with a mutex.
class CudaBackend final : public Backend {
 public:
  CudaBackend(BackendCapabilities caps, const CudaDriver* driver,
              CUdevice device, CUcontext context)
      : Backend(std::move(caps)),
        driver_(*driver),
        device_(device),
        context_(context) {}

  ~CudaBackend() override {
    ReleaseAllForShutdown();
    {
      ScopedContext scope(driver_, context_);
      MutexLock lock(&mu_);
      for (CUevent event : free_events_) (void)driver_.cuEventDestroy(event);
      free_events_.clear();
    }
    (void)driver_.cuDevicePrimaryCtxRelease(device_);
  }

 protected:
  absl::StatusOr<DevicePtr> DoReserve(std::size_t bytes) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    CUdeviceptr va = 0;
    VATTN_CU_RETURN_IF_ERROR(driver_.cuMemAddressReserve(
        &va, bytes, granularity(), /*addr=*/0, /*flags=*/0));
    return static_cast<DevicePtr>(va);
  }

  absl::Status DoRelease(DevicePtr va, std::size_t bytes) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    VATTN_CU_RETURN_IF_ERROR(
        driver_.cuMemAddressFree(static_cast<CUdeviceptr>(va), bytes));
    return absl::OkStatus();
  }

  absl::StatusOr<PhysicalHandle> DoCreate(std::size_t bytes) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    const CUmemAllocationProp prop = AllocationProp(device_);
    CUmemGenericAllocationHandle handle = 0;
    VATTN_CU_RETURN_IF_ERROR(
        driver_.cuMemCreate(&handle, bytes, &prop, /*flags=*/0));
    if (handle == 0) {
      // The contract reserves 0 for "no handle"; no driver hands it out, but
      // never let it through.
      return absl::InternalError(
          "cuMemCreate returned the handle 0, which vattn cannot represent");
    }
    return static_cast<PhysicalHandle>(handle);
  }

  absl::Status DoDestroy(PhysicalHandle handle, std::size_t) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    VATTN_CU_RETURN_IF_ERROR(driver_.cuMemRelease(
        static_cast<CUmemGenericAllocationHandle>(handle)));
    return absl::OkStatus();
  }

  absl::Status DoMap(DevicePtr va, PhysicalHandle handle,
                     std::size_t bytes) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    const CUdeviceptr ptr = static_cast<CUdeviceptr>(va);
    VATTN_CU_RETURN_IF_ERROR(driver_.cuMemMap(
        ptr, bytes, /*offset=*/0,
        static_cast<CUmemGenericAllocationHandle>(handle), /*flags=*/0));
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device_;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    absl::Status s =
        VATTN_CU_STATUS(driver_.cuMemSetAccess(ptr, bytes, &access, 1));
    if (!s.ok()) {
      // A failed call changes nothing: take the mapping back.
      (void)driver_.cuMemUnmap(ptr, bytes);
      return s;
    }
    return absl::OkStatus();
  }

  absl::Status DoUnmap(DevicePtr va, std::size_t bytes) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    VATTN_CU_RETURN_IF_ERROR(
        driver_.cuMemUnmap(static_cast<CUdeviceptr>(va), bytes));
    return absl::OkStatus();
  }

  // cuMemsetD8 and cuMemcpyHtoD run on the legacy default stream (so they are
  // ordered after the work of blocking streams, like cudaMemset) and may
  // return before the device has the data; an event on that stream waits for
  // exactly that, where cuCtxSynchronize would also wait for every other
  // stream's unrelated work.
  absl::Status DoZero(DevicePtr va, std::size_t bytes) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    VATTN_CU_RETURN_IF_ERROR(
        driver_.cuMemsetD8(static_cast<CUdeviceptr>(va), 0, bytes));
    return SyncLegacyStreamInContext();
  }

  absl::Status DoCopyToDevice(DevicePtr dst, const void* src,
                              std::size_t bytes) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    VATTN_CU_RETURN_IF_ERROR(
        driver_.cuMemcpyHtoD(static_cast<CUdeviceptr>(dst), src, bytes));
    return SyncLegacyStreamInContext();
  }

  absl::Status DoCopyFromDevice(void* dst, DevicePtr src,
                                std::size_t bytes) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    // Synchronous for pageable host memory: the data is in `dst` on return.
    VATTN_CU_RETURN_IF_ERROR(
        driver_.cuMemcpyDtoH(dst, static_cast<CUdeviceptr>(src), bytes));
    return absl::OkStatus();
  }

  absl::StatusOr<FenceId> DoRecordFence(Stream stream) override {
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    VATTN_ASSIGN_OR_RETURN(CUevent event, TakeEventInContext());
    absl::Status s = VATTN_CU_STATUS(
        driver_.cuEventRecord(event, static_cast<CUstream>(stream.value())));
    if (!s.ok()) {
      GiveBackEventInContext(event);
      return s;
    }
    MutexLock lock(&mu_);
    const FenceId id = next_fence_++;
    fences_[id] = event;
    return id;
  }

  absl::StatusOr<bool> DoFenceDone(FenceId fence) override {
    VATTN_ASSIGN_OR_RETURN(CUevent event, EventOf(fence));
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    const CUresult r = driver_.cuEventQuery(event);
    if (r == CUDA_SUCCESS) return true;
    if (r == CUDA_ERROR_NOT_READY) return false;
    return internal::CudaCallError(r, "cuEventQuery(event)", __FILE__,
                                   __LINE__);
  }

  absl::Status DoWaitFence(FenceId fence) override {
    VATTN_ASSIGN_OR_RETURN(CUevent event, EventOf(fence));
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    VATTN_CU_RETURN_IF_ERROR(driver_.cuEventSynchronize(event));
    return absl::OkStatus();
  }

  absl::Status DoReleaseFence(FenceId fence) override {
    CUevent event = nullptr;
    {
      MutexLock lock(&mu_);
      auto it = fences_.find(fence);
      if (it == fences_.end()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "ReleaseFence: unknown fence %d (backend %s)", fence,
            capabilities().name));
      }
      event = it->second;
      fences_.erase(it);
    }
    ScopedContext scope(driver_, context_);
    VATTN_RETURN_IF_ERROR(scope.status());
    // A recorded event may be re-recorded at once: cuEventRecord replaces
    // the captured work, so a pooled event need not have completed.
    GiveBackEventInContext(event);
    return absl::OkStatus();
  }

 private:
  static CUmemAllocationProp AllocationProp(CUdevice device) {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    return prop;
  }

  absl::StatusOr<CUevent> EventOf(FenceId fence) const {
    MutexLock lock(&mu_);
    auto it = fences_.find(fence);
    if (it == fences_.end()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "unknown fence %d (backend %s)", fence, capabilities().name));
    }
    return it->second;
  }

  // The context must be current (these helpers run inside a ScopedContext).
  absl::StatusOr<CUevent> TakeEventInContext() {
    {
      MutexLock lock(&mu_);
      if (!free_events_.empty()) {
        CUevent event = free_events_.back();
        free_events_.pop_back();
        return event;
      }
    }
    CUevent event = nullptr;
    VATTN_CU_RETURN_IF_ERROR(
        driver_.cuEventCreate(&event, CU_EVENT_DISABLE_TIMING));
    return event;
  }

  // Events are pooled, never destroyed before the backend: a fence costs no
  // cuEventCreate in steady state, and a FenceDone racing a ReleaseFence of
  // the same fence can never query a destroyed event. The pool holds at most
  // as many events as fences were ever live at once.
  void GiveBackEventInContext(CUevent event) {
    MutexLock lock(&mu_);
    free_events_.push_back(event);
  }

  absl::Status SyncLegacyStreamInContext() {
    VATTN_ASSIGN_OR_RETURN(CUevent event, TakeEventInContext());
    absl::Status s = VATTN_CU_STATUS(driver_.cuEventRecord(event, nullptr));
    if (s.ok()) s = VATTN_CU_STATUS(driver_.cuEventSynchronize(event));
    GiveBackEventInContext(event);
    return s;
  }

  // Constant after construction.
  const CudaDriver& driver_;
  const CUdevice device_;
  const CUcontext context_;

  mutable Mutex mu_;
  FenceId next_fence_ ABSL_GUARDED_BY(mu_) = kCompletedFence + 1;
  absl::flat_hash_map<FenceId, CUevent> fences_ ABSL_GUARDED_BY(mu_);
  std::vector<CUevent> free_events_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackendImpl(int ordinal) {
  VATTN_ASSIGN_OR_RETURN(const CudaDriver* driver, internal::LoadCudaDriver());
  const CudaDriver& d = *driver;
  int count = 0;
  VATTN_CU_RETURN_IF_ERROR(d.cuDeviceGetCount(&count));
  if (count == 0) {
    return absl::UnavailableError(
        "the CUDA driver is loaded but reports no device");
  }
  if (ordinal < 0 || ordinal >= count) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA device ordinal %d is out of range: this machine has %d "
        "device(s), ordinals 0..%d",
        ordinal, count, count - 1));
  }
  CUdevice device = 0;
  VATTN_CU_RETURN_IF_ERROR(d.cuDeviceGet(&device, ordinal));

  char name_buffer[256] = {};
  VATTN_CU_RETURN_IF_ERROR(
      d.cuDeviceGetName(name_buffer, sizeof(name_buffer) - 1, device));
  const std::string device_name(name_buffer);

  int vmm = 0;
  VATTN_CU_RETURN_IF_ERROR(d.cuDeviceGetAttribute(
      &vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device));
  if (vmm == 0) {
    return absl::UnavailableError(absl::StrFormat(
        "CUDA device %d (%s) does not support virtual memory management "
        "(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0)",
        ordinal, device_name));
  }

  std::size_t total_memory = 0;
  VATTN_CU_RETURN_IF_ERROR(d.cuDeviceTotalMem(&total_memory, device));

  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  std::size_t granularity = 0;
  VATTN_CU_RETURN_IF_ERROR(d.cuMemGetAllocationGranularity(
      &granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
  if (granularity == 0 || (granularity & (granularity - 1)) != 0) {
    return absl::InternalError(absl::StrFormat(
        "CUDA device %d reports allocation granularity %d, not a power of two",
        ordinal, granularity));
  }

  CUcontext context = nullptr;
  VATTN_CU_RETURN_IF_ERROR(d.cuDevicePrimaryCtxRetain(&context, device));

  BackendCapabilities caps;
  caps.name = absl::StrFormat("cuda:%d (%s)", ordinal, device_name);
  caps.device = ordinal;
  caps.granularity = granularity;
  // Rounded down to the granularity so that the ceiling itself is a legal
  // Reserve size.
  caps.max_reservation_bytes =
      kMaxReservationBytes - kMaxReservationBytes % granularity;
  caps.physical_memory_bytes = total_memory;
  caps.host_accessible = false;
  caps.has_streams = true;
  return std::shared_ptr<Backend>(
      std::make_shared<CudaBackend>(std::move(caps), driver, device, context));
}

}  // namespace

absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackend(int device) {
  return MakeCudaBackendImpl(device);
}

#else  // !VATTN_HAVE_CUDA_HEADERS

absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackend(int) {
  return internal::LoadCudaDriver().status();
}

#endif  // VATTN_HAVE_CUDA_HEADERS

absl::StatusOr<int> CudaDeviceCount() {
  return internal::CudaDriverDeviceCount();
}

}  // namespace vattn
