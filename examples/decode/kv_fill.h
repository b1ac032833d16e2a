// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Writing K/V rows: the values a prefill or a decode step stores are a hash
// of (seed, request, layer, K or V, token, element), in [-1, 1), computed the
// same way on the CPU and in the CUDA fill kernel, so any row can be
// regenerated. FillArgs names where every layer's K and V live (the same
// strides for every layer) and which rows of which requests to write.
#ifndef VATTN_EXAMPLES_DECODE_KV_FILL_H_
#define VATTN_EXAMPLES_DECODE_KV_FILL_H_

#include <cstdint>
#include <string>

#include "attention.h"

#if defined(__CUDACC__)
#define VDECODE_HD __host__ __device__
#else
#define VDECODE_HD
#endif

namespace vdecode {

VDECODE_HD inline std::uint32_t Fmix32(std::uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// The key of one row of one layer's K (kv = 0) or V (kv = 1).
VDECODE_HD inline std::uint32_t RowKey(std::uint32_t seed, std::uint32_t id,
                                       int layer, int kv,
                                       std::int64_t token) {
  std::uint32_t h = Fmix32(seed ^ (id * 0x9e3779b9u));
  h = Fmix32(h ^ (static_cast<std::uint32_t>(layer * 2 + kv) * 0x632be5abu));
  return Fmix32(h ^ (static_cast<std::uint32_t>(token) * 0x85ebca77u));
}

// Element `elem` (head * head_dim + d) of a row: uniform in [-1, 1).
VDECODE_HD inline float ElementValue(std::uint32_t row_key,
                                     std::uint32_t elem) {
  const std::uint32_t h = Fmix32(row_key ^ (elem * 0x27d4eb2fu));
  return static_cast<float>(h >> 8) * (1.0f / 8388608.0f) - 1.0f;
}

// Tokens [start, start + count) of request `id`, stored at `row` (a slot, or
// a block-table row when paged).
struct FillItem {
  std::int32_t row = 0;
  std::int32_t start = 0;
  std::int32_t count = 0;
  std::uint32_t id = 0;
};

struct FillArgs {
  // [layers] pointers to each layer's K and V data (host arrays of host
  // pointers for the CPU; device arrays of device pointers for CUDA).
  void* const* k_layers = nullptr;
  void* const* v_layers = nullptr;
  KvTensor layout;  // dtype and strides; data is ignored.
  BlockTable paged;
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  const FillItem* items = nullptr;
  int num_items = 0;
  int max_count = 0;  // Largest items[i].count (sizes the CUDA grid).
  std::uint32_t seed = 0;
};

class ThreadPool;
// Writes every item's rows on the CPU (host addresses).
void CpuFillKv(const FillArgs& args, ThreadPool& pool);

// The query values of a step: q[j] = ElementValue(RowKey(seed, step, 0, 0,
// 0), j).
void CpuFillQ(float* q, std::int64_t n, std::uint32_t seed,
              std::uint32_t step);

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_KV_FILL_H_
