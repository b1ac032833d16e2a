// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The run-time loader of libcuda.so.1; see cuda_driver.h.

#include "src/backend/cuda_driver.h"

#include <algorithm>
#include <cstddef>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

#if defined(VATTN_HAVE_CUDA_HEADERS)
#include <dlfcn.h>

#include <cstring>
#include <string>
#endif

namespace vattn::internal {

std::size_t CudaDefaultBudget(std::size_t free_bytes, std::size_t total_bytes,
                              std::size_t granularity) {
  const std::size_t margin = std::max(kCudaBudgetMarginMinBytes,
                                      total_bytes / kCudaBudgetMarginDivisor);
  std::size_t budget = free_bytes > margin ? free_bytes - margin : 0;
  budget &= ~(granularity - 1);
  return std::max(budget, granularity);
}

#if defined(VATTN_HAVE_CUDA_HEADERS)
namespace {

constexpr const char kLibraryName[] = "libcuda.so.1";

// The outcome of loading, computed once.
struct LoadedDriver {
  CudaDriver driver;
  absl::Status status;      // OK: every entry point resolved, cuInit(0) OK.
  bool no_device = false;   // cuInit(0) answered CUDA_ERROR_NO_DEVICE.
};

// Names of the codes vattn treats specially, for when the driver cannot name
// them itself (the toolkit's stub libcuda answers every call with
// CUDA_ERROR_STUB_LIBRARY, cuGetErrorName included).
const char* KnownErrorName(CUresult result) {
  switch (result) {
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case CUDA_ERROR_DEINITIALIZED: return "CUDA_ERROR_DEINITIALIZED";
    case CUDA_ERROR_STUB_LIBRARY: return "CUDA_ERROR_STUB_LIBRARY";
    case CUDA_ERROR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
    case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
      return "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH";
    case CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
      return "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT";
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED:
      return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
    default: return "unknown CUresult";
  }
}

using GetProcAddressFn = CUresult (*)(const char* symbol, void** pfn,
                                      int cuda_version, cuuint64_t flags,
                                      CUdriverProcAddressQueryResult* status);

// Resolves one entry point: cuGetProcAddress_v2 for the headers' CUDA
// version first, then dlsym of the exported, versioned symbol.
void* Resolve(void* library, GetProcAddressFn get_proc, const char* name,
              const char* versioned) {
  if (get_proc != nullptr) {
    void* fn = nullptr;
    CUdriverProcAddressQueryResult found = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    // Legacy-stream variants, as the dlsym fallback names them: vattn is
    // not compiled for the per-thread default stream.
    if (get_proc(name, &fn, CUDA_VERSION, CU_GET_PROC_ADDRESS_LEGACY_STREAM,
                 &found) == CUDA_SUCCESS &&
        found == CU_GET_PROC_ADDRESS_SUCCESS && fn != nullptr) {
      return fn;
    }
  }
  return dlsym(library, versioned);
}

// Function pointers are stored from void* through memcpy: a direct cast
// between object and function pointers is only conditionally supported.
template <typename Fn>
void StoreFunction(Fn* slot, void* address) {
  static_assert(sizeof(Fn) == sizeof(void*), "function pointer size");
  std::memcpy(slot, &address, sizeof(address));
}

LoadedDriver Load() {
  LoadedDriver out;
  dlerror();  // Clear any stale error.
  void* library = dlopen(kLibraryName, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* why = dlerror();
    out.status = absl::UnavailableError(absl::StrCat(
        kLibraryName, " could not be loaded: ",
        why != nullptr ? why : "unknown dlopen error",
        "; no NVIDIA driver on this machine (or it is not on the loader's "
        "path)"));
    return out;
  }
  // The library stays loaded for the life of the process: function pointers
  // into it are handed out freely.
  void* get_proc_address = dlsym(library, "cuGetProcAddress_v2");
  GetProcAddressFn get_proc = nullptr;
  if (get_proc_address != nullptr) {
    StoreFunction(&get_proc, get_proc_address);
  }

  std::string missing;
#define VATTN_CUDA_RESOLVE_(name, versioned)                               \
  {                                                                        \
    void* address = Resolve(library, get_proc, #name, #versioned);         \
    if (address == nullptr) {                                              \
      absl::StrAppend(&missing, missing.empty() ? "" : ", ", #versioned);  \
    } else {                                                               \
      StoreFunction(&out.driver.name, address);                            \
    }                                                                      \
  }
  VATTN_CUDA_DRIVER_ENTRY_POINTS(VATTN_CUDA_RESOLVE_)
#undef VATTN_CUDA_RESOLVE_
  if (!missing.empty()) {
    out.status = absl::UnavailableError(absl::StrCat(
        kLibraryName, " lacks driver entry point(s) ", missing,
        "; the NVIDIA driver is too old for vattn (built against CUDA ",
        CUDA_VERSION / 1000, ".", (CUDA_VERSION % 1000) / 10, ")"));
    return out;
  }

  const CUresult init = out.driver.cuInit(0);
  if (init != CUDA_SUCCESS) {
    out.no_device = init == CUDA_ERROR_NO_DEVICE;
    const char* name = nullptr;
    const char* text = nullptr;
    if (out.driver.cuGetErrorName(init, &name) != CUDA_SUCCESS ||
        name == nullptr) {
      name = KnownErrorName(init);
    }
    if (out.driver.cuGetErrorString(init, &text) != CUDA_SUCCESS) text = nullptr;
    out.status = absl::UnavailableError(absl::StrFormat(
        "cuInit(0) failed: %s (%d: %s); the CUDA driver in %s cannot be used "
        "on this machine%s",
        name, static_cast<int>(init),
        text != nullptr ? text : "no description", kLibraryName,
        init == CUDA_ERROR_STUB_LIBRARY
            ? " (it is the toolkit's stub library, not the real driver)"
            : ""));
  }
  return out;
}

const LoadedDriver& Loaded() {
  // A function-local static: initialized once, thread-safe, never destroyed
  // before its users (it lives until exit and holds only plain data).
  static const LoadedDriver* const loaded = new LoadedDriver(Load());
  return *loaded;
}

// The part of __FILE__ from the project's root ("src/backend/cuda.cc").
const char* ShortFile(const char* file) {
  const char* src = std::strstr(file, "src/");
  return src != nullptr ? src : file;
}

}  // namespace

const char* CudaErrorName(CUresult result) {
  const LoadedDriver& loaded = Loaded();
  const char* name = nullptr;
  if (loaded.driver.cuGetErrorName != nullptr &&
      loaded.driver.cuGetErrorName(result, &name) == CUDA_SUCCESS &&
      name != nullptr) {
    return name;
  }
  return KnownErrorName(result);
}

absl::Status CudaCallError(CUresult result, const char* call, const char* file,
                           int line) {
  const LoadedDriver& loaded = Loaded();
  const char* text = nullptr;
  if (loaded.driver.cuGetErrorString == nullptr ||
      loaded.driver.cuGetErrorString(result, &text) != CUDA_SUCCESS) {
    text = nullptr;
  }
  std::string message = absl::StrFormat(
      "%s failed at %s:%d: %s (%d: %s)", call, ShortFile(file), line,
      CudaErrorName(result), static_cast<int>(result),
      text != nullptr ? text : "no description");
  switch (result) {
    case CUDA_ERROR_OUT_OF_MEMORY:
      return absl::ResourceExhaustedError(std::move(message));
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_NOT_INITIALIZED:
    case CUDA_ERROR_DEINITIALIZED:
    case CUDA_ERROR_STUB_LIBRARY:
    case CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER:
    case CUDA_ERROR_DEVICE_UNAVAILABLE:
    case CUDA_ERROR_SYSTEM_NOT_READY:
    case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
    case CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE:
      return absl::UnavailableError(std::move(message));
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED:
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED:
    case CUDA_ERROR_STREAM_CAPTURE_MERGE:
    case CUDA_ERROR_STREAM_CAPTURE_UNMATCHED:
    case CUDA_ERROR_STREAM_CAPTURE_UNJOINED:
    case CUDA_ERROR_STREAM_CAPTURE_ISOLATION:
    case CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
    case CUDA_ERROR_CAPTURED_EVENT:
    case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD:
      return absl::FailedPreconditionError(absl::StrCat(
          std::move(message),
          "; the call is not allowed while a CUDA graph is being captured"));
    case CUDA_ERROR_INVALID_VALUE:
      // Backend validated the arguments first: not the caller's mistake.
      return absl::InternalError(absl::StrCat(
          std::move(message),
          "; vattn had checked the arguments, so this is a vattn bug or a "
          "property the device does not support"));
    default:
      return absl::InternalError(std::move(message));
  }
}

absl::StatusOr<const CudaDriver*> LoadCudaDriver() {
  const LoadedDriver& loaded = Loaded();
  if (!loaded.status.ok()) return loaded.status;
  return &loaded.driver;
}

absl::StatusOr<int> CudaDriverDeviceCount() {
  const LoadedDriver& loaded = Loaded();
  if (loaded.no_device) return 0;
  if (!loaded.status.ok()) return loaded.status;
  int count = 0;
  VATTN_CU_RETURN_IF_ERROR(loaded.driver.cuDeviceGetCount(&count));
  return count;
}

#else  // !VATTN_HAVE_CUDA_HEADERS

namespace {
absl::Status BuiltWithoutToolkit() {
  return absl::UnavailableError(
      "vattn was built without the CUDA toolkit (cuda.h was not found at "
      "configure time), so the CUDA backend (libcuda) is unavailable");
}
}  // namespace

absl::StatusOr<const CudaDriver*> LoadCudaDriver() {
  return BuiltWithoutToolkit();
}
absl::StatusOr<int> CudaDriverDeviceCount() { return BuiltWithoutToolkit(); }

#endif  // VATTN_HAVE_CUDA_HEADERS

}  // namespace vattn::internal
