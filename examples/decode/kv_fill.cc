// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "kv_fill.h"

#include <cstring>

#include "half.h"
#include "thread_pool.h"

namespace vdecode {

void CpuFillKv(const FillArgs& a, ThreadPool& pool) {
  // One work item per (fill item, layer, K/V): rows of one tensor.
  const std::int64_t per_item = static_cast<std::int64_t>(a.layers) * 2;
  const std::size_t esz = DTypeBytes(a.layout.dtype);
  pool.ParallelFor(a.num_items * per_item, [&](std::int64_t w, int) {
    const FillItem& item = a.items[w / per_item];
    const int layer = static_cast<int>((w % per_item) / 2);
    const int kv = static_cast<int>(w % 2);
    char* base = static_cast<char*>(kv == 0 ? a.k_layers[layer]
                                            : a.v_layers[layer]);
    for (std::int64_t t = item.start; t < item.start + item.count; ++t) {
      std::int64_t off;
      if (a.paged.table == nullptr) {
        off = item.row * a.layout.stride_row + t * a.layout.stride_token;
      } else {
        const std::int32_t block =
            a.paged.table[static_cast<std::int64_t>(item.row) *
                              a.paged.max_blocks +
                          t / a.paged.block_tokens];
        off = block * a.layout.stride_row +
              (t % a.paged.block_tokens) * a.layout.stride_token;
      }
      const std::uint32_t key = RowKey(a.seed, item.id, layer, kv, t);
      for (int h = 0; h < a.kv_heads; ++h) {
        for (int d = 0; d < a.head_dim; ++d) {
          const float x = ElementValue(
              key, static_cast<std::uint32_t>(h * a.head_dim + d));
          const std::int64_t e =
              off + h * a.layout.stride_head + d * a.layout.stride_dim;
          char* p = base + e * static_cast<std::int64_t>(esz);
          switch (a.layout.dtype) {
            case DType::kF32: std::memcpy(p, &x, sizeof(x)); break;
            case DType::kF16: {
              const std::uint16_t v = FloatToHalf(x);
              std::memcpy(p, &v, sizeof(v));
              break;
            }
            case DType::kBF16: {
              const std::uint16_t v = FloatToBf16(x);
              std::memcpy(p, &v, sizeof(v));
              break;
            }
          }
        }
      }
    }
  });
}

void CpuFillQ(float* q, std::int64_t n, std::uint32_t seed,
              std::uint32_t step) {
  const std::uint32_t key = RowKey(seed, step, 0, 0, 0);
  for (std::int64_t j = 0; j < n; ++j) {
    q[j] = ElementValue(key, static_cast<std::uint32_t>(j));
  }
}

}  // namespace vdecode
