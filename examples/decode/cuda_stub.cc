// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// cuda_attention.h for builds without nvcc: every call reports that.
#include "cuda_attention.h"

namespace vdecode::cuda {
namespace {
std::string NotBuilt() {
  return "built without CUDA kernels (nvcc was not found or "
         "VATTN_WITH_CUDA=OFF)";
}
}  // namespace

bool Built() { return false; }
std::string DeviceCount(int* count) {
  *count = 0;
  return NotBuilt();
}
std::string DeviceName(int, std::string*) { return NotBuilt(); }
std::string SetDevice(int) { return NotBuilt(); }
std::string Malloc(void** ptr, std::size_t) {
  *ptr = nullptr;
  return NotBuilt();
}
void Free(void*) {}
std::string CopyToDevice(void*, const void*, std::size_t, void*) { return NotBuilt(); }
std::string CopyToHost(void*, const void*, std::size_t, void*) { return NotBuilt(); }
std::string CopyRowsToHost(void*, std::size_t, const void*, std::size_t,
                           std::size_t, std::size_t, void*) {
  return NotBuilt();
}
std::string Memset(void*, int, std::size_t, void*) { return NotBuilt(); }
std::string StreamCreate(void** stream) {
  *stream = nullptr;
  return NotBuilt();
}
void StreamDestroy(void*) {}
std::string StreamSync(void*) { return NotBuilt(); }
std::string EventCreate(void** event) {
  *event = nullptr;
  return NotBuilt();
}
void EventDestroy(void*) {}
std::string EventRecord(void*, void*) { return NotBuilt(); }
std::string EventElapsedMs(void*, void*, float*) { return NotBuilt(); }
std::string DecodeAttention(const DecodeArgs&, void*) { return NotBuilt(); }
std::string FillKv(const FillArgs&, void*) { return NotBuilt(); }
std::string FillQ(float*, std::int64_t, std::uint32_t, std::uint32_t, void*) {
  return NotBuilt();
}
std::string Scatter(std::int32_t*, const std::int32_t*, const std::int32_t*,
                    int, void*) {
  return NotBuilt();
}

}  // namespace vdecode::cuda
