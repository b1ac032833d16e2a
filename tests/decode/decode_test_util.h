// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Host-side K/V tensors in the three layouts the decode kernels meet
// (vattn's token-major and layer-major views, and the paged pool), filled
// with random values, for the CPU and GPU kernel tests.
#ifndef VATTN_TESTS_DECODE_DECODE_TEST_UTIL_H_
#define VATTN_TESTS_DECODE_DECODE_TEST_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention.h"
#include "half.h"

namespace vdecode::testing {

enum class Layout { kTokenMajor, kLayerMajor, kPaged };
inline const char* LayoutName(Layout l) {
  switch (l) {
    case Layout::kTokenMajor: return "token_major";
    case Layout::kLayerMajor: return "layer_major";
    case Layout::kPaged: return "paged";
  }
  return "?";
}

struct KvCase {
  DType dtype = DType::kF16;
  Layout layout = Layout::kTokenMajor;
  int q_heads = 8;
  int kv_heads = 2;
  int head_dim = 64;
  std::vector<int> lengths = {1, 7, 16, 33, 200};
  float q_scale = 1.0f;  // Larger: peakier softmax.
  std::uint32_t seed = 1;
};

// Owns the buffers; args() describes them (host addresses).
class HostKv {
 public:
  static constexpr int kLayers = 3;  // Token-major: the view is of layer 1.
  static constexpr int kBlockTokens = 16;

  explicit HostKv(const KvCase& c) : c_(c) {
    std::mt19937 rng(c.seed);
    const int n = static_cast<int>(c.lengths.size());
    const int max_len = *std::max_element(c.lengths.begin(), c.lengths.end());
    const std::int64_t row_elems = static_cast<std::int64_t>(c.kv_heads) * c.head_dim;
    num_rows_ = n + 2;
    rows_.resize(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) rows_[static_cast<std::size_t>(i)] = (i * 7 + 3) % num_rows_;
    KvTensor t;
    t.dtype = c.dtype;
    t.stride_head = c.head_dim;
    t.stride_dim = 1;
    std::int64_t k_off = 0, v_off = 0, elems = 0;
    switch (c.layout) {
      case Layout::kTokenMajor:
        t.stride_token = kLayers * 2 * row_elems;
        t.stride_row = t.stride_token * max_len;
        elems = t.stride_row * num_rows_;
        k_off = (1 * 2 + 0) * row_elems;
        v_off = (1 * 2 + 1) * row_elems;
        break;
      case Layout::kLayerMajor:
        t.stride_token = row_elems;
        t.stride_row = row_elems * max_len;
        elems = 2 * t.stride_row * num_rows_;
        v_off = t.stride_row * num_rows_;
        break;
      case Layout::kPaged: {
        t.stride_token = row_elems;
        t.stride_row = row_elems * kBlockTokens;
        max_blocks_ = (max_len + kBlockTokens - 1) / kBlockTokens;
        const int blocks = max_blocks_ * num_rows_;
        elems = 2 * t.stride_row * blocks;
        v_off = t.stride_row * blocks;
        std::vector<std::int32_t> perm(static_cast<std::size_t>(blocks));
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        table_ = perm;  // Row r's blocks: table_[r * max_blocks_ ...].
        break;
      }
    }
    elem_bytes_ = DTypeBytes(c.dtype);
    buf_.resize(static_cast<std::size_t>(elems) * elem_bytes_);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    for (std::int64_t e = 0; e < elems; ++e) Store(e, u(rng));
    k_ = t;
    v_ = t;
    k_off_ = k_off;
    v_off_ = v_off;
    q_.resize(static_cast<std::size_t>(n * c.q_heads * c.head_dim));
    std::uniform_real_distribution<float> uq(-c.q_scale, c.q_scale);
    for (float& x : q_) x = uq(rng);
    out_.assign(q_.size(), 0.0f);
  }

  // Arguments with every pointer relative to `base` (the host buffer, or a
  // device copy of it) and `table` / `rows` / `lengths` / `q` / `out`.
  DecodeArgs ArgsAt(const void* base, const std::int32_t* table,
                    const std::int32_t* rows, const std::int32_t* lengths,
                    const float* q, float* out) const {
    DecodeArgs a;
    a.num_q_heads = c_.q_heads;
    a.num_kv_heads = c_.kv_heads;
    a.head_dim = c_.head_dim;
    a.k = k_;
    a.v = v_;
    a.k.data = static_cast<const char*>(base) + k_off_ * static_cast<std::int64_t>(elem_bytes_);
    a.v.data = static_cast<const char*>(base) + v_off_ * static_cast<std::int64_t>(elem_bytes_);
    if (c_.layout == Layout::kPaged) {
      a.paged.table = table;
      a.paged.max_blocks = max_blocks_;
      a.paged.block_tokens = kBlockTokens;
    }
    a.num_requests = static_cast<int>(c_.lengths.size());
    a.rows = rows;
    a.lengths = lengths;
    a.q = q;
    a.out = out;
    return a;
  }
  DecodeArgs HostArgs() {
    return ArgsAt(buf_.data(), table_.data(), rows_.data(), c_.lengths.data(),
                  q_.data(), out_.data());
  }

  const std::vector<char>& buffer() const { return buf_; }
  const std::vector<std::int32_t>& table() const { return table_; }
  const std::vector<std::int32_t>& rows() const { return rows_; }
  const std::vector<std::int32_t>& lengths() const { return c_.lengths; }
  const std::vector<float>& q() const { return q_; }
  std::vector<float>& out() { return out_; }

 private:
  void Store(std::int64_t e, float x) {
    char* p = buf_.data() + e * static_cast<std::int64_t>(elem_bytes_);
    switch (c_.dtype) {
      case DType::kF32: std::memcpy(p, &x, 4); break;
      case DType::kF16: {
        const std::uint16_t h = FloatToHalf(x);
        std::memcpy(p, &h, 2);
        break;
      }
      case DType::kBF16: {
        const std::uint16_t h = FloatToBf16(x);
        std::memcpy(p, &h, 2);
        break;
      }
    }
  }

  KvCase c_;
  std::size_t elem_bytes_ = 2;
  int num_rows_ = 0;
  int max_blocks_ = 0;
  std::vector<char> buf_;
  std::vector<std::int32_t> table_;
  std::vector<std::int32_t> rows_;
  std::vector<float> q_;
  std::vector<float> out_;
  KvTensor k_, v_;
  std::int64_t k_off_ = 0, v_off_ = 0;
};

inline double ToleranceFor(DType t) {
  switch (t) {
    case DType::kF16: return 2e-3;
    case DType::kBF16: return 1e-2;
    case DType::kF32: return 1e-4;
  }
  return 1e-2;
}

}  // namespace vdecode::testing

#endif  // VATTN_TESTS_DECODE_DECODE_TEST_UTIL_H_
