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
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "src/backend/cuda_driver.h"
#include "vattn/backend.h"
#include "vattn/status.h"

#if defined(VATTN_HAVE_CUDA_HEADERS)
#include <fcntl.h>

#include <algorithm>
#include <optional>
#include <thread>

#include "src/backend/fence_table.h"
#include "src/internal/mutex.h"
#endif

namespace vattn {

#if defined(VATTN_HAVE_CUDA_HEADERS)
namespace {

using internal::CudaDriver;
using internal::FenceTable;
using internal::Mutex;
using internal::MutexLock;

// DESIGN.md: 64 TiB reserved in microseconds on an H200; 128 TiB refused.
constexpr std::size_t kMaxReservationBytes = std::size_t{64} << 40;

// The one allocation property a backend uses: pinned device memory of
// `device`, with no export handle, or (exportable) a POSIX file descriptor
// as the requested handle type and, where the device supports it, GPUDirect
// RDMA. Both the granularity query and cuMemCreate take it, so the
// granularity is the one of the handles actually created.
CUmemAllocationProp AllocationProp(CUdevice device, bool exportable = false,
                                   bool rdma = false) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = exportable
                                  ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
                                  : CU_MEM_HANDLE_TYPE_NONE;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.allocFlags.gpuDirectRDMACapable = rdma ? 1 : 0;
  return prop;
}

// Makes `context` current on the calling thread for one scope and puts the
// thread's previous context back afterwards, so a caller that drives another
// device on the same thread is not disturbed. Costs one cuCtxGetCurrent (a
// thread-local read in the driver) when the context is already current.
//
// It also switches the thread's stream-capture mode to
// CU_STREAM_CAPTURE_MODE_RELAXED for the scope (and back): while any thread
// captures a graph in the default global mode, every other thread is
// "prohibited from potentially unsafe API calls", and a prohibited call
// fails and invalidates that capture. vattn's calls never touch a capturing
// stream (RecordFence refuses one; data calls use the private stream; its
// events are never recorded in a capture), so they may run during a capture
// and must not break it (PyTorch relaxes its NCCL watchdog thread the same
// way).
class ScopedContext {
 public:
  ScopedContext(const CudaDriver& driver, CUcontext context)
      : driver_(driver) {
    capture_mode_ = CU_STREAM_CAPTURE_MODE_RELAXED;
    relaxed_ = driver_.cuThreadExchangeStreamCaptureMode(&capture_mode_) ==
               CUDA_SUCCESS;
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
    if (relaxed_) (void)driver_.cuThreadExchangeStreamCaptureMode(&capture_mode_);
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
  CUstreamCaptureMode capture_mode_;  // The thread's mode, while relaxed.
  bool relaxed_ = false;
};

// Runs fn() with `context` current and returns its result (an absl::Status
// or StatusOr), or the error of making the context current.
template <typename Fn>
auto InContext(const CudaDriver& driver, CUcontext context, Fn&& fn)
    -> decltype(fn()) {
  ScopedContext scope(driver, context);
  if (!scope.status().ok()) return scope.status();
  return fn();
}

// One device's VMM backend. Owns a retained reference to the device's primary
// context, one private non-blocking stream for its data calls, and the
// CUevents behind its fences and data calls (all released by the destructor,
// after everything live has been taken back); thread-safe: every method may
// be called from any thread, the hooks make the context current per call.
//
// Streams and waits:
//  * Zero and the copies run on the private stream, created
//    CU_STREAM_NON_BLOCKING: they neither wait for the legacy default
//    stream's work (nor PyTorch's, nor any blocking stream's) nor make later
//    work wait for them, and they never touch a stream another thread may be
//    capturing into a graph. The ordering that matters (no zeroing or
//    unmapping under GPU work still reading) is the caller's fences.
//    A data call polls its completion (cuEventQuery, yielding between
//    queries) on an event without CU_EVENT_BLOCKING_SYNC: the work is one
//    memset or copy of at most a few extents, microseconds, and these calls
//    run on Grow's and the map-ahead thread's path, where a sleep and
//    wake-up would cost more than the work.
//  * Fence events are created with CU_EVENT_BLOCKING_SYNC: WaitFence waits
//    for the caller's GPU work, which can last a whole step or more, so the
//    waiting thread sleeps in cuEventSynchronize instead of spinning a core.
//    FenceDone is a cuEventQuery and never blocks.
class CudaBackend final : public Backend {
 public:
  CudaBackend(BackendCapabilities caps, const CudaDriver* driver,
              CUdevice device, CUcontext context, CUstream stream,
              const CUmemAllocationProp& prop)
      : Backend(std::move(caps)),
        driver_(*driver),
        device_(device),
        context_(context),
        stream_(stream),
        prop_(prop) {}

  ~CudaBackend() override {
    ReleaseAllForShutdown();
    (void)InContext(driver_, context_, [&] {
      (void)driver_.cuStreamSynchronize(stream_);
      (void)driver_.cuStreamDestroy(stream_);
      for (CUevent event : fences_.TakeAll()) {
        (void)driver_.cuEventDestroy(event);
      }
      MutexLock lock(&mu_);
      for (CUevent event : data_events_) (void)driver_.cuEventDestroy(event);
      data_events_.clear();
      return absl::OkStatus();
    });
    (void)driver_.cuDevicePrimaryCtxRelease(device_);
  }

 protected:
  absl::StatusOr<DevicePtr> DoReserve(std::size_t bytes) override {
    return InContext(driver_, context_, [&]() -> absl::StatusOr<DevicePtr> {
      CUdeviceptr va = 0;
      VATTN_CU_RETURN_IF_ERROR(driver_.cuMemAddressReserve(
          &va, bytes, granularity(), /*addr=*/0, /*flags=*/0));
      return static_cast<DevicePtr>(va);
    });
  }

  absl::Status DoRelease(DevicePtr va, std::size_t bytes) override {
    return InContext(driver_, context_, [&] {
      return VATTN_CU_STATUS(
          driver_.cuMemAddressFree(static_cast<CUdeviceptr>(va), bytes));
    });
  }

  absl::StatusOr<PhysicalHandle> DoCreate(std::size_t bytes) override {
    return InContext(
        driver_, context_, [&]() -> absl::StatusOr<PhysicalHandle> {
          CUmemGenericAllocationHandle handle = 0;
          VATTN_CU_RETURN_IF_ERROR(
              driver_.cuMemCreate(&handle, bytes, &prop_, /*flags=*/0));
          if (handle == 0) {
            // The contract reserves 0 for "no handle"; no driver hands it
            // out, but never let it through.
            return absl::InternalError(
                "cuMemCreate returned the handle 0, which vattn cannot "
                "represent");
          }
          return static_cast<PhysicalHandle>(handle);
        });
  }

  absl::Status DoDestroy(PhysicalHandle handle, std::size_t) override {
    return InContext(driver_, context_, [&] {
      return VATTN_CU_STATUS(driver_.cuMemRelease(
          static_cast<CUmemGenericAllocationHandle>(handle)));
    });
  }

  absl::Status DoMap(DevicePtr va, PhysicalHandle handle, std::size_t bytes,
                     MapAccess access) override {
    return InContext(driver_, context_, [&]() -> absl::Status {
      const CUdeviceptr ptr = static_cast<CUdeviceptr>(va);
      VATTN_CU_RETURN_IF_ERROR(driver_.cuMemMap(
          ptr, bytes, /*offset=*/0,
          static_cast<CUmemGenericAllocationHandle>(handle), /*flags=*/0));
      const CUmemAccessDesc desc = AccessDesc(access);
      absl::Status s =
          VATTN_CU_STATUS(driver_.cuMemSetAccess(ptr, bytes, &desc, 1));
      // A failed call changes nothing: take the mapping back.
      if (!s.ok()) (void)driver_.cuMemUnmap(ptr, bytes);
      return s;
    });
  }

  absl::Status DoSetAccess(DevicePtr va, std::size_t bytes,
                           MapAccess access) override {
    // One call on the live mapping; the driver either applies the new
    // flags or fails and leaves the old ones.
    return InContext(driver_, context_, [&] {
      const CUmemAccessDesc desc = AccessDesc(access);
      return VATTN_CU_STATUS(driver_.cuMemSetAccess(
          static_cast<CUdeviceptr>(va), bytes, &desc, 1));
    });
  }

  absl::Status DoCopyDeviceToDevice(DevicePtr dst, DevicePtr src,
                                    std::size_t bytes, Stream stream) override {
    // Enqueued on the caller's stream, after its queued work (the data being
    // shared was written by it); the caller fences it (backend.h).
    return InContext(driver_, context_, [&]() -> absl::Status {
      const CUstream s = static_cast<CUstream>(stream.value());
      // A copy enqueued on a capturing stream would be a graph node, not a
      // copy: refuse it as RecordFence does.
      if (absl::Status c = CheckNotCapturingInContext(s); !c.ok()) {
        return absl::Status(
            c.code(), absl::StrCat("CopyDeviceToDevice (on the stream of its "
                                   "fence): ",
                                   c.message()));
      }
      return VATTN_CU_STATUS(driver_.cuMemcpyDtoDAsync(
          static_cast<CUdeviceptr>(dst), static_cast<CUdeviceptr>(src), bytes,
          s));
    });
  }

  absl::StatusOr<int> DoExportHandle(PhysicalHandle handle,
                                     std::size_t) override {
    return InContext(driver_, context_, [&]() -> absl::StatusOr<int> {
      int fd = -1;
      VATTN_CU_RETURN_IF_ERROR(driver_.cuMemExportToShareableHandle(
          &fd, static_cast<CUmemGenericAllocationHandle>(handle),
          CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, /*flags=*/0));
      if (fd < 0) {
        return absl::InternalError(absl::StrFormat(
            "cuMemExportToShareableHandle returned the descriptor %d for "
            "handle %d",
            fd, handle));
      }
      return fd;
    });
  }

  // The driver keeps its own reference to the allocation: the caller's fd
  // stays the caller's (NVIDIA's memMapIPCDrv sample closes it after the
  // import). cuMemMap checks the size against the allocation's (a wrong
  // `bytes` fails the first Map, not here: the driver has no size query).
  absl::StatusOr<PhysicalHandle> DoImportHandle(int fd,
                                                std::size_t) override {
    if (::fcntl(fd, F_GETFD) < 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "ImportHandle: file descriptor %d is not open (backend %s)", fd,
          capabilities().name));
    }
    return InContext(
        driver_, context_, [&]() -> absl::StatusOr<PhysicalHandle> {
          CUmemGenericAllocationHandle handle = 0;
          const CUresult r = driver_.cuMemImportFromShareableHandle(
              &handle,
              reinterpret_cast<void*>(static_cast<std::uintptr_t>(fd)),
              CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
          if (r == CUDA_ERROR_INVALID_VALUE || r == CUDA_ERROR_INVALID_HANDLE ||
              r == CUDA_ERROR_NOT_SUPPORTED) {
            return absl::InvalidArgumentError(absl::StrFormat(
                "ImportHandle: file descriptor %d is not a CUDA allocation "
                "exported as a POSIX file descriptor (%s) (backend %s)",
                fd, internal::CudaErrorName(r), capabilities().name));
          }
          if (r != CUDA_SUCCESS) {
            return internal::CudaCallError(
                r, "cuMemImportFromShareableHandle(fd)", __FILE__, __LINE__);
          }
          if (handle == 0) {
            return absl::InternalError(
                "cuMemImportFromShareableHandle returned the handle 0, which "
                "vattn cannot represent");
          }
          // Only this device's memory maps here with this device's access.
          CUmemAllocationProp prop{};
          absl::Status s = VATTN_CU_STATUS(
              driver_.cuMemGetAllocationPropertiesFromHandle(&prop, handle));
          if (s.ok() && (prop.location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
                         prop.location.id != device_)) {
            s = absl::InvalidArgumentError(absl::StrFormat(
                "ImportHandle: file descriptor %d holds memory of location "
                "type %d id %d, not of this backend's device %d (backend %s)",
                fd, static_cast<int>(prop.location.type), prop.location.id,
                static_cast<int>(device_), capabilities().name));
          }
          if (!s.ok()) {
            (void)driver_.cuMemRelease(handle);
            return s;
          }
          return static_cast<PhysicalHandle>(handle);
        });
  }

  absl::Status DoUnmap(DevicePtr va, std::size_t bytes) override {
    return InContext(driver_, context_, [&] {
      return VATTN_CU_STATUS(
          driver_.cuMemUnmap(static_cast<CUdeviceptr>(va), bytes));
    });
  }

  absl::Status DoZero(DevicePtr va, std::size_t bytes) override {
    return InContext(driver_, context_, [&]() -> absl::Status {
      VATTN_CU_RETURN_IF_ERROR(driver_.cuMemsetD8Async(
          static_cast<CUdeviceptr>(va), 0, bytes, stream_));
      return FinishPrivateStreamInContext();
    });
  }

  absl::Status DoCopyToDevice(DevicePtr dst, const void* src,
                              std::size_t bytes) override {
    // From pageable memory the driver stages `src` before it returns; the
    // event then waits for the DMA to the device.
    return InContext(driver_, context_, [&]() -> absl::Status {
      VATTN_CU_RETURN_IF_ERROR(driver_.cuMemcpyHtoDAsync(
          static_cast<CUdeviceptr>(dst), src, bytes, stream_));
      return FinishPrivateStreamInContext();
    });
  }

  absl::Status DoCopyFromDevice(void* dst, DevicePtr src,
                                std::size_t bytes) override {
    // To pageable memory the copy has completed when the call returns; the
    // event wait covers pinned destinations too.
    return InContext(driver_, context_, [&]() -> absl::Status {
      VATTN_CU_RETURN_IF_ERROR(driver_.cuMemcpyDtoHAsync(
          dst, static_cast<CUdeviceptr>(src), bytes, stream_));
      return FinishPrivateStreamInContext();
    });
  }

  absl::StatusOr<FenceId> DoRecordFence(Stream stream) override {
    return InContext(driver_, context_, [&]() -> absl::StatusOr<FenceId> {
      const CUstream s = static_cast<CUstream>(stream.value());
      VATTN_RETURN_IF_ERROR(CheckNotCapturingInContext(s));
      VATTN_ASSIGN_OR_RETURN(CUevent event, TakeFenceEventInContext());
      absl::Status recorded = VATTN_CU_STATUS(driver_.cuEventRecord(event, s));
      if (!recorded.ok()) {
        fences_.GiveFree(event);
        return recorded;
      }
      return fences_.Add(event);
    });
  }

  absl::StatusOr<bool> DoFenceDone(FenceId fence) override {
    VATTN_ASSIGN_OR_RETURN(CUevent event, AcquireFence("FenceDone", fence));
    absl::StatusOr<bool> done =
        InContext(driver_, context_, [&]() -> absl::StatusOr<bool> {
          const CUresult r = driver_.cuEventQuery(event);
          if (r == CUDA_SUCCESS) return true;
          if (r == CUDA_ERROR_NOT_READY) return false;
          return internal::CudaCallError(r, "cuEventQuery(fence event)",
                                         __FILE__, __LINE__);
        });
    fences_.EndQuery(fence);
    return done;
  }

  absl::Status DoWaitFence(FenceId fence) override {
    VATTN_ASSIGN_OR_RETURN(CUevent event, AcquireFence("WaitFence", fence));
    // Sleeps: fence events use CU_EVENT_BLOCKING_SYNC.
    absl::Status s = InContext(driver_, context_, [&] {
      return VATTN_CU_STATUS(driver_.cuEventSynchronize(event));
    });
    fences_.EndQuery(fence);
    return s;
  }

  absl::Status DoReleaseFence(FenceId fence) override {
    // No driver call: a pooled event is re-recorded by the next fence, which
    // replaces the work it captured (only once no query still reads it).
    absl::Status s = fences_.Release(fence);
    if (!s.ok()) return Named("ReleaseFence", s);
    return absl::OkStatus();
  }

 private:
  CUmemAccessDesc AccessDesc(MapAccess access) const {
    CUmemAccessDesc desc{};
    desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    desc.location.id = device_;
    desc.flags = access == MapAccess::kReadOnly
                     ? CU_MEM_ACCESS_FLAGS_PROT_READ
                     : CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    return desc;
  }

  absl::Status Named(const char* what, const absl::Status& s) const {
    return absl::Status(s.code(), absl::StrFormat("%s: %s (backend %s)", what,
                                                  s.message(),
                                                  capabilities().name));
  }

  absl::StatusOr<CUevent> AcquireFence(const char* what, FenceId fence) {
    absl::StatusOr<CUevent> event = fences_.Acquire(fence);
    if (!event.ok()) return Named(what, event.status());
    return event;
  }

  // FailedPrecondition when `stream` is capturing into a CUDA graph: an
  // event recorded there would become a graph node and tell nothing about
  // when the GPU work ends. The legacy stream reports
  // CUDA_ERROR_STREAM_CAPTURE_IMPLICIT while a blocking stream captures: it
  // cannot be used then either.
  absl::Status CheckNotCapturingInContext(CUstream stream) {
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
    const CUresult r = driver_.cuStreamIsCapturing(stream, &capture);
    if (r == CUDA_ERROR_STREAM_CAPTURE_IMPLICIT ||
        (r == CUDA_SUCCESS && capture != CU_STREAM_CAPTURE_STATUS_NONE)) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "RecordFence: stream %p is being captured into a CUDA graph "
          "(capture status %d%s); record the fence after the capture ends, on "
          "the stream the graph is launched on (backend %s)",
          static_cast<void*>(stream), static_cast<int>(capture),
          r == CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
              ? ", the legacy stream while a blocking stream captures"
              : "",
          capabilities().name));
    }
    if (r != CUDA_SUCCESS) {
      return internal::CudaCallError(r, "cuStreamIsCapturing(stream)",
                                     __FILE__, __LINE__);
    }
    return absl::OkStatus();
  }

  // The context must be current (these helpers run inside InContext).
  absl::StatusOr<CUevent> TakeFenceEventInContext() {
    if (std::optional<CUevent> pooled = fences_.TakeFree()) return *pooled;
    CUevent event = nullptr;
    VATTN_CU_RETURN_IF_ERROR(driver_.cuEventCreate(
        &event, CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING));
    return event;
  }

  // Waits until the work queued so far on the private stream has finished,
  // polling (see the class comment for why it does not sleep).
  absl::Status FinishPrivateStreamInContext() {
    CUevent event = nullptr;
    {
      MutexLock lock(&mu_);
      if (!data_events_.empty()) {
        event = data_events_.back();
        data_events_.pop_back();
      }
    }
    if (event == nullptr) {
      VATTN_CU_RETURN_IF_ERROR(
          driver_.cuEventCreate(&event, CU_EVENT_DISABLE_TIMING));
    }
    absl::Status s = VATTN_CU_STATUS(driver_.cuEventRecord(event, stream_));
    for (int polls = 0; s.ok(); ++polls) {
      const CUresult r = driver_.cuEventQuery(event);
      if (r == CUDA_SUCCESS) break;
      if (r != CUDA_ERROR_NOT_READY) {
        s = internal::CudaCallError(r, "cuEventQuery(private stream event)",
                                    __FILE__, __LINE__);
        break;
      }
      // A few queries back to back (a small memset is done in microseconds),
      // then give the core away between queries.
      if (polls >= 64) std::this_thread::yield();
    }
    // Only this thread used the event, and it has completed (or the context
    // is broken): reusable at once.
    MutexLock lock(&mu_);
    data_events_.push_back(event);
    return s;
  }

  // Constant after construction.
  const CudaDriver& driver_;
  const CUdevice device_;
  const CUcontext context_;
  const CUstream stream_;  // Private, non-blocking: Zero and the copies.
  const CUmemAllocationProp prop_;  // What cuMemCreate makes.

  FenceTable<CUevent> fences_;  // Thread-safe on its own.
  Mutex mu_;
  std::vector<CUevent> data_events_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackendImpl(
    int ordinal, const CudaBackendOptions& options) {
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

  int rdma = 0;
  if (options.exportable_handles) {
    int posix_fd = 0;
    VATTN_CU_RETURN_IF_ERROR(d.cuDeviceGetAttribute(
        &posix_fd, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
        device));
    if (posix_fd == 0) {
      return absl::UnavailableError(absl::StrFormat(
          "CUDA device %d (%s) cannot export memory as POSIX file "
          "descriptors (CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_"
          "SUPPORTED is 0); CudaBackendOptions::exportable_handles needs it",
          ordinal, device_name));
    }
    VATTN_CU_RETURN_IF_ERROR(d.cuDeviceGetAttribute(
        &rdma, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED,
        device));
  }
  const CUmemAllocationProp prop =
      AllocationProp(device, options.exportable_handles, rdma != 0);
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
  std::size_t free_memory = 0;
  CUstream stream = nullptr;
  absl::Status s = InContext(d, context, [&]() -> absl::Status {
    std::size_t total_now = 0;
    VATTN_CU_RETURN_IF_ERROR(d.cuMemGetInfo(&free_memory, &total_now));
    VATTN_CU_RETURN_IF_ERROR(
        d.cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    return absl::OkStatus();
  });
  if (!s.ok()) {
    (void)d.cuDevicePrimaryCtxRelease(device);
    return s;
  }

  BackendCapabilities caps;
  caps.name = absl::StrFormat("cuda:%d (%s)", ordinal, device_name);
  caps.device = ordinal;
  caps.granularity = granularity;
  // Rounded down to the granularity so that the ceiling itself is a legal
  // Reserve size.
  caps.max_reservation_bytes =
      kMaxReservationBytes - kMaxReservationBytes % granularity;
  caps.physical_memory_bytes = total_memory;
  caps.default_budget_bytes =
      internal::CudaDefaultBudget(free_memory, total_memory, granularity);
  caps.host_accessible = false;
  caps.has_streams = true;
  caps.exportable = options.exportable_handles;
  return std::shared_ptr<Backend>(std::make_shared<CudaBackend>(
      std::move(caps), driver, device, context, stream, prop));
}

}  // namespace

absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackend(int device) {
  return MakeCudaBackendImpl(device, CudaBackendOptions{});
}

absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackend(
    int device, const CudaBackendOptions& options) {
  return MakeCudaBackendImpl(device, options);
}

#else  // !VATTN_HAVE_CUDA_HEADERS

absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackend(int) {
  return internal::LoadCudaDriver().status();
}

absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackend(
    int, const CudaBackendOptions&) {
  return internal::LoadCudaDriver().status();
}

#endif  // VATTN_HAVE_CUDA_HEADERS

absl::StatusOr<int> CudaDeviceCount() {
  return internal::CudaDriverDeviceCount();
}

}  // namespace vattn
