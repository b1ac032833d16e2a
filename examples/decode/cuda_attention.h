// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The CUDA side of the decode example, behind a plain C++ interface (no
// CUDA header needed to call it): decode attention for fp16 / bf16 over
// strided views (contiguous or paged, see attention.h), the K/V and query
// fill kernels, and the few runtime calls the decode loop needs. Streams and
// events are opaque pointers (cudaStream_t / cudaEvent_t).
//
// Every function returns "" on success, else the CUDA error and what failed.
// Built with nvcc when the toolkit is present (cuda_attention.cu, CUDA
// runtime linked statically, libcuda loaded lazily by it); otherwise
// cuda_stub.cc answers "built without CUDA kernels" to every call.
#ifndef VATTN_EXAMPLES_DECODE_CUDA_ATTENTION_H_
#define VATTN_EXAMPLES_DECODE_CUDA_ATTENTION_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "attention.h"
#include "kv_fill.h"

namespace vdecode::cuda {

// True when this build has the kernels.
bool Built();
// Devices the CUDA runtime sees; an error when there is no driver, no
// device, or no kernels built.
std::string DeviceCount(int* count);
std::string DeviceName(int device, std::string* name);
std::string SetDevice(int device);

std::string Malloc(void** ptr, std::size_t bytes);
void Free(void* ptr);
// Copies enqueued on `stream`; ToHost variants wait for the stream.
std::string CopyToDevice(void* dst, const void* src, std::size_t bytes,
                         void* stream);
std::string CopyToHost(void* dst, const void* src, std::size_t bytes,
                       void* stream);
// `height` rows of `width` bytes, `spitch` apart on the device, packed
// `dpitch` apart on the host (cudaMemcpy2D).
std::string CopyRowsToHost(void* dst, std::size_t dpitch, const void* src,
                           std::size_t spitch, std::size_t width,
                           std::size_t height, void* stream);
std::string Memset(void* ptr, int byte, std::size_t bytes, void* stream);

std::string StreamCreate(void** stream);
void StreamDestroy(void* stream);
std::string StreamSync(void* stream);
std::string EventCreate(void** event);
void EventDestroy(void* event);
std::string EventRecord(void* event, void* stream);
std::string EventElapsedMs(void* start, void* end, float* ms);

// Decode attention; args holds device addresses. fp16 and bf16 only, head
// dims 64, 128 and 256, GQA groups 1, 2, 4 and 8; strides must be multiples
// of 8 elements with stride_dim 1 (16-byte loads).
std::string DecodeAttention(const DecodeArgs& args, void* stream);
// Writes the items' rows (args holds device addresses).
std::string FillKv(const FillArgs& args, void* stream);
// q[j] as CpuFillQ writes it.
std::string FillQ(float* q, std::int64_t n, std::uint32_t seed,
                  std::uint32_t step, void* stream);
// dst[idx[j]] = val[j] for j < n; idx and val are host arrays (sent as
// kernel parameters, so nothing needs pinned memory).
std::string Scatter(std::int32_t* dst, const std::int32_t* idx,
                    const std::int32_t* val, int n, void* stream);

}  // namespace vdecode::cuda

#endif  // VATTN_EXAMPLES_DECODE_CUDA_ATTENTION_H_
