// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Run-time access to the CUDA driver API. vattn never links libcuda: the
// driver library is dlopen'ed (RTLD_NOW | RTLD_LOCAL) on first use, once per
// process, and each entry point is resolved through cuGetProcAddress_v2 for
// the CUDA version of the headers vattn was compiled with (falling back to
// dlsym of the versioned symbol, e.g. cuMemsetD8_v2, on older drivers). A
// program that links vattn therefore starts on a machine with no driver and
// gets absl::UnavailableError saying why.
//
// When vattn is built without the CUDA toolkit's headers
// (VATTN_HAVE_CUDA_HEADERS undefined), only LoadCudaDriver() exists, and it
// returns Unavailable("vattn was built without the CUDA toolkit").
#ifndef VATTN_SRC_BACKEND_CUDA_DRIVER_H_
#define VATTN_SRC_BACKEND_CUDA_DRIVER_H_

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#if defined(VATTN_HAVE_CUDA_HEADERS)
#include <cuda.h>
#endif

namespace vattn::internal {

#if defined(VATTN_HAVE_CUDA_HEADERS)

// X(name, versioned_symbol): every driver entry point vattn uses. `name` is
// what cuGetProcAddress is asked for; `versioned_symbol` is the exported
// symbol dlsym falls back to. cuda.h #defines several names to their _v2
// forms (cuMemsetD8 -> cuMemsetD8_v2, ...); the member of CudaDriver is
// declared through the same macro, so `driver.cuMemsetD8(...)` names it.
//
// Only add a name whose newest ABI at CUDA_VERSION is the one cuda.h declares
// under it: cuGetProcAddress returns the newest variant, and CUDA 13 gave
// some names a new signature without a #define (cudaTypedefs.h lists them:
// PFN_cuCtxSynchronize_v13000 takes a CUcontext, PFN_cuCtxGetDevice_v13000
// too), so `driver.cuCtxSynchronize()` would call the new ABI with no
// argument. Check cudaTypedefs.h for a PFN_<name>_v<newer> before adding one.
#define VATTN_CUDA_DRIVER_ENTRY_POINTS(X)                          \
  X(cuInit, cuInit)                                                \
  X(cuGetErrorName, cuGetErrorName)                                \
  X(cuGetErrorString, cuGetErrorString)                            \
  X(cuDeviceGetCount, cuDeviceGetCount)                            \
  X(cuDeviceGet, cuDeviceGet)                                      \
  X(cuDeviceGetName, cuDeviceGetName)                              \
  X(cuDeviceTotalMem, cuDeviceTotalMem_v2)                         \
  X(cuDeviceGetAttribute, cuDeviceGetAttribute)                    \
  X(cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain)            \
  X(cuDevicePrimaryCtxRelease, cuDevicePrimaryCtxRelease_v2)       \
  X(cuCtxSetCurrent, cuCtxSetCurrent)                              \
  X(cuCtxGetCurrent, cuCtxGetCurrent)                              \
  X(cuMemGetAllocationGranularity, cuMemGetAllocationGranularity)  \
  X(cuMemAddressReserve, cuMemAddressReserve)                      \
  X(cuMemAddressFree, cuMemAddressFree)                            \
  X(cuMemCreate, cuMemCreate)                                      \
  X(cuMemRelease, cuMemRelease)                                    \
  X(cuMemMap, cuMemMap)                                            \
  X(cuMemUnmap, cuMemUnmap)                                        \
  X(cuMemSetAccess, cuMemSetAccess)                                \
  X(cuMemExportToShareableHandle, cuMemExportToShareableHandle)    \
  X(cuMemImportFromShareableHandle, cuMemImportFromShareableHandle) \
  X(cuMemGetAllocationPropertiesFromHandle,                        \
    cuMemGetAllocationPropertiesFromHandle)                        \
  X(cuMemGetInfo, cuMemGetInfo_v2)                                 \
  X(cuMemsetD8Async, cuMemsetD8Async)                              \
  X(cuMemcpyHtoDAsync, cuMemcpyHtoDAsync_v2)                       \
  X(cuMemcpyDtoHAsync, cuMemcpyDtoHAsync_v2)                       \
  X(cuMemcpyDtoDAsync, cuMemcpyDtoDAsync_v2)                       \
  X(cuEventCreate, cuEventCreate)                                  \
  X(cuEventRecord, cuEventRecord)                                  \
  X(cuEventQuery, cuEventQuery)                                    \
  X(cuEventSynchronize, cuEventSynchronize)                        \
  X(cuEventDestroy, cuEventDestroy_v2)                             \
  X(cuStreamCreate, cuStreamCreate)                                \
  X(cuStreamDestroy, cuStreamDestroy_v2)                           \
  X(cuStreamSynchronize, cuStreamSynchronize)                      \
  X(cuStreamIsCapturing, cuStreamIsCapturing)                      \
  X(cuThreadExchangeStreamCaptureMode,                             \
    cuThreadExchangeStreamCaptureMode)                             \
  X(cuStreamBeginCapture, cuStreamBeginCapture_v2)                 \
  X(cuStreamEndCapture, cuStreamEndCapture)                        \
  X(cuGraphDestroy, cuGraphDestroy)                                \
  X(cuLaunchHostFunc, cuLaunchHostFunc)

// The loaded driver: one function pointer per entry point, all non-null once
// LoadCudaDriver() has returned it. Immutable after loading; the pointers may
// be called from any thread (the driver is thread-safe).
struct CudaDriver {
#define VATTN_CUDA_DRIVER_MEMBER_(name, versioned) \
  decltype(&::name) name = nullptr;
  VATTN_CUDA_DRIVER_ENTRY_POINTS(VATTN_CUDA_DRIVER_MEMBER_)
#undef VATTN_CUDA_DRIVER_MEMBER_
};

// Turns a failed driver call into a Status whose message names the call's
// text, file:line and the driver's error name and description. Codes:
// CUDA_ERROR_OUT_OF_MEMORY -> ResourceExhausted; no device, driver not
// initialized or too old -> Unavailable; a stream-capture error (the call
// is not allowed while a CUDA graph is being captured: CUDA_ERROR_STREAM_
// CAPTURE_*, CUDA_ERROR_CAPTURED_EVENT) -> FailedPrecondition; anything else
// -> Internal. CUDA_ERROR_INVALID_VALUE is Internal too: Backend checked
// the arguments before the driver saw them, so the driver refusing them is
// vattn's bug or a property this device does not support, not the caller's
// mistake. `result` must not be CUDA_SUCCESS.
absl::Status CudaCallError(CUresult result, const char* call, const char* file,
                           int line);

// The driver's name for `result` ("CUDA_ERROR_OUT_OF_MEMORY"), or
// "CUresult <n>" when the driver cannot say.
const char* CudaErrorName(CUresult result);

#else  // !VATTN_HAVE_CUDA_HEADERS

struct CudaDriver {};

#endif  // VATTN_HAVE_CUDA_HEADERS

// The CUDA backend's default budget (BackendCapabilities::
// default_budget_bytes, documented at MakeCudaBackend): `free_bytes` less
// max(kCudaBudgetMarginMinBytes, total_bytes / kCudaBudgetMarginDivisor),
// rounded down to `granularity` (a power of two), and at least one granule.
inline constexpr std::size_t kCudaBudgetMarginMinBytes = std::size_t{1} << 30;
inline constexpr std::size_t kCudaBudgetMarginDivisor = 20;  // 5%.
std::size_t CudaDefaultBudget(std::size_t free_bytes, std::size_t total_bytes,
                              std::size_t granularity);

// Loads libcuda.so.1, resolves every entry point and calls cuInit(0), the
// first time it is called (thread-safe); later calls return the same answer.
// Unavailable, with the reason, when the library or an entry point is
// missing, when cuInit fails, or when vattn was built without the toolkit.
absl::StatusOr<const CudaDriver*> LoadCudaDriver();

// Number of CUDA devices: 0 when the driver is present but cuInit reports no
// device; Unavailable (with the reason) when no usable driver can be loaded.
absl::StatusOr<int> CudaDriverDeviceCount();

}  // namespace vattn::internal

#if defined(VATTN_HAVE_CUDA_HEADERS)

// Evaluates a driver call (a CUresult expression) to an absl::Status.
#define VATTN_CU_STATUS(call)                                           \
  ([&]() -> ::absl::Status {                                            \
    const CUresult vattn_cu_result_ = (call);                           \
    if (vattn_cu_result_ == CUDA_SUCCESS) return ::absl::OkStatus();    \
    return ::vattn::internal::CudaCallError(vattn_cu_result_, #call,    \
                                            __FILE__, __LINE__);        \
  }())

// Evaluates a driver call and returns its error, as a Status, from the
// enclosing function when it is not CUDA_SUCCESS:
//   VATTN_CU_RETURN_IF_ERROR(driver.cuMemMap(va, bytes, 0, handle, 0));
#define VATTN_CU_RETURN_IF_ERROR(call)                                  \
  do {                                                                  \
    const CUresult vattn_cu_result_ = (call);                           \
    if (vattn_cu_result_ != CUDA_SUCCESS) {                             \
      return ::vattn::internal::CudaCallError(vattn_cu_result_, #call,  \
                                              __FILE__, __LINE__);      \
    }                                                                   \
  } while (false)

#endif  // VATTN_HAVE_CUDA_HEADERS

#endif  // VATTN_SRC_BACKEND_CUDA_DRIVER_H_
