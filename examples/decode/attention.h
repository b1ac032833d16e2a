// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The arguments of a decode-attention kernel: one query token per request,
// every query head, softmax over the request's whole context. Nothing here
// knows about vattn: K and V are strided 4-D tensors, exactly what any
// non-paged kernel takes (a contiguous batch tensor, a slice of one, or a
// vattn view), and the paged variant differs only in a block table.
//
// Element (r, t, h, d) of K or V, for request i with row r = rows[i]:
//   contiguous: data + (r*stride_row + t*stride_token + h*stride_head +
//               d*stride_dim) * DTypeBytes(dtype)
//   paged:      block = block_table[r*max_blocks + t/block_tokens];
//               data + (block*stride_row + (t%block_tokens)*stride_token +
//               h*stride_head + d*stride_dim) * DTypeBytes(dtype)
// Query head q reads KV head q / (num_q_heads / num_kv_heads) (GQA).
#ifndef VATTN_EXAMPLES_DECODE_ATTENTION_H_
#define VATTN_EXAMPLES_DECODE_ATTENTION_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace vdecode {

enum class DType : int { kF16 = 0, kBF16, kF32 };
inline std::size_t DTypeBytes(DType t) { return t == DType::kF32 ? 4 : 2; }
inline const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF16: return "fp16";
    case DType::kBF16: return "bf16";
    case DType::kF32: return "fp32";
  }
  return "?";
}

// A strided [rows][tokens][kv_heads][head_dim] tensor (strides in elements).
// `data` is a host address for CPU kernels, a device address for CUDA ones.
struct KvTensor {
  const void* data = nullptr;
  DType dtype = DType::kF16;
  std::int64_t stride_row = 0;
  std::int64_t stride_token = 0;
  std::int64_t stride_head = 0;
  std::int64_t stride_dim = 1;
};

// The paged indirection: a request's token t lives in block
// table[row * max_blocks + t / block_tokens] at offset t % block_tokens.
struct BlockTable {
  const std::int32_t* table = nullptr;  // nullptr: contiguous rows.
  int max_blocks = 0;                   // Table entries per row.
  int block_tokens = 16;
};

struct DecodeArgs {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  float scale = 0;  // Softmax scale; 0 means 1/sqrt(head_dim).
  KvTensor k;
  KvTensor v;
  BlockTable paged;
  int num_requests = 0;
  const std::int32_t* rows = nullptr;     // [num_requests]: row (or table row).
  const std::int32_t* lengths = nullptr;  // [num_requests]: context tokens.
  const float* q = nullptr;  // [num_requests][num_q_heads][head_dim], packed.
  float* out = nullptr;      // Same shape as q.

  float EffectiveScale() const;
};

// Checks the shape and pointers of `args` (host or device addresses alike).
// Returns an empty string when they are usable, else what is wrong.
std::string ValidateDecodeArgs(const DecodeArgs& args);

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_ATTENTION_H_
