// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "half.h"

namespace vdecode {

const float* HalfToFloatTable() {
  static const std::unique_ptr<float[]> table = [] {
    std::unique_ptr<float[]> t(new float[65536]);
    for (std::uint32_t h = 0; h < 65536; ++h) {
      t[h] = HalfToFloat(static_cast<std::uint16_t>(h));
    }
    return t;
  }();
  return table.get();
}

float DecodeArgs::EffectiveScale() const {
  return scale != 0 ? scale
                    : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

std::string ValidateDecodeArgs(const DecodeArgs& a) {
  if (a.num_q_heads <= 0 || a.num_kv_heads <= 0 || a.head_dim <= 0) {
    return "num_q_heads, num_kv_heads and head_dim must be positive";
  }
  if (a.num_q_heads % a.num_kv_heads != 0) {
    return "num_q_heads must be a multiple of num_kv_heads (GQA)";
  }
  if (a.k.data == nullptr || a.v.data == nullptr) return "K or V is null";
  if (a.k.dtype != a.v.dtype) return "K and V differ in dtype";
  if (a.num_requests < 0) return "num_requests < 0";
  if (a.num_requests > 0 && (a.rows == nullptr || a.lengths == nullptr ||
                             a.q == nullptr || a.out == nullptr)) {
    return "rows, lengths, q or out is null";
  }
  if (a.paged.table != nullptr &&
      (a.paged.max_blocks <= 0 || a.paged.block_tokens <= 0)) {
    return "paged: max_blocks and block_tokens must be positive";
  }
  return {};
}

namespace {

// Converts `n` elements at `p` (stride `stride` elements) to floats.
template <DType kType>
inline void LoadRow(const char* p, std::int64_t stride, int n, float* dst) {
  if constexpr (kType == DType::kF32) {
    const float* f = reinterpret_cast<const float*>(p);
    for (int d = 0; d < n; ++d) dst[d] = f[d * stride];
  } else if constexpr (kType == DType::kBF16) {
    const std::uint16_t* h = reinterpret_cast<const std::uint16_t*>(p);
    for (int d = 0; d < n; ++d) dst[d] = Bf16ToFloat(h[d * stride]);
  } else {
    const float* table = HalfToFloatTable();
    const std::uint16_t* h = reinterpret_cast<const std::uint16_t*>(p);
    for (int d = 0; d < n; ++d) dst[d] = table[h[d * stride]];
  }
}

// Byte offset of (row, token) of a request, before the head and dim terms.
inline std::int64_t RowOffset(const KvTensor& t, const BlockTable& pt,
                              std::int32_t row, std::int64_t token) {
  if (pt.table == nullptr) {
    return row * t.stride_row + token * t.stride_token;
  }
  const std::int32_t block =
      pt.table[static_cast<std::int64_t>(row) * pt.max_blocks +
               token / pt.block_tokens];
  return block * t.stride_row + (token % pt.block_tokens) * t.stride_token;
}

constexpr int kTile = 8;  // Tokens per tile.

struct Scratch {
  std::vector<float> scores;  // [group][tokens]
  std::vector<float> kt;      // [head_dim][kTile]: a K tile, transposed
  std::vector<float> vt;      // [kTile][head_dim]: a V tile
  std::vector<float> acc;     // [group][head_dim]
  std::vector<float> q;       // [group][head_dim], scaled
};

// The two arithmetic loops, kept free of conversions and strides so the
// compiler vectorizes them; cloned for AVX2+FMA where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VDECODE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VDECODE_CLONES
#endif

// scores[g * stride + u] = q[g] . kt[:, u] for u < kTile.
VDECODE_CLONES
void ScoreTile(const float* q, const float* kt, int group, int dim,
               float* scores, std::int64_t stride) {
  for (int g = 0; g < group; ++g) {
    float s[kTile] = {};
    const float* qg = q + g * dim;
    for (int d = 0; d < dim; ++d) {
      const float qd = qg[d];
      const float* kd = kt + d * kTile;
      for (int u = 0; u < kTile; ++u) s[u] += qd * kd[u];
    }
    for (int u = 0; u < kTile; ++u) scores[g * stride + u] = s[u];
  }
}

// acc[g] += sum_u p[g * stride + u] * vt[u] for u < n.
VDECODE_CLONES
void AccumulateTile(const float* p, std::int64_t stride, const float* vt,
                    int n, int group, int dim, float* acc) {
  for (int g = 0; g < group; ++g) {
    float* ag = acc + g * dim;
    for (int u = 0; u < n; ++u) {
      const float pu = p[g * stride + u];
      const float* vu = vt + u * dim;
      for (int d = 0; d < dim; ++d) ag[d] += pu * vu[d];
    }
  }
}

// Request i, KV heads [kvh, kvh + heads): each tile of tokens is read for
// all those heads before the next tile, so a token's row (the heads side by
// side) is touched once per pass, not once per head: on 4 KiB pages a
// token-major view puts every token of a layer on its own page.
template <DType kType>
void OneItem(const DecodeArgs& a, int i, int kvh, int heads, Scratch& s) {
  const int per_head = a.num_q_heads / a.num_kv_heads;
  const int group = per_head * heads;  // Query heads of this item.
  const int dim = a.head_dim;
  const std::int64_t len = a.lengths[i];
  const std::int32_t row = a.rows[i];
  const std::int64_t esz = static_cast<std::int64_t>(DTypeBytes(kType));
  const float scale = a.EffectiveScale();
  float* out = a.out + (static_cast<std::int64_t>(i) * a.num_q_heads +
                        static_cast<std::int64_t>(kvh) * per_head) * dim;
  if (len <= 0) {
    std::fill(out, out + group * dim, 0.0f);
    return;
  }
  // Scores are kept per tile-padded length so a tile never overruns.
  const std::int64_t padded = (len + kTile - 1) / kTile * kTile;
  s.scores.assign(static_cast<std::size_t>(group * padded), 0.0f);
  s.kt.resize(static_cast<std::size_t>(dim * kTile));
  s.vt.resize(static_cast<std::size_t>(dim * kTile));
  s.acc.assign(static_cast<std::size_t>(group * dim), 0.0f);
  s.q.resize(static_cast<std::size_t>(group * dim));
  const float* q = a.q + (static_cast<std::int64_t>(i) * a.num_q_heads +
                          static_cast<std::int64_t>(kvh) * per_head) * dim;
  for (int j = 0; j < group * dim; ++j) s.q[j] = q[j] * scale;

  const char* kbase = static_cast<const char*>(a.k.data);
  const char* vbase = static_cast<const char*>(a.v.data);

  float rowbuf[1024];
  float* rowp = dim <= 1024 ? rowbuf : nullptr;
  std::vector<float> big;
  if (rowp == nullptr) {
    big.resize(static_cast<std::size_t>(dim));
    rowp = big.data();
  }
  for (std::int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int n = static_cast<int>(std::min<std::int64_t>(kTile, len - t0));
    for (int h = 0; h < heads; ++h) {
      const std::int64_t khead = (kvh + h) * a.k.stride_head;
      for (int u = 0; u < kTile; ++u) {
        if (u < n) {
          const std::int64_t off = RowOffset(a.k, a.paged, row, t0 + u) + khead;
          LoadRow<kType>(kbase + off * esz, a.k.stride_dim, dim, rowp);
        } else {
          std::fill(rowp, rowp + dim, 0.0f);
        }
        for (int d = 0; d < dim; ++d) s.kt[d * kTile + u] = rowp[d];
      }
      ScoreTile(s.q.data() + h * per_head * dim, s.kt.data(), per_head, dim,
                s.scores.data() + h * per_head * padded + t0, padded);
    }
  }
  std::vector<float> inv_sum(static_cast<std::size_t>(group));
  for (int g = 0; g < group; ++g) {
    float* sc = s.scores.data() + g * padded;
    const float mx = *std::max_element(sc, sc + len);
    float sum = 0;
    for (std::int64_t t = 0; t < len; ++t) {
      sc[t] = std::exp(sc[t] - mx);
      sum += sc[t];
    }
    inv_sum[g] = 1.0f / sum;
  }
  for (std::int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int n = static_cast<int>(std::min<std::int64_t>(kTile, len - t0));
    for (int h = 0; h < heads; ++h) {
      const std::int64_t vhead = (kvh + h) * a.v.stride_head;
      for (int u = 0; u < n; ++u) {
        const std::int64_t off = RowOffset(a.v, a.paged, row, t0 + u) + vhead;
        LoadRow<kType>(vbase + off * esz, a.v.stride_dim, dim,
                       s.vt.data() + u * dim);
      }
      AccumulateTile(s.scores.data() + h * per_head * padded + t0, padded,
                     s.vt.data(), n, per_head, dim,
                     s.acc.data() + h * per_head * dim);
    }
  }
  for (int g = 0; g < group; ++g) {
    for (int d = 0; d < dim; ++d) {
      out[g * dim + d] = s.acc[g * dim + d] * inv_sum[g];
    }
  }
}

}  // namespace

std::string CpuDecodeAttention(const DecodeArgs& a, ThreadPool& pool) {
  std::string bad = ValidateDecodeArgs(a);
  if (!bad.empty()) return bad;
  std::vector<Scratch> scratch(static_cast<std::size_t>(pool.size()));
  // Items of whole requests (all KV heads), split into head ranges only
  // when there are too few requests to keep every thread busy.
  const int workers = std::max(1, pool.size());
  const int splits = static_cast<int>(std::clamp<std::int64_t>(
      (2 * workers + std::max(1, a.num_requests) - 1) / std::max(1, a.num_requests), 1,
      a.num_kv_heads));
  const int heads_per_item = (a.num_kv_heads + splits - 1) / splits;
  const int chunks = (a.num_kv_heads + heads_per_item - 1) / heads_per_item;
  const std::int64_t items = static_cast<std::int64_t>(a.num_requests) * chunks;
  pool.ParallelFor(items, [&](std::int64_t item, int worker) {
    const int i = static_cast<int>(item / chunks);
    const int kvh = static_cast<int>(item % chunks) * heads_per_item;
    const int heads = std::min(heads_per_item, a.num_kv_heads - kvh);
    Scratch& s = scratch[static_cast<std::size_t>(worker)];
    switch (a.k.dtype) {
      case DType::kF16: OneItem<DType::kF16>(a, i, kvh, heads, s); break;
      case DType::kBF16: OneItem<DType::kBF16>(a, i, kvh, heads, s); break;
      case DType::kF32: OneItem<DType::kF32>(a, i, kvh, heads, s); break;
    }
  });
  return {};
}

namespace {
double LoadElement(const KvTensor& t, std::int64_t elem) {
  const char* p = static_cast<const char*>(t.data) +
                  elem * static_cast<std::int64_t>(DTypeBytes(t.dtype));
  std::uint16_t h;
  switch (t.dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, p, sizeof(f));
      return f;
    }
    case DType::kBF16:
      std::memcpy(&h, p, sizeof(h));
      return Bf16ToFloat(h);
    case DType::kF16:
      std::memcpy(&h, p, sizeof(h));
      return HalfToFloat(h);
  }
  return std::numeric_limits<double>::quiet_NaN();
}
}  // namespace

void ReferenceDecodeAttention(const DecodeArgs& a, int i,
                              std::vector<double>* out) {
  const int group = a.num_q_heads / a.num_kv_heads;
  const int dim = a.head_dim;
  const std::int64_t len = a.lengths[i];
  const std::int32_t row = a.rows[i];
  const double scale = a.scale != 0 ? a.scale : 1.0 / std::sqrt(double{1.0} * dim);
  out->assign(static_cast<std::size_t>(a.num_q_heads * dim), 0.0);
  std::vector<double> scores(static_cast<std::size_t>(std::max<std::int64_t>(len, 1)));
  for (int qh = 0; qh < a.num_q_heads; ++qh) {
    const int kvh = qh / group;
    const float* q = a.q + (static_cast<std::int64_t>(i) * a.num_q_heads + qh) * dim;
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t t = 0; t < len; ++t) {
      const std::int64_t base =
          RowOffset(a.k, a.paged, row, t) + kvh * a.k.stride_head;
      double dot = 0;
      for (int d = 0; d < dim; ++d) {
        dot += static_cast<double>(q[d]) * LoadElement(a.k, base + d * a.k.stride_dim);
      }
      scores[static_cast<std::size_t>(t)] = dot * scale;
      mx = std::max(mx, dot * scale);
    }
    double sum = 0;
    for (std::int64_t t = 0; t < len; ++t) {
      scores[static_cast<std::size_t>(t)] = std::exp(scores[static_cast<std::size_t>(t)] - mx);
      sum += scores[static_cast<std::size_t>(t)];
    }
    double* o = out->data() + qh * dim;
    for (std::int64_t t = 0; t < len; ++t) {
      const std::int64_t base =
          RowOffset(a.v, a.paged, row, t) + kvh * a.v.stride_head;
      const double p = scores[static_cast<std::size_t>(t)] / sum;
      for (int d = 0; d < dim; ++d) {
        o[d] += p * LoadElement(a.v, base + d * a.v.stride_dim);
      }
    }
  }
}

double RelativeError(const float* out, const double* ref, std::size_t n) {
  double diff = 0;
  double norm = 0;
  for (std::size_t j = 0; j < n; ++j) {
    if (!std::isfinite(out[j])) return std::numeric_limits<double>::infinity();
    const double e = static_cast<double>(out[j]) - ref[j];
    diff += e * e;
    norm += ref[j] * ref[j];
  }
  if (norm == 0) return diff == 0 ? 0 : std::numeric_limits<double>::infinity();
  return std::sqrt(diff / norm);
}

void Poison(float* out, std::size_t n) {
  std::fill(out, out + n, std::numeric_limits<float>::quiet_NaN());
}

}  // namespace vdecode
