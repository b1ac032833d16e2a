// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The backend layer: the only code in vattn that talks to a driver or the OS.
//
// Contract (every implementation and wrapper obeys it; the checks live once,
// in the non-virtual public methods of Backend, so they cannot drift):
//
//  * Granularity. capabilities().granularity is a power of two (2 MiB on
//    current NVIDIA GPUs and, by default, on the Host backend). Every size
//    passed to Reserve, Create and Unmap is a non-zero multiple of it; every
//    address passed to Map and Unmap is aligned to it. Anything else is
//    InvalidArgument, and nothing changes.
//  * Virtual ranges. Reserve(bytes) returns a granularity-aligned range that
//    holds no memory. Release(va, bytes) takes back exactly one whole
//    reservation (InvalidArgument otherwise) and only when no mapping lies
//    inside it (FailedPrecondition otherwise).
//  * Physical handles. Create(bytes) makes one physical allocation of exactly
//    `bytes` (cuMemCreate on CUDA, a range of a memfd on Host). A handle is
//    mapped whole or not at all: there is no partial map and no split. It can
//    be mapped at several addresses at once (aliasing: a write through one is
//    seen through the others). Destroy fails with FailedPrecondition while any
//    mapping of the handle is live; the handle stays usable.
//  * Mappings. Map(va, handle) maps the whole handle at [va, va + size) with
//    read-write access for the backend's device (cuMemMap + cuMemSetAccess
//    on CUDA: one call from the caller's view); Map(va, handle,
//    MapAccess::kReadOnly) maps it read-only (PROT_READ on Host,
//    CU_MEM_ACCESS_FLAGS_PROT_READ on CUDA: a write through it faults
//    instead of changing the memory). SetAccess(va, bytes, access) changes
//    the access of exactly one live mapping without unmapping it. The range
//    must lie inside one reservation (InvalidArgument) and overlap no live
//    mapping (FailedPrecondition). Unmap(va, bytes) must cover exactly what
//    one Map covered (InvalidArgument otherwise); it leaves the range
//    reserved. Zero, CopyToDevice and CopyDeviceToDevice refuse a
//    destination range that touches a read-only mapping (PermissionDenied,
//    naming the address).
//  * Failure. A call that returns an error changes nothing: counters, live
//    objects and memory are exactly as before the call. Out of memory (device
//    memory, or the Host backend's physical limit) is ResourceExhausted;
//    a missing driver or device is Unavailable; a call the driver refuses
//    during a CUDA graph capture is FailedPrecondition; any other driver or
//    OS error is Internal, the driver's "invalid value" included (the
//    arguments were checked here first, so it is vattn's bug or a device
//    property, not the caller's). Driver errors name the call, file:line
//    and the driver's error name.
//  * Threads. Every method may be called from any thread at any time. Calls
//    on disjoint objects run concurrently as far as the driver allows (the
//    CUDA driver serializes mapping internally); calls racing on the same
//    object are resolved in some order, and a call that finds an object busy
//    in another thread's call fails with FailedPrecondition.
//  * Lifetime. Destroying a Backend takes back whatever is still live: it
//    waits for and releases live fences, then unmaps mappings, destroys
//    handles and releases reservations, so a leak in a caller can never
//    outlive the backend. Callers that want to prove they leaked nothing
//    compare counters() before and after.
//
// The wrappers that compose over a backend live in their own headers:
// vattn/backend_wrapper.h (BackendWrapper), vattn/latency_model.h and
// vattn/fault_injection.h.
#ifndef VATTN_BACKEND_H_
#define VATTN_BACKEND_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vattn/export.h"
#include "vattn/stream.h"

namespace vattn {

// An address in the backend's virtual address space (a CUdeviceptr on CUDA,
// a host pointer on Host). Only host_accessible backends' addresses may be
// dereferenced on the CPU.
using DevicePtr = std::uintptr_t;

// An opaque physical allocation. 0 is never a valid handle.
using PhysicalHandle = std::uint64_t;
inline constexpr PhysicalHandle kInvalidHandle = 0;

// An opaque marker of "the GPU work queued so far on a stream". 0 is the
// fence that has always completed.
using FenceId = std::uint64_t;
inline constexpr FenceId kCompletedFence = 0;

// How a mapping may be accessed by the backend's device (and, on Host, the
// CPU). Read-only mappings hold memory other requests share (prefix
// sharing): a write through one faults (SIGSEGV on Host) instead of
// corrupting another request's keys and values.
enum class MapAccess : std::uint8_t { kReadWrite, kReadOnly };


// The calls that change memory state, for counters and fault injection.
enum class BackendOp : int {
  kReserve = 0,
  kRelease,
  kCreate,
  kDestroy,
  kMap,
  kUnmap,
  kSetAccess,  // Appended: the indices above are stable.
};
inline constexpr int kNumBackendOps = 7;
VATTN_EXPORT const char* BackendOpName(BackendOp op);

struct BackendCapabilities {
  std::string name;              // "cuda:0", "host", "latency_model(host)", ...
  int device = -1;               // CUDA device ordinal; -1 for the host.
  std::size_t granularity = 0;   // Bytes; see the contract above.
  std::size_t max_reservation_bytes = 0;  // Largest single Reserve accepted.
  std::size_t physical_memory_bytes = 0;  // Memory Create can hand out in all
                                          // (device total, Host limit).
  // The budget a KVCache takes when KVCacheOptions.memory_budget_bytes is 0;
  // 0 here means physical_memory_bytes. The CUDA backend sets it to the
  // device's free memory when it was made, less a margin (MakeCudaBackend);
  // the Host backend leaves it 0; wrappers take their inner backend's.
  std::size_t default_budget_bytes = 0;
  bool host_accessible = false;  // Addresses may be dereferenced on the CPU.
  bool has_streams = false;      // Fences wait for real asynchronous work.
  // ExportHandle works: handles can be handed to another process as a file
  // descriptor (HostBackendOptions / CudaBackendOptions::exportable_handles).
  bool exportable = false;
};

// Live objects and call counts of one backend. Live figures count what exists
// now; `calls` counts calls that succeeded since the backend was made.
struct BackendCounters {
  std::int64_t reservations = 0;
  std::int64_t reserved_bytes = 0;
  std::int64_t handles = 0;
  std::int64_t physical_bytes = 0;
  // Live handles ImportHandle made: counted in `handles`, not in
  // physical_bytes (another process created the memory).
  std::int64_t imported_bytes = 0;
  std::int64_t mappings = 0;
  std::int64_t mapped_bytes = 0;
  std::int64_t fences = 0;
  std::array<std::int64_t, kNumBackendOps> calls{};
  std::int64_t failed_calls = 0;  // Calls that returned an error.

  std::int64_t calls_of(BackendOp op) const {
    return calls[static_cast<int>(op)];
  }
  // True when nothing is live (no reservation, handle, mapping or fence).
  bool Empty() const {
    return reservations == 0 && handles == 0 && mappings == 0 && fences == 0;
  }
};

// A physical-memory backend. Owns every reservation, handle, mapping and
// fence made through it until they are given back or the backend is
// destroyed; thread-safe (see the contract at the top of this file).
// Implementations override the protected Do* hooks; the public methods check
// arguments and object state, keep the counters, and call the hooks.
class VATTN_EXPORT Backend {
 public:
  virtual ~Backend();
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  const BackendCapabilities& capabilities() const { return caps_; }
  std::size_t granularity() const { return caps_.granularity; }
  BackendCounters counters() const;

  // Reserves `bytes` of virtual address space, aligned to the granularity.
  // InvalidArgument: bytes zero, unaligned or above max_reservation_bytes.
  // ResourceExhausted: the driver or OS refused the address space.
  absl::StatusOr<DevicePtr> Reserve(std::size_t bytes);
  // Gives back a whole reservation. InvalidArgument: (va, bytes) is not one
  // reservation. FailedPrecondition: a mapping lies inside it.
  absl::Status Release(DevicePtr va, std::size_t bytes);

  // Creates a physical allocation of `bytes`. InvalidArgument: bytes zero or
  // unaligned. ResourceExhausted: out of device or budgeted memory.
  absl::StatusOr<PhysicalHandle> Create(std::size_t bytes);
  // Destroys a handle. InvalidArgument: unknown handle. FailedPrecondition:
  // the handle is still mapped somewhere.
  absl::Status Destroy(PhysicalHandle handle);
  // Size of a live handle; InvalidArgument for an unknown one.
  absl::StatusOr<std::size_t> HandleSize(PhysicalHandle handle) const;

  // ---- Handing handles to another process (capabilities().exportable).
  // A new file descriptor for `handle` (close-on-exec), owned by the caller,
  // which passes it to another process (SCM_RIGHTS) and closes it. The
  // memory lives while any process holds a descriptor, handle or mapping of
  // it (the kernel's file references on Host, the driver's on CUDA), so
  // Destroy here does not take it from a peer that imported it.
  // Unimplemented: the backend was not made with exportable handles.
  // InvalidArgument: unknown handle. FailedPrecondition: the handle is
  // being destroyed. ResourceExhausted: out of file descriptors.
  absl::StatusOr<int> ExportHandle(PhysicalHandle handle);
  // A new handle of `bytes` over another process's exported memory `fd`
  // (the caller keeps and closes fd; the backend keeps its own reference).
  // It maps like any handle; Destroy drops this process's reference. It
  // counts in counters().handles and imported_bytes, not physical_bytes.
  // InvalidArgument: bytes zero or unaligned, fd not open, not an export of
  // this kind of backend (Host: not a "memfd:vattn-export"; CUDA: not a
  // cuMemExportToShareableHandle descriptor of this device), or of another
  // size than `bytes`. Unimplemented: the backend cannot import.
  // ResourceExhausted: out of file descriptors or memory.
  absl::StatusOr<PhysicalHandle> ImportHandle(int fd, std::size_t bytes);

  // Maps the whole handle at va, read-write. InvalidArgument: unknown handle,
  // va unaligned or the range not inside one reservation.
  // FailedPrecondition: the range overlaps a live mapping.
  absl::Status Map(DevicePtr va, PhysicalHandle handle,
                   MapAccess access = MapAccess::kReadWrite);
  // Changes the access of the live mapping that starts at va and covers
  // exactly `bytes` (one Map's range), in place: one cuMemSetAccess on CUDA
  // (its cost, ~32-46 us per 2 MiB handle), one mprotect on Host.
  // InvalidArgument: (va, bytes) is not exactly one mapping.
  // FailedPrecondition: the mapping is busy in another call (a Zero or copy
  // running on it, a racing Unmap or SetAccess).
  absl::Status SetAccess(DevicePtr va, std::size_t bytes, MapAccess access);
  // The access a live mapping starting at va was given; InvalidArgument when
  // no mapping starts there.
  absl::StatusOr<MapAccess> AccessOf(DevicePtr va) const;
  // Unmaps exactly what one Map covered. InvalidArgument otherwise.
  absl::Status Unmap(DevicePtr va, std::size_t bytes);

  // Data movement on mapped memory, for tests, examples and zero-on-reuse.
  // Every byte of the range must be mapped (InvalidArgument otherwise, as for
  // a range whose end would wrap around the address space).
  // Synchronous: the data is in place when the call returns. While one runs,
  // Unmap of a mapping it touches fails with FailedPrecondition.
  absl::Status Zero(DevicePtr va, std::size_t bytes);
  absl::Status CopyToDevice(DevicePtr dst, const void* src, std::size_t bytes);
  absl::Status CopyFromDevice(void* dst, DevicePtr src, std::size_t bytes);
  // Copies `bytes` from mapped memory at src to mapped memory at dst (the
  // ranges must not overlap: InvalidArgument). Ordered on `stream`: on a
  // backend with streams (CUDA) it is enqueued after the work queued so far
  // on `stream` (cuMemcpyDtoDAsync) and later work on `stream` sees its
  // result; it may still run when the call returns, so the caller keeps
  // both ranges mapped until a fence recorded on `stream` after it has
  // completed. Without streams (Host) it has completed when the call
  // returns. PermissionDenied: dst touches a read-only mapping.
  absl::Status CopyDeviceToDevice(DevicePtr dst, DevicePtr src,
                                  std::size_t bytes, Stream stream = Stream{});

  // Records a fence after the work queued so far on `stream` (vattn/stream.h;
  // Stream{} is the legacy default stream). Backends without streams return
  // kCompletedFence. FailedPrecondition: the stream is being captured into
  // a CUDA graph (an event recorded there would be a graph node, not a
  // fence).
  absl::StatusOr<FenceId> RecordFence(Stream stream);
  // True once the work before the fence has finished. InvalidArgument: an
  // unknown fence.
  absl::StatusOr<bool> FenceDone(FenceId fence);
  // Blocks until the fence has completed.
  absl::Status WaitFence(FenceId fence);
  // Forgets a fence (completed or not). kCompletedFence is accepted.
  absl::Status ReleaseFence(FenceId fence);

 protected:
  explicit Backend(BackendCapabilities caps);

  // Subclasses call this first thing in their destructor: it takes back
  // whatever is still live through the Do* hooks while they still exist.
  void ReleaseAllForShutdown();

  // Hooks. Arguments are already checked against the contract; a hook only
  // does the work and reports the driver's or OS's answer.
  virtual absl::StatusOr<DevicePtr> DoReserve(std::size_t bytes) = 0;
  virtual absl::Status DoRelease(DevicePtr va, std::size_t bytes) = 0;
  virtual absl::StatusOr<PhysicalHandle> DoCreate(std::size_t bytes) = 0;
  virtual absl::Status DoDestroy(PhysicalHandle handle,
                                 std::size_t bytes) = 0;
  virtual absl::Status DoMap(DevicePtr va, PhysicalHandle handle,
                             std::size_t bytes, MapAccess access) = 0;
  // Changes one live mapping's access. The default returns Unimplemented
  // (a backend that cannot change access in place).
  virtual absl::Status DoSetAccess(DevicePtr va, std::size_t bytes,
                                   MapAccess access);
  // Export hooks; the defaults return Unimplemented. DoImportHandle must
  // return a handle no live handle of this backend uses.
  virtual absl::StatusOr<int> DoExportHandle(PhysicalHandle handle,
                                             std::size_t bytes);
  virtual absl::StatusOr<PhysicalHandle> DoImportHandle(int fd,
                                                        std::size_t bytes);
  virtual absl::Status DoUnmap(DevicePtr va, std::size_t bytes) = 0;
  virtual absl::Status DoZero(DevicePtr va, std::size_t bytes) = 0;
  virtual absl::Status DoCopyToDevice(DevicePtr dst, const void* src,
                                      std::size_t bytes) = 0;
  // The default stages through host memory (DoCopyFromDevice then
  // DoCopyToDevice, synchronous); backends override it with a device copy.
  virtual absl::Status DoCopyDeviceToDevice(DevicePtr dst, DevicePtr src,
                                            std::size_t bytes, Stream stream);
  virtual absl::Status DoCopyFromDevice(void* dst, DevicePtr src,
                                        std::size_t bytes) = 0;
  // Fence hooks; the defaults suit backends without streams.
  virtual absl::StatusOr<FenceId> DoRecordFence(Stream stream);
  virtual absl::StatusOr<bool> DoFenceDone(FenceId fence);
  virtual absl::Status DoWaitFence(FenceId fence);
  virtual absl::Status DoReleaseFence(FenceId fence);

 private:
  struct State;  // Live objects and counters; defined in backend.cc.

  absl::Status CheckSize(const char* what, std::size_t bytes) const;
  // Data calls pin the mappings they touch so a racing Unmap fails with
  // FailedPrecondition instead of pulling memory from under the copy.
  // `for_write`: the call writes the range, so a read-only mapping in it
  // is PermissionDenied.
  absl::Status PinMapped(const char* what, DevicePtr va, std::size_t bytes,
                         bool for_write = false);
  void Unpin(DevicePtr va, std::size_t bytes);
  void CountFailure();

  // Constant after construction.
  const BackendCapabilities caps_;
  const std::unique_ptr<State> state_;
};

// ---------------------------------------------------------------------------
// Host backend: real CPU memory with the GPU path's semantics. Reservations
// are mmap(PROT_NONE) ranges; physical handles are ranges of one memfd (so
// one file descriptor serves any number of handles, and Destroy punches the
// range out of the file to return the memory), or with exportable_handles
// one memfd each; Map is mmap(MAP_FIXED | MAP_SHARED) of the handle's
// range; Unmap puts PROT_NONE back. Pages are populated on first touch.
// ImportHandle accepts another Host backend's ExportHandle descriptor
// (whatever this backend's own options).
struct HostBackendOptions {
  // Allocation granularity; a power of two and a multiple of the OS page
  // size. 2 MiB matches NVIDIA GPUs, so sizes and call counts carry over.
  std::size_t granularity = std::size_t{2} << 20;
  // Cap on the bytes of live handles (ResourceExhausted beyond). 0 means the
  // machine's physical memory.
  std::size_t physical_limit_bytes = 0;
  // Largest single reservation accepted (the x86-64 user address space is
  // 128 TiB; half of it is a safe ceiling).
  std::size_t max_reservation_bytes = std::size_t{64} << 40;
  // Each handle is its own memfd ("vattn-export"), so ExportHandle can hand
  // one handle to another process and its memory lives while either side
  // holds it (Destroy closes this side's descriptor instead of punching the
  // shared file). Costs one file descriptor per live handle (extents are at
  // least a granule: hundreds, within the usual 1024 RLIMIT_NOFILE, but
  // raise it for many slots).
  bool exportable_handles = false;
};
VATTN_EXPORT absl::StatusOr<std::shared_ptr<Backend>> MakeHostBackend(
    const HostBackendOptions& options = {});

// ---------------------------------------------------------------------------
// CUDA backend: the driver's virtual-memory API for one device. libcuda.so.1
// is loaded at run time: on a machine without a driver or device this returns
// Unavailable with the reason, and the program still starts.
//  * Default budget: capabilities().default_budget_bytes is the device's free
//    memory at this call (cuMemGetInfo) less a margin of max(1 GiB, 5% of the
//    device's total memory) for the engine's later allocations (activations,
//    workspaces, the CUDA context's own growth), rounded down to the
//    granularity and at least one granule. Make the backend after loading
//    the model's weights, or set KVCacheOptions.memory_budget_bytes.
//  * Streams: Zero and the copies run on one private non-blocking stream per
//    backend, so they never wait for, or hold up, other streams' work (nor
//    disturb a graph capture on them). Fences are recorded on the caller's
//    Stream; RecordFence on a stream being captured is FailedPrecondition.
//  * Waits: WaitFence sleeps (its events use CU_EVENT_BLOCKING_SYNC);
//    FenceDone never blocks; Zero and the copies poll their completion.
VATTN_EXPORT absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackend(
    int device = 0);
struct CudaBackendOptions {
  // Handles are created with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR as
  // their requested handle type, so ExportHandle can hand them to another
  // process (cuMemExportToShareableHandle), and, where the device reports
  // CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED, with
  // gpuDirectRDMACapable (so a NIC can register them). Unavailable from
  // MakeCudaBackend when the device does not support POSIX descriptors.
  bool exportable_handles = false;
};
VATTN_EXPORT absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackend(
    int device, const CudaBackendOptions& options);
// Number of CUDA devices, or Unavailable (with the reason) when no driver can
// be loaded. Never fails on a machine with a driver and zero devices.
VATTN_EXPORT absl::StatusOr<int> CudaDeviceCount();

}  // namespace vattn

#endif  // VATTN_BACKEND_H_
