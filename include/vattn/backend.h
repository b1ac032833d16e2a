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
//    on CUDA: one call from the caller's view). The range must lie inside one
//    reservation (InvalidArgument) and overlap no live mapping
//    (FailedPrecondition). Unmap(va, bytes) must cover exactly what one Map
//    covered (InvalidArgument otherwise); it leaves the range reserved.
//  * Failure. A call that returns an error changes nothing: counters, live
//    objects and memory are exactly as before the call. Out of memory (device
//    memory, or the Host backend's physical limit) is ResourceExhausted;
//    a missing driver or device is Unavailable; a driver's "invalid value"
//    is InvalidArgument; any other driver or OS error is Internal. Driver
//    errors name the call, file:line and the driver's error name.
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


// The six calls that change memory state, for counters and fault injection.
enum class BackendOp : int {
  kReserve = 0,
  kRelease,
  kCreate,
  kDestroy,
  kMap,
  kUnmap,
};
inline constexpr int kNumBackendOps = 6;
VATTN_EXPORT const char* BackendOpName(BackendOp op);

struct BackendCapabilities {
  std::string name;              // "cuda:0", "host", "latency_model(host)", ...
  int device = -1;               // CUDA device ordinal; -1 for the host.
  std::size_t granularity = 0;   // Bytes; see the contract above.
  std::size_t max_reservation_bytes = 0;  // Largest single Reserve accepted.
  std::size_t physical_memory_bytes = 0;  // Memory Create can hand out in all
                                          // (device total, Host limit).
  bool host_accessible = false;  // Addresses may be dereferenced on the CPU.
  bool has_streams = false;      // Fences wait for real asynchronous work.
};

// Live objects and call counts of one backend. Live figures count what exists
// now; `calls` counts calls that succeeded since the backend was made.
struct BackendCounters {
  std::int64_t reservations = 0;
  std::int64_t reserved_bytes = 0;
  std::int64_t handles = 0;
  std::int64_t physical_bytes = 0;
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

  // Maps the whole handle at va, read-write. InvalidArgument: unknown handle,
  // va unaligned or the range not inside one reservation.
  // FailedPrecondition: the range overlaps a live mapping.
  absl::Status Map(DevicePtr va, PhysicalHandle handle);
  // Unmaps exactly what one Map covered. InvalidArgument otherwise.
  absl::Status Unmap(DevicePtr va, std::size_t bytes);

  // Data movement on mapped memory, for tests, examples and zero-on-reuse.
  // Every byte of the range must be mapped (InvalidArgument otherwise).
  // Synchronous: the data is in place when the call returns. While one runs,
  // Unmap of a mapping it touches fails with FailedPrecondition.
  absl::Status Zero(DevicePtr va, std::size_t bytes);
  absl::Status CopyToDevice(DevicePtr dst, const void* src, std::size_t bytes);
  absl::Status CopyFromDevice(void* dst, DevicePtr src, std::size_t bytes);

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
                             std::size_t bytes) = 0;
  virtual absl::Status DoUnmap(DevicePtr va, std::size_t bytes) = 0;
  virtual absl::Status DoZero(DevicePtr va, std::size_t bytes) = 0;
  virtual absl::Status DoCopyToDevice(DevicePtr dst, const void* src,
                                      std::size_t bytes) = 0;
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
  absl::Status PinMapped(const char* what, DevicePtr va, std::size_t bytes);
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
// range out of the file to return the memory); Map is
// mmap(MAP_FIXED | MAP_SHARED) of the handle's range; Unmap puts PROT_NONE
// back. Pages are populated on first touch.
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
};
VATTN_EXPORT absl::StatusOr<std::shared_ptr<Backend>> MakeHostBackend(
    const HostBackendOptions& options = {});

// ---------------------------------------------------------------------------
// CUDA backend: the driver's virtual-memory API for one device. libcuda.so.1
// is loaded at run time: on a machine without a driver or device this returns
// Unavailable with the reason, and the program still starts.
VATTN_EXPORT absl::StatusOr<std::shared_ptr<Backend>> MakeCudaBackend(
    int device = 0);
// Number of CUDA devices, or Unavailable (with the reason) when no driver can
// be loaded. Never fails on a machine with a driver and zero devices.
VATTN_EXPORT absl::StatusOr<int> CudaDeviceCount();

// ---------------------------------------------------------------------------
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

  absl::StatusOr<DevicePtr> DoReserve(std::size_t bytes) override;
  absl::Status DoRelease(DevicePtr va, std::size_t bytes) override;
  absl::StatusOr<PhysicalHandle> DoCreate(std::size_t bytes) override;
  absl::Status DoDestroy(PhysicalHandle handle, std::size_t bytes) override;
  absl::Status DoMap(DevicePtr va, PhysicalHandle handle,
                     std::size_t bytes) override;
  absl::Status DoUnmap(DevicePtr va, std::size_t bytes) override;
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

// ---------------------------------------------------------------------------
// Latency model: forwards every call to an inner backend and charges a cost
// per call on top, by spinning, under one lock per backend for the mapping
// calls (the driver serializes mapping). Lets map-ahead logic be measured on
// CPUs with GPU-like costs.

// Cost of one call on a handle or range of `bytes`:
//   base_us + per_granule_us * bytes / 2 MiB.
struct CallCost {
  double base_us = 0;
  double per_granule_us = 0;
  double Micros(std::size_t bytes) const;
};

struct LatencyCosts {
  CallCost reserve;
  CallCost release;
  CallCost create;
  CallCost destroy;
  CallCost map;  // cuMemMap + cuMemSetAccess.
  CallCost unmap;
  // Fitted to the medians measured on an H200 (driver 580, CUDA 13) in
  // DESIGN.md: 2 MiB, 128 MiB and 512 MiB handles.
  static LatencyCosts H200();
  // The same shape measured on an H100.
  static LatencyCosts H100();
  // No cost at all: the wrapper only forwards.
  static LatencyCosts Zero();
  const CallCost& For(BackendOp op) const;
};

VATTN_EXPORT absl::StatusOr<std::shared_ptr<Backend>> MakeLatencyModelBackend(
    std::shared_ptr<Backend> inner, LatencyCosts costs = LatencyCosts::H200());

// ---------------------------------------------------------------------------
// Fault injection: forwards to an inner backend, but fails chosen calls with
// a chosen code before they reach it (so a failed call changes nothing).
// Calls are counted per op from 1, counting only calls that passed the
// contract checks (so indices are stable for a given call sequence).
struct FaultRule {
  // Which calls the rule counts; std::nullopt counts every op together.
  std::optional<BackendOp> op;
  // The call (1-based, among the calls counted) that fails.
  std::int64_t nth = 1;
  // Fail every call from the nth on, not just the nth.
  bool and_after = false;
  absl::StatusCode code = absl::StatusCode::kInternal;
};
struct FaultPlan {
  std::vector<FaultRule> rules;
  // Fails the nth call of `op` once.
  static FaultPlan FailNth(BackendOp op, std::int64_t nth,
                           absl::StatusCode code = absl::StatusCode::kInternal);
  // Fails the nth call of any op, once.
  static FaultPlan FailNthAny(
      std::int64_t nth, absl::StatusCode code = absl::StatusCode::kInternal);
};

// The fault-injection wrapper, public so tests can change the plan and read
// how many calls it saw. Thread-safe.
class VATTN_EXPORT FaultInjectionBackend : public BackendWrapper {
 public:
  static absl::StatusOr<std::shared_ptr<FaultInjectionBackend>> Create(
      std::shared_ptr<Backend> inner, FaultPlan plan = {});
  ~FaultInjectionBackend() override;
  // The static Create above would otherwise hide Backend::Create(bytes).
  using Backend::Create;

  // Replaces the plan and restarts the call counts.
  void SetPlan(FaultPlan plan);
  // Calls of `op` seen since the last SetPlan (nullopt: all ops).
  std::int64_t seen(std::optional<BackendOp> op = std::nullopt) const;
  // Calls failed on purpose since the last SetPlan.
  std::int64_t injected() const;

 protected:
  absl::StatusOr<DevicePtr> DoReserve(std::size_t bytes) override;
  absl::Status DoRelease(DevicePtr va, std::size_t bytes) override;
  absl::StatusOr<PhysicalHandle> DoCreate(std::size_t bytes) override;
  absl::Status DoDestroy(PhysicalHandle handle, std::size_t bytes) override;
  absl::Status DoMap(DevicePtr va, PhysicalHandle handle,
                     std::size_t bytes) override;
  absl::Status DoUnmap(DevicePtr va, std::size_t bytes) override;

 private:
  FaultInjectionBackend(std::shared_ptr<Backend> inner, FaultPlan plan);
  // Counts the call and returns the injected error, if any.
  absl::Status Check(BackendOp op);

  struct Plan;  // The plan and call counts; defined in fault_injection.cc.
  const std::unique_ptr<Plan> plan_;
};

VATTN_EXPORT absl::StatusOr<std::shared_ptr<Backend>>
MakeFaultInjectionBackend(std::shared_ptr<Backend> inner, FaultPlan plan);

}  // namespace vattn

#endif  // VATTN_BACKEND_H_
