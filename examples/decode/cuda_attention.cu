// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Decode attention, fill kernels and runtime wrappers (cuda_attention.h).
//
// The attention kernel: one thread block per (request, KV head), 128
// threads. A row of head_dim elements is read by head_dim / 8 lanes with one
// 16-byte load each, so a warp covers 256 / head_dim rows at once; each lane
// group walks its share of the context kUnroll tokens at a time (all loads
// of a chunk issued before any math), keeping an online softmax (running
// max, sum and weighted V) for every query head of the GQA group, with the
// scores in log2 units. Lane groups merge by warp shuffles, warps through
// shared memory. The paged variant is the same code except that a token's
// row address goes through the block table.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "cuda_attention.h"

namespace vdecode::cuda {
namespace {

std::string Err(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return {};
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" +
         cudaGetErrorString(e) + ")";
}
cudaStream_t S(void* s) { return static_cast<cudaStream_t>(s); }

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockTokens = 16;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct Vec;
template <>
struct Vec<__half> {
  using Pair = __half2;
  static __device__ float2 ToFloat2(Pair p) { return __half22float2(p); }
  static __device__ Pair FromFloat2(float a, float b) {
    return __floats2half2_rn(a, b);
  }
};
template <>
struct Vec<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ float2 ToFloat2(Pair p) { return __bfloat1622float2(p); }
  static __device__ Pair FromFloat2(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
};

// Eight elements at p (16-byte aligned) as floats.
template <typename T>
__device__ __forceinline__ void Load8(const T* p, float (&f)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const typename Vec<T>::Pair* h =
      reinterpret_cast<const typename Vec<T>::Pair*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = Vec<T>::ToFloat2(h[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

template <typename T>
__device__ __forceinline__ void Store8(T* p, const float (&f)[8]) {
  uint4 u;
  typename Vec<T>::Pair* h = reinterpret_cast<typename Vec<T>::Pair*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = Vec<T>::FromFloat2(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}

// Element offset of token t of a request, before the head and dim terms.
template <bool kPaged>
__device__ __forceinline__ long long TokenOffset(const KvTensor& kv,
                                                 const std::int32_t* table,
                                                 long long row_base, int t) {
  if constexpr (kPaged) {
    const long long block = __ldg(table + t / kBlockTokens);
    return block * kv.stride_row +
           static_cast<long long>(t % kBlockTokens) * kv.stride_token;
  } else {
    return row_base + static_cast<long long>(t) * kv.stride_token;
  }
}

template <typename T, int D, int G, bool kPaged>
__global__ void __launch_bounds__(kThreads)
    DecodeKernel(DecodeArgs a, float scale_log2) {
  constexpr int kLanesPerRow = D / 8;
  constexpr int kRowsPerWarp = 32 / kLanesPerRow;
  constexpr int kGroups = kWarps * kRowsPerWarp;
  constexpr int kUnroll = G >= 8 ? 2 : 4;
  __shared__ float s_m[kWarps][G];
  __shared__ float s_l[kWarps][G];
  __shared__ float s_max[G];
  __shared__ float s_inv_sum[G];
  __shared__ float s_acc[G][D];

  const int kvh = blockIdx.x;
  const int i = blockIdx.y;
  const int len = a.lengths[i];
  const long long row = a.rows[i];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int sub = lane / kLanesPerRow;
  const int d0 = (lane % kLanesPerRow) * 8;

  for (int j = threadIdx.x; j < G * D; j += kThreads) (&s_acc[0][0])[j] = 0.f;

  const float* qp =
      a.q + (static_cast<long long>(i) * a.num_q_heads +
             static_cast<long long>(kvh) * G) * D;
  float q[G][8];
  float m[G];
  float l[G];
  float acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      q[g][j] = qp[g * D + d0 + j] * scale_log2;
      acc[g][j] = 0.f;
    }
  }

  const T* kp = static_cast<const T*>(a.k.data) + kvh * a.k.stride_head + d0;
  const T* vp = static_cast<const T*>(a.v.data) + kvh * a.v.stride_head + d0;
  const long long krow = kPaged ? 0 : row * a.k.stride_row;
  const long long vrow = kPaged ? 0 : row * a.v.stride_row;
  const std::int32_t* table =
      kPaged ? a.paged.table + row * a.paged.max_blocks : nullptr;

  // `base` is the same for every lane of a warp, so the loop and the
  // shuffles inside it never diverge within a warp.
  for (int base = warp * kRowsPerWarp * kUnroll; base < len;
       base += kGroups * kUnroll) {
    const int t0 = base + sub * kUnroll;
    float kf[kUnroll][8];
    float vf[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u;
      if (t < len) {
        Load8(kp + TokenOffset<kPaged>(a.k, table, krow, t), kf[u]);
        Load8(vp + TokenOffset<kPaged>(a.v, table, vrow, t), vf[u]);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) kf[u][j] = vf[u][j] = 0.f;
      }
    }
    float s[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) dot = fmaf(q[g][j], kf[u][j], dot);
#pragma unroll
        for (int o = kLanesPerRow / 2; o > 0; o >>= 1) {
          dot += __shfl_xor_sync(kFullMask, dot, o);
        }
        s[u][g] = t0 + u < len ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][g]);
      if (mx == -INFINITY) continue;  // No valid token seen yet.
      const float c = exp2f(m[g] - mx);  // 0 while m[g] is -inf.
      float p[kUnroll];
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        p[u] = exp2f(s[u][g] - mx);
        psum += p[u];
      }
      l[g] = l[g] * c + psum;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float x = acc[g][j] * c;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) x = fmaf(p[u], vf[u][j], x);
        acc[g][j] = x;
      }
      m[g] = mx;
    }
  }

  // Merge the lane groups of a warp (lanes holding the same dims).
#pragma unroll
  for (int o = kLanesPerRow; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float mo = __shfl_xor_sync(kFullMask, m[g], o);
      const float lo = __shfl_xor_sync(kFullMask, l[g], o);
      float ao[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) ao[j] = __shfl_xor_sync(kFullMask, acc[g][j], o);
      const float mm = fmaxf(m[g], mo);
      const float ca = m[g] == -INFINITY ? 0.f : exp2f(m[g] - mm);
      const float cb = mo == -INFINITY ? 0.f : exp2f(mo - mm);
      l[g] = l[g] * ca + lo * cb;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] = acc[g][j] * ca + ao[j] * cb;
      m[g] = mm;
    }
  }
  // Merge the warps.
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      s_m[warp][g] = m[g];
      s_l[warp][g] = l[g];
    }
  }
  __syncthreads();
  if (threadIdx.x < G) {
    const int g = threadIdx.x;
    float mm = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, s_m[w][g]);
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      if (s_m[w][g] != -INFINITY) sum += s_l[w][g] * exp2f(s_m[w][g] - mm);
    }
    s_max[g] = mm;
    s_inv_sum[g] = sum > 0.f ? 1.f / sum : 0.f;
  }
  __syncthreads();
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float w = m[g] == -INFINITY ? 0.f : exp2f(m[g] - s_max[g]);
#pragma unroll
      for (int j = 0; j < 8; ++j) atomicAdd(&s_acc[g][d0 + j], acc[g][j] * w);
    }
  }
  __syncthreads();
  float* out = a.out + (static_cast<long long>(i) * a.num_q_heads +
                        static_cast<long long>(kvh) * G) * D;
  for (int j = threadIdx.x; j < G * D; j += kThreads) {
    out[j] = s_acc[j / D][j % D] * s_inv_sum[j / D];
  }
}

template <typename T, int D, int G, bool kPaged>
std::string LaunchDecode(const DecodeArgs& a, float scale_log2,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_kv_heads),
                  static_cast<unsigned>(a.num_requests));
  DecodeKernel<T, D, G, kPaged><<<grid, kThreads, 0, stream>>>(a, scale_log2);
  return Err(cudaGetLastError(), "decode attention launch");
}

template <typename T, int D, bool kPaged>
std::string DispatchGroup(const DecodeArgs& a, float s, cudaStream_t st) {
  switch (a.num_q_heads / a.num_kv_heads) {
    case 1: return LaunchDecode<T, D, 1, kPaged>(a, s, st);
    case 2: return LaunchDecode<T, D, 2, kPaged>(a, s, st);
    case 4: return LaunchDecode<T, D, 4, kPaged>(a, s, st);
    case 8: return LaunchDecode<T, D, 8, kPaged>(a, s, st);
    default: return "CUDA decode attention: GQA group must be 1, 2, 4 or 8";
  }
}

template <typename T, bool kPaged>
std::string DispatchDim(const DecodeArgs& a, float s, cudaStream_t st) {
  switch (a.head_dim) {
    case 64: return DispatchGroup<T, 64, kPaged>(a, s, st);
    case 128: return DispatchGroup<T, 128, kPaged>(a, s, st);
    case 256: return DispatchGroup<T, 256, kPaged>(a, s, st);
    default: return "CUDA decode attention: head_dim must be 64, 128 or 256";
  }
}

bool Aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

std::string CheckVectorLayout(const KvTensor& t, const char* what) {
  if (t.stride_dim != 1 || t.stride_row % 8 != 0 || t.stride_token % 8 != 0 ||
      t.stride_head % 8 != 0 || !Aligned16(t.data)) {
    return std::string("CUDA kernels: ") + what +
           " needs stride_dim 1, other strides multiples of 8 elements and "
           "a 16-byte aligned base";
  }
  return {};
}

// ---- Fill kernels --------------------------------------------------------------

template <typename T, bool kPaged>
__global__ void FillKernel(FillArgs a) {
  const FillItem it = a.items[blockIdx.y];
  const int chunks = a.head_dim / 8;
  const long long per_token =
      static_cast<long long>(a.layers) * 2 * a.kv_heads * chunks;
  const long long total = per_token * it.count;
  for (long long x = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
       x < total; x += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(x % chunks);
    long long r = x / chunks;
    const int h = static_cast<int>(r % a.kv_heads);
    r /= a.kv_heads;
    const int kv = static_cast<int>(r % 2);
    r /= 2;
    const int layer = static_cast<int>(r % a.layers);
    const int t = it.start + static_cast<int>(r / a.layers);
    long long off;
    if constexpr (kPaged) {
      const long long block =
          a.paged.table[static_cast<long long>(it.row) * a.paged.max_blocks +
                        t / kBlockTokens];
      off = block * a.layout.stride_row +
            static_cast<long long>(t % kBlockTokens) * a.layout.stride_token;
    } else {
      off = static_cast<long long>(it.row) * a.layout.stride_row +
            static_cast<long long>(t) * a.layout.stride_token;
    }
    off += h * a.layout.stride_head + c * 8;
    T* p = static_cast<T*>((kv == 0 ? a.k_layers : a.v_layers)[layer]) + off;
    const std::uint32_t key = RowKey(a.seed, it.id, layer, kv, t);
    float f[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      f[j] = ElementValue(key,
                          static_cast<std::uint32_t>(h * a.head_dim + c * 8 + j));
    }
    Store8(p, f);
  }
}

__global__ void FillQKernel(float* q, long long n, std::uint32_t key) {
  for (long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
       j < n; j += static_cast<long long>(gridDim.x) * blockDim.x) {
    q[j] = ElementValue(key, static_cast<std::uint32_t>(j));
  }
}

constexpr int kScatterChunk = 256;
struct ScatterParams {
  std::int32_t idx[kScatterChunk];
  std::int32_t val[kScatterChunk];
  int n;
};
__global__ void ScatterKernel(std::int32_t* dst, ScatterParams p) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j < p.n) dst[p.idx[j]] = p.val[j];
}

}  // namespace

bool Built() { return true; }

std::string DeviceCount(int* count) {
  *count = 0;
  return Err(cudaGetDeviceCount(count), "cudaGetDeviceCount");
}

std::string DeviceName(int device, std::string* name) {
  cudaDeviceProp prop{};
  std::string e = Err(cudaGetDeviceProperties(&prop, device),
                      "cudaGetDeviceProperties");
  if (e.empty()) *name = prop.name;
  return e;
}

std::string SetDevice(int device) {
  return Err(cudaSetDevice(device), "cudaSetDevice");
}

std::string Malloc(void** ptr, std::size_t bytes) {
  return Err(cudaMalloc(ptr, bytes), "cudaMalloc");
}
void Free(void* ptr) {
  if (ptr != nullptr) (void)cudaFree(ptr);
}

std::string CopyToDevice(void* dst, const void* src, std::size_t bytes,
                         void* stream) {
  return Err(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, S(stream)),
             "cudaMemcpyAsync (to device)");
}

std::string CopyToHost(void* dst, const void* src, std::size_t bytes,
                       void* stream) {
  std::string e = Err(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, S(stream)),
      "cudaMemcpyAsync (to host)");
  if (!e.empty()) return e;
  return StreamSync(stream);
}

std::string CopyRowsToHost(void* dst, std::size_t dpitch, const void* src,
                           std::size_t spitch, std::size_t width,
                           std::size_t height, void* stream) {
  std::string e =
      Err(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                            cudaMemcpyDeviceToHost, S(stream)),
          "cudaMemcpy2DAsync (to host)");
  if (!e.empty()) return e;
  return StreamSync(stream);
}

std::string Memset(void* ptr, int byte, std::size_t bytes, void* stream) {
  return Err(cudaMemsetAsync(ptr, byte, bytes, S(stream)), "cudaMemsetAsync");
}

std::string StreamCreate(void** stream) {
  cudaStream_t s = nullptr;
  std::string e = Err(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
                      "cudaStreamCreate");
  *stream = s;
  return e;
}
void StreamDestroy(void* stream) {
  if (stream != nullptr) (void)cudaStreamDestroy(S(stream));
}
std::string StreamSync(void* stream) {
  return Err(cudaStreamSynchronize(S(stream)), "cudaStreamSynchronize");
}

std::string EventCreate(void** event) {
  cudaEvent_t e = nullptr;
  std::string r = Err(cudaEventCreate(&e), "cudaEventCreate");
  *event = e;
  return r;
}
void EventDestroy(void* event) {
  if (event != nullptr) (void)cudaEventDestroy(static_cast<cudaEvent_t>(event));
}
std::string EventRecord(void* event, void* stream) {
  return Err(cudaEventRecord(static_cast<cudaEvent_t>(event), S(stream)),
             "cudaEventRecord");
}
std::string EventElapsedMs(void* start, void* end, float* ms) {
  return Err(cudaEventElapsedTime(ms, static_cast<cudaEvent_t>(start),
                                  static_cast<cudaEvent_t>(end)),
             "cudaEventElapsedTime");
}

std::string DecodeAttention(const DecodeArgs& a, void* stream) {
  std::string bad = ValidateDecodeArgs(a);
  if (!bad.empty()) return bad;
  if (a.k.dtype == DType::kF32) {
    return "CUDA decode attention: fp16 and bf16 only";
  }
  bad = CheckVectorLayout(a.k, "K");
  if (bad.empty()) bad = CheckVectorLayout(a.v, "V");
  if (!bad.empty()) return bad;
  const bool paged = a.paged.table != nullptr;
  if (paged && a.paged.block_tokens != kBlockTokens) {
    return "CUDA decode attention: paged blocks must hold 16 tokens";
  }
  if (a.num_requests == 0) return {};
  if (a.num_requests > 65535) return "CUDA decode attention: > 65535 requests";
  const float s = a.EffectiveScale() * 1.4426950408889634f;  // log2(e)
  const cudaStream_t st = S(stream);
  if (a.k.dtype == DType::kF16) {
    return paged ? DispatchDim<__half, true>(a, s, st)
                 : DispatchDim<__half, false>(a, s, st);
  }
  return paged ? DispatchDim<__nv_bfloat16, true>(a, s, st)
               : DispatchDim<__nv_bfloat16, false>(a, s, st);
}

std::string FillKv(const FillArgs& a, void* stream) {
  if (a.layout.dtype == DType::kF32) return "CUDA fill: fp16 and bf16 only";
  if (a.head_dim % 8 != 0) return "CUDA fill: head_dim must be a multiple of 8";
  KvTensor t = a.layout;
  t.data = reinterpret_cast<const void*>(16);  // Pointers are per layer.
  std::string bad = CheckVectorLayout(t, "the filled tensor");
  if (!bad.empty()) return bad;
  const bool paged = a.paged.table != nullptr;
  if (paged && a.paged.block_tokens != kBlockTokens) {
    return "CUDA fill: paged blocks must hold 16 tokens";
  }
  if (a.num_items == 0 || a.max_count == 0) return {};
  if (a.num_items > 65535) return "CUDA fill: > 65535 items";
  const long long per_token =
      static_cast<long long>(a.layers) * 2 * a.kv_heads * (a.head_dim / 8);
  const long long blocks = (per_token * a.max_count + 255) / 256;
  const dim3 grid(static_cast<unsigned>(blocks < 4096 ? blocks : 4096),
                  static_cast<unsigned>(a.num_items));
  const cudaStream_t st = S(stream);
  if (a.layout.dtype == DType::kF16) {
    if (paged) FillKernel<__half, true><<<grid, 256, 0, st>>>(a);
    else FillKernel<__half, false><<<grid, 256, 0, st>>>(a);
  } else {
    if (paged) FillKernel<__nv_bfloat16, true><<<grid, 256, 0, st>>>(a);
    else FillKernel<__nv_bfloat16, false><<<grid, 256, 0, st>>>(a);
  }
  return Err(cudaGetLastError(), "fill launch");
}

std::string FillQ(float* q, std::int64_t n, std::uint32_t seed,
                  std::uint32_t step, void* stream) {
  if (n <= 0) return {};
  const long long blocks = (n + 255) / 256;
  FillQKernel<<<static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 256, 0,
                S(stream)>>>(q, n, RowKey(seed, step, 0, 0, 0));
  return Err(cudaGetLastError(), "query fill launch");
}

std::string Scatter(std::int32_t* dst, const std::int32_t* idx,
                    const std::int32_t* val, int n, void* stream) {
  for (int start = 0; start < n; start += kScatterChunk) {
    ScatterParams p;
    p.n = n - start < kScatterChunk ? n - start : kScatterChunk;
    for (int j = 0; j < p.n; ++j) {
      p.idx[j] = idx[start + j];
      p.val[j] = val[start + j];
    }
    ScatterKernel<<<(p.n + 127) / 128, 128, 0, S(stream)>>>(dst, p);
    std::string e = Err(cudaGetLastError(), "scatter launch");
    if (!e.empty()) return e;
  }
  return {};
}

}  // namespace vdecode::cuda
