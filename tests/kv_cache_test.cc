// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Per-behaviour tests of the KV cache on the Host backend, for both layouts
// and several dtypes and shapes: views (shapes, strides, no overlap), data
// that survives growth and other slots' reclamation, the extent policy, the
// budget, deferred reclamation, zero_on_reuse, fences, bad input, teardown,
// several caches side by side, pre-created handles and threads.
//
// The Host backend runs with a 64 KiB granularity so that extents are small
// and every case touches little memory. Every element a test writes gets a
// value derived from its full coordinates (request tag, slot, token, layer,
// K/V, head, dim), so a mapping that overlapped another, or lost its data,
// shows up as a mismatch when the slot is read back.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"
#include "vattn/fault_injection.h"
#include "vattn/kv_cache.h"
#include "vattn/options.h"
#include "vattn/stats.h"

namespace vattn {
namespace {

constexpr std::size_t kGranularity = std::size_t{64} << 10;
constexpr std::int64_t kGran = static_cast<std::int64_t>(kGranularity);

std::int64_t RoundUp(std::int64_t x, std::int64_t to) {
  return (x + to - 1) / to * to;
}

// ---------------------------------------------------------------------------
// Shapes.

struct Shape {
  const char* name;
  DType dtype;
  int layers;
  int heads;
  int dim;
  std::int64_t max_tokens;
};

// Small max_tokens keep each case fast; the shapes cover every dtype size,
// rows that do not divide the granularity (so tokens straddle extents) and
// a Llama-like 32 x 8 x 128 fp16 model.
const Shape kShapes[] = {
    {"fp16_32x8x128", DType::kFloat16, 32, 8, 128, 12},
    {"bf16_5x3x64", DType::kBFloat16, 5, 3, 64, 120},
    {"fp32_2x2x16", DType::kFloat32, 2, 2, 16, 300},
    {"int8_4x4x32", DType::kInt8, 4, 4, 32, 200},
    {"fp8_1x1x8", DType::kFloat8E4M3, 1, 1, 8, 9000},
};

struct Param {
  Layout layout;
  Shape shape;
};

std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  return std::string(info.param.layout == Layout::kTokenMajor ? "TokenMajor"
                                                              : "LayerMajor") +
         "_" + info.param.shape.name;
}

std::vector<Param> AllParams() {
  std::vector<Param> out;
  for (Layout layout : {Layout::kTokenMajor, Layout::kLayerMajor}) {
    for (const Shape& shape : kShapes) out.push_back({layout, shape});
  }
  return out;
}

// Geometry the documentation promises, computed independently of the cache.
struct Geometry {
  std::int64_t elem = 0;         // Bytes per element.
  std::int64_t row = 0;          // Elements per token per layer per K/V.
  int regions = 0;               // Separately mapped tensors per slot.
  std::int64_t token_bytes = 0;  // Bytes per token per region.

  Geometry(const Shape& s, Layout layout) {
    elem = static_cast<std::int64_t>(DTypeSize(s.dtype));
    row = static_cast<std::int64_t>(s.heads) * s.dim;
    if (layout == Layout::kTokenMajor) {
      regions = 1;
      token_bytes = row * 2 * s.layers * elem;
    } else {
      regions = 2 * s.layers;
      token_bytes = row * elem;
    }
  }
  // Physical bytes per region that back `tokens` (one prefill extent).
  std::int64_t Extent(std::int64_t tokens) const {
    return RoundUp(tokens * token_bytes, kGran);
  }
  // The most tokens that fit in one granule per region (at least 1).
  std::int64_t TokensPerGranule() const {
    return std::max<std::int64_t>(1, kGran / token_bytes);
  }
};

KVCacheOptions MakeOptions(const Shape& s, Layout layout, int max_slots) {
  KVCacheOptions o;
  o.num_layers = s.layers;
  o.num_kv_heads = s.heads;
  o.head_dim = s.dim;
  o.dtype = s.dtype;
  o.max_slots = max_slots;
  o.max_tokens = s.max_tokens;
  o.layout = layout;
  return o;
}

std::shared_ptr<Backend> MustHost(std::size_t limit = 0,
                                  std::size_t granularity = kGranularity) {
  HostBackendOptions ho;
  ho.granularity = granularity;
  ho.physical_limit_bytes = limit;
  absl::StatusOr<std::shared_ptr<Backend>> b = MakeHostBackend(ho);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? *b : nullptr;
}

// ---------------------------------------------------------------------------
// Data patterns.

std::uint64_t Mix(std::uint64_t x) {  // splitmix64's finalizer (a bijection)
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// The value of one element, from all of its coordinates.
std::uint64_t Pattern(std::uint32_t tag, int slot, std::int64_t t, int layer,
                      int kv, std::int64_t h, std::int64_t d) {
  std::uint64_t key = tag;
  key = key * 1031 + static_cast<std::uint64_t>(slot);
  key = key * 1000003 + static_cast<std::uint64_t>(t);
  key = key * 257 + static_cast<std::uint64_t>(layer);
  key = key * 2 + static_cast<std::uint64_t>(kv);
  key = key * 4099 + static_cast<std::uint64_t>(h);
  key = key * 4099 + static_cast<std::uint64_t>(d);
  std::uint64_t v = Mix(key);
  if (v == 0) v = 1;
  return v;
}

void Store(std::uintptr_t addr, std::uint64_t value, std::size_t bytes) {
  std::memcpy(reinterpret_cast<void*>(addr), &value, bytes);
}
std::uint64_t Load(std::uintptr_t addr, std::size_t bytes) {
  std::uint64_t v = 0;
  std::memcpy(&v, reinterpret_cast<const void*>(addr), bytes);
  return v;
}
std::uint64_t Truncate(std::uint64_t v, std::size_t bytes) {
  return bytes >= 8 ? v : v & ((std::uint64_t{1} << (8 * bytes)) - 1);
}

// Writes tokens [t0, t1) of the slot, every layer, K and V.
void WriteTokens(const KVCache& cache, int slot, std::int64_t t0,
                 std::int64_t t1, std::uint32_t tag) {
  const KVCacheOptions& o = cache.options();
  const std::size_t e = DTypeSize(o.dtype);
  for (int l = 0; l < o.num_layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const TensorView v = kv == 0 ? cache.K(l) : cache.V(l);
      for (std::int64_t t = t0; t < t1; ++t) {
        for (std::int64_t h = 0; h < o.num_kv_heads; ++h) {
          for (std::int64_t d = 0; d < o.head_dim; ++d) {
            Store(v.ElementAddress(slot, t, h, d),
                  Pattern(tag, slot, t, l, kv, h, d), e);
          }
        }
      }
    }
  }
}

// Checks tokens [t0, t1) of the slot against WriteTokens(tag), or (zero)
// that they read as zeros.
::testing::AssertionResult CheckTokens(const KVCache& cache, int slot,
                                       std::int64_t t0, std::int64_t t1,
                                       std::uint32_t tag, bool zero = false) {
  const KVCacheOptions& o = cache.options();
  const std::size_t e = DTypeSize(o.dtype);
  std::int64_t bad = 0;
  std::string first;
  for (int l = 0; l < o.num_layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const TensorView v = kv == 0 ? cache.K(l) : cache.V(l);
      for (std::int64_t t = t0; t < t1; ++t) {
        for (std::int64_t h = 0; h < o.num_kv_heads; ++h) {
          for (std::int64_t d = 0; d < o.head_dim; ++d) {
            const std::uint64_t want =
                zero ? 0 : Truncate(Pattern(tag, slot, t, l, kv, h, d), e);
            const std::uint64_t got = Load(v.ElementAddress(slot, t, h, d), e);
            if (got != want) {
              if (bad++ == 0) {
                first = "slot " + std::to_string(slot) + " token " +
                        std::to_string(t) + " layer " + std::to_string(l) +
                        (kv == 0 ? " K" : " V") + " head " +
                        std::to_string(h) + " dim " + std::to_string(d) +
                        ": got " + std::to_string(got) + ", want " +
                        std::to_string(want);
              }
            }
          }
        }
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " element(s) wrong in tokens [" << t0 << ", " << t1
         << "), first at " << first;
}

// True when any element of the range is non-zero.
bool AnyNonZero(const KVCache& cache, int slot, std::int64_t t0,
                std::int64_t t1) {
  return !CheckTokens(cache, slot, t0, t1, 0, /*zero=*/true);
}

// ---------------------------------------------------------------------------
// Snapshots and consistency.

#define VATTN_CACHE_STATS_FIELDS(X)                                         \
  X(physical_bytes) X(pooled_bytes) X(mapped_bytes) X(logical_bytes)        \
  X(budget_bytes) X(peak_physical_bytes) X(active_slots)                    \
  X(idle_slots_with_memory) X(create_calls) X(destroy_calls) X(map_calls)   \
  X(unmap_calls) X(grow_calls) X(extents_mapped) X(reuse_hits)              \
  X(reclaimed_bytes) X(reclaimed_extents) X(fence_waits) X(zeroed_bytes)    \
  X(step_calls) X(step_misses) X(step_map_nanos) X(background_extents)      \
  X(background_creates)

::testing::AssertionResult SameStats(const CacheStats& a,
                                     const CacheStats& b) {
  std::string diff;
#define VATTN_CMP_FIELD(f)                                                  \
  if (a.f != b.f) {                                                         \
    diff += std::string(" " #f ": ") + std::to_string(a.f) + " -> " +       \
            std::to_string(b.f);                                            \
  }
  VATTN_CACHE_STATS_FIELDS(VATTN_CMP_FIELD)
#undef VATTN_CMP_FIELD
  if (diff.empty()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "stats changed:" << diff;
}

std::string Describe(const SlotInfo& s) {
  return "{active " + std::to_string(s.active) + ", length " +
         std::to_string(s.length) + ", backed " +
         std::to_string(s.backed_tokens) + ", mapped " +
         std::to_string(s.mapped_bytes) + ", extents " +
         std::to_string(s.extents) + "}";
}

bool SameSlot(const SlotInfo& a, const SlotInfo& b) {
  return a.active == b.active && a.length == b.length &&
         a.backed_tokens == b.backed_tokens &&
         a.mapped_bytes == b.mapped_bytes && a.extents == b.extents;
}

SlotInfo Slot(const KVCache& cache, int slot) {
  absl::StatusOr<SlotInfo> info = cache.GetSlot(slot);
  EXPECT_TRUE(info.ok()) << info.status();
  return info.ok() ? *info : SlotInfo{};
}

// Everything observable about a cache and its backend.
struct Snapshot {
  CacheStats stats;
  std::vector<SlotInfo> slots;
  BackendCounters counters;

  static Snapshot Of(const KVCache& cache) {
    Snapshot s;
    s.stats = cache.Stats();
    for (int i = 0; i < cache.options().max_slots; ++i) {
      s.slots.push_back(Slot(cache, i));
    }
    s.counters = cache.backend()->counters();
    return s;
  }
};

// The state did not change (an error left everything as it was). Failed
// backend calls are allowed to be counted; nothing else may move.
::testing::AssertionResult Unchanged(const Snapshot& before,
                                     const KVCache& cache) {
  const Snapshot after = Snapshot::Of(cache);
  ::testing::AssertionResult same = SameStats(before.stats, after.stats);
  if (!same) return same;
  for (std::size_t i = 0; i < before.slots.size(); ++i) {
    if (!SameSlot(before.slots[i], after.slots[i])) {
      return ::testing::AssertionFailure()
             << "slot " << i << " changed: " << Describe(before.slots[i])
             << " -> " << Describe(after.slots[i]);
    }
  }
  const BackendCounters& a = before.counters;
  const BackendCounters& b = after.counters;
  if (a.calls != b.calls || a.handles != b.handles ||
      a.mappings != b.mappings || a.physical_bytes != b.physical_bytes ||
      a.reservations != b.reservations) {
    return ::testing::AssertionFailure() << "backend state changed";
  }
  return ::testing::AssertionSuccess();
}

// The cache's own figures agree with its backend's (the cache is the
// backend's only user) and with the budget.
::testing::AssertionResult Consistent(const KVCache& cache) {
  const CacheStats st = cache.Stats();
  const BackendCounters c = cache.backend()->counters();
  std::string err;
  auto check = [&](bool ok, const std::string& what) {
    if (!ok) err += " [" + what + "]";
  };
  check(st.create_calls == c.calls_of(BackendOp::kCreate),
        "create_calls " + std::to_string(st.create_calls) + " vs backend " +
            std::to_string(c.calls_of(BackendOp::kCreate)));
  check(st.destroy_calls == c.calls_of(BackendOp::kDestroy),
        "destroy_calls " + std::to_string(st.destroy_calls) + " vs backend " +
            std::to_string(c.calls_of(BackendOp::kDestroy)));
  check(st.map_calls == c.calls_of(BackendOp::kMap),
        "map_calls " + std::to_string(st.map_calls) + " vs backend " +
            std::to_string(c.calls_of(BackendOp::kMap)));
  check(st.unmap_calls == c.calls_of(BackendOp::kUnmap),
        "unmap_calls " + std::to_string(st.unmap_calls) + " vs backend " +
            std::to_string(c.calls_of(BackendOp::kUnmap)));
  check(st.physical_bytes == c.physical_bytes,
        "physical_bytes " + std::to_string(st.physical_bytes) +
            " vs backend " + std::to_string(c.physical_bytes));
  check(st.mapped_bytes == c.mapped_bytes,
        "mapped_bytes " + std::to_string(st.mapped_bytes) + " vs backend " +
            std::to_string(c.mapped_bytes));
  check(st.pooled_bytes + st.mapped_bytes == st.physical_bytes,
        "pooled + mapped != physical");
  check(st.physical_bytes <= st.budget_bytes, "physical above budget");
  check(st.peak_physical_bytes <= st.budget_bytes, "peak above budget");
  check(st.peak_physical_bytes >= st.physical_bytes, "peak below physical");
  check(c.reservations == 1, "reservations " + std::to_string(c.reservations));
  std::int64_t slot_mapped = 0;
  std::int64_t active = 0;
  for (int i = 0; i < cache.options().max_slots; ++i) {
    const SlotInfo s = Slot(cache, i);
    slot_mapped += s.mapped_bytes;
    active += s.active ? 1 : 0;
    if (!s.active && s.length != 0) {
      err += " [idle slot " + std::to_string(i) + " has a length]";
    }
    if (s.active && s.backed_tokens < s.length) {
      err += " [slot " + std::to_string(i) + " length above backed]";
    }
  }
  check(slot_mapped == st.mapped_bytes, "sum of slots' mapped_bytes");
  check(active == st.active_slots, "active_slots");
  if (err.empty()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "inconsistent:" << err;
}

// Nothing is live on the backend and every call has its inverse.
::testing::AssertionResult AllGivenBack(const Backend& backend) {
  const BackendCounters c = backend.counters();
  if (!c.Empty() || c.physical_bytes != 0 || c.mapped_bytes != 0 ||
      c.reserved_bytes != 0) {
    return ::testing::AssertionFailure()
           << "live: reservations " << c.reservations << ", handles "
           << c.handles << ", mappings " << c.mappings << ", fences "
           << c.fences;
  }
  if (c.calls_of(BackendOp::kReserve) != c.calls_of(BackendOp::kRelease) ||
      c.calls_of(BackendOp::kCreate) != c.calls_of(BackendOp::kDestroy) ||
      c.calls_of(BackendOp::kMap) != c.calls_of(BackendOp::kUnmap)) {
    return ::testing::AssertionFailure()
           << "unbalanced calls: reserve " << c.calls_of(BackendOp::kReserve)
           << "/release " << c.calls_of(BackendOp::kRelease) << ", create "
           << c.calls_of(BackendOp::kCreate) << "/destroy "
           << c.calls_of(BackendOp::kDestroy) << ", map "
           << c.calls_of(BackendOp::kMap) << "/unmap "
           << c.calls_of(BackendOp::kUnmap);
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------
// The parameterized fixture: one layout and shape per instance. TearDown
// destroys the cache and checks that the backend got everything back, so
// every case (error paths included) also tests teardown.

class KVCacheTest : public ::testing::TestWithParam<Param> {
 protected:
  const Shape& shape() const { return GetParam().shape; }
  Layout layout() const { return GetParam().layout; }
  Geometry geo() const { return Geometry(shape(), layout()); }
  KVCacheOptions Options(int max_slots = 3) const {
    return MakeOptions(shape(), layout(), max_slots);
  }

  // Makes backend_ (with an optional physical limit) and cache_.
  void Make(const KVCacheOptions& o, std::size_t limit = 0) {
    backend_ = MustHost(limit);
    ASSERT_NE(backend_, nullptr);
    VATTN_ASSERT_OK_AND_ASSIGN(cache_, KVCache::Create(o, backend_));
  }

  void TearDown() override {
    cache_.reset();
    if (backend_ != nullptr) {
      EXPECT_TRUE(AllGivenBack(*backend_));
    }
  }

  std::shared_ptr<Backend> backend_;
  std::unique_ptr<KVCache> cache_;
};

// ---- Views -----------------------------------------------------------------

TEST_P(KVCacheTest, ShapesAndStridesAsDocumented) {
  const Shape& s = shape();
  const Geometry g = geo();
  ASSERT_NO_FATAL_FAILURE(Make(Options(3)));
  EXPECT_EQ(cache_->bytes_per_token(),
            static_cast<std::int64_t>(s.layers) * 2 * s.heads * s.dim * g.elem);

  const TensorView k0 = cache_->K(0);
  ASSERT_NE(k0.data, nullptr);
  const std::int64_t slot_stride = k0.strides[0];
  // Each slot's range starts on a granule, so slots map independently, and
  // holds max_tokens tokens.
  EXPECT_EQ(slot_stride * g.elem % kGran, 0);
  EXPECT_GE(slot_stride * g.elem, s.max_tokens * g.token_bytes);
  EXPECT_LT(slot_stride * g.elem, s.max_tokens * g.token_bytes + kGran);

  for (int l = 0; l < s.layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      SCOPED_TRACE(::testing::Message() << "layer " << l << " kv " << kv);
      const TensorView v = kv == 0 ? cache_->K(l) : cache_->V(l);
      ASSERT_NE(v.data, nullptr);
      EXPECT_EQ(v.dtype, s.dtype);
      EXPECT_EQ(v.shape, (std::array<std::int64_t, 4>{3, s.max_tokens,
                                                      s.heads, s.dim}));
      EXPECT_EQ(v.strides[0], slot_stride);
      EXPECT_EQ(v.strides[2], s.dim);
      EXPECT_EQ(v.strides[3], 1);
      const std::intptr_t delta = static_cast<std::intptr_t>(
          reinterpret_cast<std::uintptr_t>(v.data) -
          reinterpret_cast<std::uintptr_t>(k0.data));
      if (layout() == Layout::kTokenMajor) {
        // [slots][max_tokens][layers][2][heads][dim].
        EXPECT_EQ(v.strides[1],
                  static_cast<std::int64_t>(s.layers) * 2 * s.heads * s.dim);
        EXPECT_EQ(delta, (static_cast<std::int64_t>(l) * 2 + kv) * g.row *
                             g.elem);
      } else {
        // Per-layer packed [slots][max_tokens][heads][dim], each tensor its
        // own max_slots x slot_stride range.
        EXPECT_EQ(v.strides[1], g.row);
        EXPECT_EQ(delta % (slot_stride * g.elem * 3), 0);
      }
    }
    if (layout() == Layout::kTokenMajor) {
      // V(l) = K(l) + heads * dim elements.
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(cache_->V(l).data) -
                    reinterpret_cast<std::uintptr_t>(cache_->K(l).data),
                static_cast<std::uintptr_t>(g.row * g.elem));
    }
  }

  // Out-of-range layers give empty views.
  for (int bad : {-1, s.layers, s.layers + 7, std::numeric_limits<int>::min()}) {
    EXPECT_EQ(cache_->K(bad).data, nullptr) << bad;
    EXPECT_EQ(cache_->V(bad).data, nullptr) << bad;
  }
}

// The byte ranges of distinct (slot, layer, K/V) tensors never overlap: every
// element address is computed and checked against a set of ranges.
TEST_P(KVCacheTest, ViewRangesOfSlotsAndLayersAreDisjoint) {
  const Shape& s = shape();
  const Geometry g = geo();
  ASSERT_NO_FATAL_FAILURE(Make(Options(3)));
  struct Range {
    std::uintptr_t lo, hi;  // [lo, hi)
    int slot;
  };
  std::vector<Range> ranges;
  for (int slot = 0; slot < 3; ++slot) {
    for (int l = 0; l < s.layers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        const TensorView v = kv == 0 ? cache_->K(l) : cache_->V(l);
        if (layout() == Layout::kLayerMajor) {
          // Packed: one range per (slot, tensor).
          ranges.push_back({v.ElementAddress(slot, 0, 0, 0),
                            v.ElementAddress(slot, s.max_tokens - 1,
                                             s.heads - 1, s.dim - 1) +
                                static_cast<std::uintptr_t>(g.elem),
                            slot});
        } else {
          // Strided: one range per (slot, token, tensor).
          for (std::int64_t t = 0; t < s.max_tokens; ++t) {
            ranges.push_back({v.ElementAddress(slot, t, 0, 0),
                              v.ElementAddress(slot, t, s.heads - 1,
                                               s.dim - 1) +
                                  static_cast<std::uintptr_t>(g.elem),
                              slot});
          }
        }
      }
    }
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.lo < b.lo; });
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(cache_->K(0).data);
  const std::uintptr_t slot_bytes =
      static_cast<std::uintptr_t>(cache_->K(0).strides[0] * g.elem);
  for (std::size_t i = 0; i < ranges.size(); ++i) {
    EXPECT_EQ(ranges[i].hi - ranges[i].lo,
              static_cast<std::uintptr_t>(
                  (layout() == Layout::kLayerMajor ? s.max_tokens : 1) *
                  g.row * g.elem));
    if (i + 1 < ranges.size()) {
      ASSERT_LE(ranges[i].hi, ranges[i + 1].lo) << "ranges " << i << " overlap";
    }
    // Every tensor range of a slot lies inside that slot's part of its
    // region (the part a Grow of that slot maps).
    const std::uintptr_t in_region = (ranges[i].lo - base) % (3 * slot_bytes);
    if (layout() == Layout::kTokenMajor) {
      EXPECT_EQ((ranges[i].lo - base) / slot_bytes,
                static_cast<std::uintptr_t>(ranges[i].slot));
    } else {
      EXPECT_EQ(in_region / slot_bytes,
                static_cast<std::uintptr_t>(ranges[i].slot));
      EXPECT_EQ(in_region % slot_bytes, 0u);
    }
  }
}

// ---- Data --------------------------------------------------------------------

// All slots grow interleaved (prefills, then decode steps of 1 to 3 tokens);
// after every Grow the newly backed tokens are written, and every written
// token of every slot is checked at checkpoints and at the end: nothing is
// lost by later growth of the same or other slots, and no two slots or
// layers share memory.
TEST_P(KVCacheTest, DataSurvivesGrowthAndSlotsDoNotOverlap) {
  const Shape& s = shape();
  KVCacheOptions o = Options(3);
  o.max_extent_bytes = 4 * kGranularity;  // Many extents, some linear.
  ASSERT_NO_FATAL_FAILURE(Make(o));
  std::vector<int> slots;
  std::vector<std::int64_t> written(3, 0);
  for (int i = 0; i < 3; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache_->AllocSlot());
    slots.push_back(slot);
  }
  std::mt19937 rng(1234);
  const std::int64_t prefill[3] = {1, s.max_tokens / 5, s.max_tokens / 3};
  int checkpoint = 0;
  // About a dozen full checks over the run (steps add 2 tokens on average).
  const int check_every =
      static_cast<int>(std::max<std::int64_t>(1, s.max_tokens / 24));
  for (int step = 0;; ++step) {
    bool any = false;
    for (int i = 0; i < 3; ++i) {
      const int slot = slots[i];
      const SlotInfo before = Slot(*cache_, slot);
      if (before.length >= s.max_tokens) continue;
      any = true;
      const std::int64_t target =
          step == 0 ? std::max<std::int64_t>(1, prefill[i])
                    : std::min<std::int64_t>(
                          s.max_tokens,
                          before.length + 1 + static_cast<std::int64_t>(rng() % 3));
      VATTN_ASSERT_OK(cache_->Grow(slot, target));
      const SlotInfo after = Slot(*cache_, slot);
      ASSERT_GE(after.backed_tokens, target);
      ASSERT_LE(after.backed_tokens, s.max_tokens);
      // Write every backed token not written yet (beyond the length too:
      // backed tokens may be touched).
      WriteTokens(*cache_, slot, written[i], after.backed_tokens,
                  static_cast<std::uint32_t>(i + 1));
      written[i] = after.backed_tokens;
    }
    if (!any) break;
    if (++checkpoint % check_every == 0) {
      for (int i = 0; i < 3; ++i) {
        ASSERT_TRUE(CheckTokens(*cache_, slots[i], 0, written[i],
                                static_cast<std::uint32_t>(i + 1)));
      }
    }
  }
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(written[i], s.max_tokens);
    EXPECT_TRUE(CheckTokens(*cache_, slots[i], 0, written[i],
                            static_cast<std::uint32_t>(i + 1)));
  }
  EXPECT_TRUE(Consistent(*cache_));
}

// Slot A keeps its data while other slots are freed and their memory is
// reclaimed under budget pressure and mapped (the same handles, or new ones
// in their place) into another slot, which grows and then hits the budget.
TEST_P(KVCacheTest, DataSurvivesOtherSlotsReclamation) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  KVCacheOptions o = Options(4);
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 8 * p);
  const std::int64_t e = g.Extent(p);
  o.memory_budget_bytes = static_cast<std::size_t>(3 * e * g.regions);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  int slot[4];
  for (int i = 0; i < 4; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(slot[i], cache_->AllocSlot());
  }
  const int a = slot[0], b = slot[1], c = slot[2], d = slot[3];
  for (int i = 0; i < 3; ++i) {
    VATTN_ASSERT_OK(cache_->Grow(slot[i], p));
    WriteTokens(*cache_, slot[i], 0, p, static_cast<std::uint32_t>(11 + i));
  }
  VATTN_ASSERT_OK(cache_->Free(b));
  VATTN_ASSERT_OK(cache_->Free(c));
  // d (fresh) grows twice: b's memory, then c's, is taken back for it.
  VATTN_ASSERT_OK(cache_->Grow(d, p));
  EXPECT_EQ(Slot(*cache_, b).mapped_bytes, 0);
  WriteTokens(*cache_, d, 0, p, 14);
  VATTN_ASSERT_OK(cache_->Grow(d, 2 * p));
  EXPECT_EQ(Slot(*cache_, c).mapped_bytes, 0);
  std::int64_t written = Slot(*cache_, d).backed_tokens;
  WriteTokens(*cache_, d, p, written, 14);
  EXPECT_TRUE(Consistent(*cache_));
  EXPECT_TRUE(CheckTokens(*cache_, a, 0, p, 11));
  EXPECT_TRUE(CheckTokens(*cache_, d, 0, written, 14));
  // Nothing left to reclaim: d cannot grow to max_tokens; a and d intact.
  VATTN_EXPECT_CODE(cache_->Grow(d, o.max_tokens),
                    absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(CheckTokens(*cache_, a, 0, p, 11));
  EXPECT_TRUE(CheckTokens(*cache_, d, 0, written, 14));
  // Once a is freed, d grows into a's memory; d's data is intact.
  VATTN_ASSERT_OK(cache_->Free(a));
  const std::int64_t fit = std::min(o.max_tokens, 3 * e / g.token_bytes);
  VATTN_ASSERT_OK(cache_->Grow(d, fit));
  EXPECT_EQ(Slot(*cache_, a).mapped_bytes, 0);
  EXPECT_TRUE(CheckTokens(*cache_, d, 0, written, 14));
  WriteTokens(*cache_, d, written, fit, 14);
  EXPECT_TRUE(CheckTokens(*cache_, d, 0, fit, 14));
  EXPECT_TRUE(Consistent(*cache_));
}

// ---- Grow ------------------------------------------------------------------

TEST_P(KVCacheTest, GrowBacksTokensAndSetsLength) {
  const Shape& s = shape();
  const Geometry g = geo();
  ASSERT_NO_FATAL_FAILURE(Make(Options(2)));
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache_->AllocSlot());
  SlotInfo info = Slot(*cache_, slot);
  EXPECT_TRUE(info.active);
  EXPECT_EQ(info.length, 0);
  EXPECT_EQ(info.extents, 0);

  // Grow to 0: fine, maps nothing.
  VATTN_ASSERT_OK(cache_->Grow(slot, 0));
  info = Slot(*cache_, slot);
  EXPECT_EQ(info.length, 0);
  EXPECT_EQ(info.extents, 0);
  EXPECT_EQ(cache_->Stats().map_calls, 0);

  // A prefill of P tokens is one extent: one map per region.
  const std::int64_t prefill = std::max<std::int64_t>(1, s.max_tokens / 3);
  VATTN_ASSERT_OK(cache_->Grow(slot, prefill));
  info = Slot(*cache_, slot);
  EXPECT_EQ(info.length, prefill);
  EXPECT_GE(info.backed_tokens, prefill);
  EXPECT_EQ(info.extents, 1);
  EXPECT_EQ(info.mapped_bytes, g.Extent(prefill) * g.regions);
  EXPECT_EQ(info.backed_tokens,
            std::min(s.max_tokens, g.Extent(prefill) / g.token_bytes));
  CacheStats st = cache_->Stats();
  EXPECT_EQ(st.map_calls, g.regions);
  EXPECT_EQ(st.extents_mapped, 1);
  EXPECT_EQ(st.create_calls, g.regions);
  EXPECT_EQ(st.logical_bytes, prefill * cache_->bytes_per_token());
  EXPECT_TRUE(Consistent(*cache_));

  // Growing to less than the length keeps the length and maps nothing.
  VATTN_ASSERT_OK(cache_->Grow(slot, prefill / 2));
  EXPECT_EQ(Slot(*cache_, slot).length, prefill);
  VATTN_ASSERT_OK(cache_->Grow(slot, 0));
  EXPECT_EQ(Slot(*cache_, slot).length, prefill);
  // Growing within the backed tokens maps nothing either.
  const std::int64_t backed = info.backed_tokens;
  VATTN_ASSERT_OK(cache_->Grow(slot, backed));
  EXPECT_EQ(Slot(*cache_, slot).length, backed);
  EXPECT_EQ(cache_->Stats().map_calls, g.regions);

  // Growing to max_tokens works and backs exactly max_tokens.
  VATTN_ASSERT_OK(cache_->Grow(slot, s.max_tokens));
  info = Slot(*cache_, slot);
  EXPECT_EQ(info.length, s.max_tokens);
  EXPECT_EQ(info.backed_tokens, s.max_tokens);
  EXPECT_TRUE(Consistent(*cache_));

  // A second slot's prefill straight to max_tokens is one extent too.
  VATTN_ASSERT_OK_AND_ASSIGN(int other, cache_->AllocSlot());
  const std::int64_t maps = cache_->Stats().map_calls;
  VATTN_ASSERT_OK(cache_->Grow(other, s.max_tokens));
  EXPECT_EQ(Slot(*cache_, other).extents, 1);
  EXPECT_EQ(cache_->Stats().map_calls, maps + g.regions);
  EXPECT_TRUE(Consistent(*cache_));
}

// Decode growth one token at a time: each new extent (per region) is the
// slot's mapped size so far (the slot doubles), from one granule up to
// max_extent_bytes, then constant; an extent is mapped only when the next
// token is not backed. So the number of extents is logarithmic, then linear.
TEST_P(KVCacheTest, DecodeExtentsDoubleUpToTheCap) {
  const Geometry g = geo();
  KVCacheOptions o = Options(1);
  constexpr std::int64_t kCapGranules = 8;
  o.max_extent_bytes = kCapGranules * kGranularity;
  // Enough tokens for 40 granules per region: 1,1,2,4,8 then 8 x 3.
  constexpr std::int64_t kGranules = 40;
  o.max_tokens = kGranules * kGran / g.token_bytes;
  ASSERT_GT(o.max_tokens, 0);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache_->AllocSlot());
  // Decode steps of one token, or of a few where a granule holds thousands
  // (still well under one granule per step).
  const std::int64_t step = std::max<std::int64_t>(1, g.TokensPerGranule() / 8);
  const std::int64_t region = RoundUp(o.max_tokens * g.token_bytes, kGran);
  std::int64_t mapped = 0;  // Per region.
  int extents = 0;
  std::int64_t grows = 0;
  for (std::int64_t t = step; t < o.max_tokens + step; t += step) {
    t = std::min(t, o.max_tokens);
    const SlotInfo before = Slot(*cache_, slot);
    VATTN_ASSERT_OK(cache_->Grow(slot, t));
    ++grows;
    const SlotInfo after = Slot(*cache_, slot);
    ASSERT_EQ(after.length, t);
    ASSERT_GE(after.backed_tokens, t);
    if (before.backed_tokens >= t) {
      ASSERT_EQ(after.extents, before.extents) << "mapped early at token " << t;
      continue;
    }
    ASSERT_EQ(after.extents, before.extents + 1) << "token " << t;
    const std::int64_t size = (after.mapped_bytes - before.mapped_bytes) /
                              g.regions;
    const std::int64_t deficit = RoundUp(t * g.token_bytes, kGran) - mapped;
    const std::int64_t want = std::min(
        region - mapped,
        std::max(deficit, std::clamp<std::int64_t>(mapped, kGran,
                                                   kCapGranules * kGran)));
    EXPECT_EQ(size, want) << "extent " << extents << " at token " << t
                          << " with " << mapped << " bytes mapped";
    mapped += size;
    ++extents;
  }
  EXPECT_EQ(mapped * g.regions, Slot(*cache_, slot).mapped_bytes);
  if (g.token_bytes <= kGran) {
    // 1 + 1 + 2 + 4 + 8 = 16 granules in 5 extents, then 8 per extent.
    EXPECT_EQ(extents, 5 + (kGranules - 16 + kCapGranules - 1) / kCapGranules);
  }
  const CacheStats st = cache_->Stats();
  EXPECT_EQ(st.extents_mapped, extents);
  EXPECT_EQ(st.map_calls, static_cast<std::int64_t>(extents) * g.regions);
  EXPECT_EQ(st.grow_calls, grows);
  EXPECT_TRUE(Consistent(*cache_));
}

// ---- Budget ------------------------------------------------------------------

// Three slots hold one extent each, filling the budget; they are freed in
// the order 1, 0, 2 (slot indices as allocated). A fourth slot's growth
// takes back the least recently freed slot's memory first, then the next;
// a Grow that cannot fit even with every idle slot reclaimed fails with
// ResourceExhausted and leaves the slot as it was. Physical bytes stay
// within the budget after every operation.
TEST_P(KVCacheTest, BudgetReclaimsLeastRecentlyFreedFirstThenFails) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  const std::int64_t e = g.Extent(p);
  KVCacheOptions o = Options(4);
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 8 * p);
  o.memory_budget_bytes = static_cast<std::size_t>(3 * e * g.regions);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  const std::int64_t budget = 3 * e * g.regions;
  auto within_budget = [&]() {
    const CacheStats st = cache_->Stats();
    EXPECT_EQ(st.budget_bytes, budget);
    EXPECT_LE(st.physical_bytes, budget);
    EXPECT_LE(st.peak_physical_bytes, budget);
    EXPECT_LE(backend_->counters().physical_bytes, budget);
    EXPECT_TRUE(Consistent(*cache_));
  };

  int s[4];
  for (int i = 0; i < 3; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(s[i], cache_->AllocSlot(p));
    VATTN_ASSERT_OK(cache_->Grow(s[i], p));
    WriteTokens(*cache_, s[i], 0, p, static_cast<std::uint32_t>(100 + i));
    within_budget();
  }
  EXPECT_EQ(cache_->Stats().physical_bytes, budget);
  VATTN_ASSERT_OK_AND_ASSIGN(s[3], cache_->AllocSlot(0));
  within_budget();

  const std::int64_t unmaps = cache_->Stats().unmap_calls;
  for (int i : {1, 0, 2}) {
    VATTN_ASSERT_OK(cache_->Free(s[i]));
    within_budget();
  }
  EXPECT_EQ(cache_->Stats().unmap_calls, unmaps);
  EXPECT_EQ(cache_->Stats().idle_slots_with_memory, 3);

  // First growth: slot 1's memory (freed first) goes; 0 and 2 keep theirs.
  VATTN_ASSERT_OK(cache_->Grow(s[3], p));
  within_budget();
  EXPECT_EQ(Slot(*cache_, s[1]).mapped_bytes, 0);
  EXPECT_EQ(Slot(*cache_, s[1]).extents, 0);
  EXPECT_EQ(Slot(*cache_, s[0]).mapped_bytes, e * g.regions);
  EXPECT_EQ(Slot(*cache_, s[2]).mapped_bytes, e * g.regions);
  CacheStats st = cache_->Stats();
  EXPECT_EQ(st.reclaimed_bytes, e * g.regions);
  EXPECT_EQ(st.reclaimed_extents, 1);
  // The reclaimed handles were the right size: reused, none created.
  EXPECT_EQ(st.create_calls, 3 * g.regions);
  WriteTokens(*cache_, s[3], 0, p, 103);
  // Idle slots still mapped keep their old data (deferred reclamation).
  EXPECT_TRUE(CheckTokens(*cache_, s[0], 0, p, 100));
  EXPECT_TRUE(CheckTokens(*cache_, s[2], 0, p, 102));

  // Second growth: slot 0 goes next; slot 2 keeps its memory.
  VATTN_ASSERT_OK(cache_->Grow(s[3], 2 * p));
  within_budget();
  EXPECT_EQ(Slot(*cache_, s[0]).mapped_bytes, 0);
  EXPECT_EQ(Slot(*cache_, s[2]).mapped_bytes, e * g.regions);
  EXPECT_EQ(cache_->Stats().reclaimed_extents, 2);
  EXPECT_TRUE(CheckTokens(*cache_, s[3], 0, p, 103));
  EXPECT_TRUE(CheckTokens(*cache_, s[2], 0, p, 102));
  const SlotInfo grown = Slot(*cache_, s[3]);
  WriteTokens(*cache_, s[3], p, grown.backed_tokens, 103);

  // A Grow past what the budget can ever hold: idle memory is reclaimed,
  // then ResourceExhausted, and the slot is exactly as it was.
  VATTN_EXPECT_CODE(cache_->Grow(s[3], o.max_tokens),
                    absl::StatusCode::kResourceExhausted);
  within_budget();
  EXPECT_TRUE(SameSlot(Slot(*cache_, s[3]), grown))
      << Describe(grown) << " -> " << Describe(Slot(*cache_, s[3]));
  EXPECT_EQ(Slot(*cache_, s[2]).mapped_bytes, 0);
  EXPECT_TRUE(CheckTokens(*cache_, s[3], 0, grown.backed_tokens, 103));
  // The same fails again, without driver calls and with nothing to reclaim.
  {
    const Snapshot before = Snapshot::Of(*cache_);
    VATTN_EXPECT_CODE(cache_->Grow(s[3], o.max_tokens),
                      absl::StatusCode::kResourceExhausted);
    Snapshot after = Snapshot::Of(*cache_);
    EXPECT_EQ(after.stats.grow_calls, before.stats.grow_calls + 1);
    after.stats.grow_calls = before.stats.grow_calls;
    EXPECT_TRUE(SameStats(before.stats, after.stats));
    EXPECT_EQ(after.counters.calls, before.counters.calls);
  }

  // What does fit still grows: up to the whole budget.
  const std::int64_t fit = std::min(o.max_tokens, 3 * e / g.token_bytes);
  VATTN_ASSERT_OK(cache_->Grow(s[3], fit));
  within_budget();
  EXPECT_TRUE(CheckTokens(*cache_, s[3], 0, grown.backed_tokens, 103));
  WriteTokens(*cache_, s[3], grown.backed_tokens, fit, 103);
  EXPECT_TRUE(CheckTokens(*cache_, s[3], 0, fit, 103));

  // A new request elsewhere finds nothing to reclaim: ResourceExhausted,
  // its slot unchanged, the full slot untouched.
  VATTN_ASSERT_OK_AND_ASSIGN(int other, cache_->AllocSlot(0));
  const SlotInfo other_before = Slot(*cache_, other);
  VATTN_EXPECT_CODE(cache_->Grow(other, 1),
                    absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(SameSlot(Slot(*cache_, other), other_before));
  within_budget();
  EXPECT_TRUE(CheckTokens(*cache_, s[3], 0, fit, 103));
  // Freeing the full slot lets the other one grow, by reclaiming it.
  VATTN_ASSERT_OK(cache_->Free(s[3]));
  VATTN_ASSERT_OK(cache_->Grow(other, 1));
  within_budget();
}

// The backend running out of memory below the budget (the Host backend's
// physical limit here) is ResourceExhausted too: idle slots are reclaimed
// first, and a Grow that still cannot be backed leaves the slot unchanged.
TEST_P(KVCacheTest, BackendOutOfMemoryReclaimsThenIsResourceExhausted) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  const std::int64_t e = g.Extent(p);
  KVCacheOptions o = Options(3);
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 4 * p);
  o.memory_budget_bytes = static_cast<std::size_t>(10 * e * g.regions);
  ASSERT_NO_FATAL_FAILURE(
      Make(o, /*limit=*/static_cast<std::size_t>(2 * e * g.regions)));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot());
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot());
  VATTN_ASSERT_OK_AND_ASSIGN(int c, cache_->AllocSlot());
  VATTN_ASSERT_OK(cache_->Grow(a, p));
  VATTN_ASSERT_OK(cache_->Grow(b, p));
  WriteTokens(*cache_, a, 0, p, 51);
  SlotInfo before = Slot(*cache_, c);
  VATTN_EXPECT_CODE(cache_->Grow(c, p), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(SameSlot(Slot(*cache_, c), before));
  EXPECT_TRUE(Consistent(*cache_));
  // With b idle, c grows into b's memory.
  VATTN_ASSERT_OK(cache_->Free(b));
  VATTN_ASSERT_OK(cache_->Grow(c, p));
  EXPECT_EQ(cache_->Stats().reclaimed_extents, 1);
  EXPECT_EQ(Slot(*cache_, b).mapped_bytes, 0);
  EXPECT_TRUE(Consistent(*cache_));
  before = Slot(*cache_, c);
  VATTN_EXPECT_CODE(cache_->Grow(c, 2 * p),
                    absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(SameSlot(Slot(*cache_, c), before));
  EXPECT_TRUE(Consistent(*cache_));
  EXPECT_TRUE(CheckTokens(*cache_, a, 0, p, 51));
}

// ---- Deferred reclamation ----------------------------------------------------

TEST_P(KVCacheTest, FreeAndShrinkUnmapNothingAndReuseNeedsNoDriverCalls) {
  const Shape& s = shape();
  ASSERT_NO_FATAL_FAILURE(Make(Options(3)));
  const std::int64_t len = std::max<std::int64_t>(2, s.max_tokens / 2);
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache_->AllocSlot(len));
  VATTN_ASSERT_OK(cache_->Grow(slot, len));
  WriteTokens(*cache_, slot, 0, len, 7);
  const SlotInfo grown = Slot(*cache_, slot);
  const CacheStats st0 = cache_->Stats();

  VATTN_ASSERT_OK(cache_->Shrink(slot, 1));
  SlotInfo info = Slot(*cache_, slot);
  EXPECT_EQ(info.length, 1);
  EXPECT_EQ(info.backed_tokens, grown.backed_tokens);
  EXPECT_EQ(info.mapped_bytes, grown.mapped_bytes);
  EXPECT_EQ(cache_->Stats().unmap_calls, st0.unmap_calls);
  VATTN_ASSERT_OK(cache_->Shrink(slot, 0));
  EXPECT_EQ(Slot(*cache_, slot).length, 0);
  // Growing back within the backed tokens is free.
  VATTN_ASSERT_OK(cache_->Grow(slot, len));
  EXPECT_EQ(cache_->Stats().map_calls, st0.map_calls);
  EXPECT_TRUE(CheckTokens(*cache_, slot, 0, len, 7));

  VATTN_ASSERT_OK(cache_->Free(slot));
  CacheStats st = cache_->Stats();
  EXPECT_EQ(st.unmap_calls, st0.unmap_calls);
  EXPECT_EQ(st.mapped_bytes, st0.mapped_bytes);
  EXPECT_EQ(st.active_slots, 0);
  EXPECT_EQ(st.idle_slots_with_memory, 1);
  EXPECT_EQ(st.logical_bytes, 0);
  info = Slot(*cache_, slot);
  EXPECT_FALSE(info.active);
  EXPECT_EQ(info.length, 0);
  EXPECT_EQ(info.mapped_bytes, grown.mapped_bytes);
  EXPECT_TRUE(Consistent(*cache_));

  // The next request of that size lands in the same slot: zero driver calls.
  const BackendCounters c0 = backend_->counters();
  VATTN_ASSERT_OK_AND_ASSIGN(int again, cache_->AllocSlot(len));
  EXPECT_EQ(again, slot);
  VATTN_ASSERT_OK(cache_->Grow(again, len));
  EXPECT_EQ(backend_->counters().calls, c0.calls);
  st = cache_->Stats();
  EXPECT_EQ(st.reuse_hits, 1);
  EXPECT_EQ(st.create_calls, st0.create_calls);
  EXPECT_EQ(st.map_calls, st0.map_calls);
  EXPECT_EQ(Slot(*cache_, again).length, len);
  EXPECT_TRUE(Consistent(*cache_));
}

// AllocSlot(expected_tokens) picks the idle slot with the least mapped memory
// that covers the hint; if none covers it, the one with the most.
TEST_P(KVCacheTest, AllocSlotPrefersTheBestFittingIdleSlot) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  KVCacheOptions o = Options(5);
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 12 * p);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  // Fill slots so the sizes are not in index order.
  const std::int64_t lens[4] = {3 * p, 6 * p, p, 9 * p};  // medium, large,
                                                            // small, largest
  int slot[4];
  for (int i = 0; i < 4; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(slot[i], cache_->AllocSlot());
    VATTN_ASSERT_OK(cache_->Grow(slot[i], lens[i]));
  }
  for (int i = 0; i < 4; ++i) VATTN_ASSERT_OK(cache_->Free(slot[i]));
  const BackendCounters c0 = backend_->counters();

  // 3p tokens: medium covers it with the least memory.
  VATTN_ASSERT_OK_AND_ASSIGN(int got, cache_->AllocSlot(3 * p));
  EXPECT_EQ(got, slot[0]);
  // 4p: only large and largest cover; large is the better fit.
  VATTN_ASSERT_OK_AND_ASSIGN(got, cache_->AllocSlot(4 * p));
  EXPECT_EQ(got, slot[1]);
  // Beyond every idle slot: the one with the most memory.
  VATTN_ASSERT_OK_AND_ASSIGN(got, cache_->AllocSlot(o.max_tokens));
  EXPECT_EQ(got, slot[3]);
  // No hint: a slot with memory still beats a fresh one.
  VATTN_ASSERT_OK_AND_ASSIGN(got, cache_->AllocSlot());
  EXPECT_EQ(got, slot[2]);
  EXPECT_EQ(cache_->Stats().reuse_hits, 4);
  // Only the fresh slot is left.
  VATTN_ASSERT_OK_AND_ASSIGN(got, cache_->AllocSlot(p));
  EXPECT_EQ(Slot(*cache_, got).mapped_bytes, 0);
  EXPECT_EQ(cache_->Stats().reuse_hits, 4);
  VATTN_EXPECT_CODE(cache_->AllocSlot(), absl::StatusCode::kResourceExhausted);
  // None of this called the driver.
  EXPECT_EQ(backend_->counters().calls, c0.calls);
  EXPECT_TRUE(Consistent(*cache_));
}

TEST_P(KVCacheTest, NoDeferralUnmapsAtFreeAndPoolsTheHandles) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  KVCacheOptions o = Options(3);
  o.defer_reclaim = false;
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 2 * p);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache_->AllocSlot());
  VATTN_ASSERT_OK(cache_->Grow(slot, p));
  const CacheStats st0 = cache_->Stats();
  VATTN_ASSERT_OK(cache_->Free(slot));
  CacheStats st = cache_->Stats();
  EXPECT_EQ(st.unmap_calls, st0.unmap_calls + g.regions);
  EXPECT_EQ(st.mapped_bytes, 0);
  EXPECT_EQ(st.pooled_bytes, g.Extent(p) * g.regions);
  EXPECT_EQ(st.physical_bytes, st0.physical_bytes);
  EXPECT_EQ(st.idle_slots_with_memory, 0);
  const SlotInfo info = Slot(*cache_, slot);
  EXPECT_EQ(info.mapped_bytes, 0);
  EXPECT_EQ(info.extents, 0);
  EXPECT_EQ(info.backed_tokens, 0);
  EXPECT_TRUE(Consistent(*cache_));

  // The next request maps again, from the pool: no create.
  VATTN_ASSERT_OK_AND_ASSIGN(int again, cache_->AllocSlot(p));
  VATTN_ASSERT_OK(cache_->Grow(again, p));
  st = cache_->Stats();
  EXPECT_EQ(st.create_calls, st0.create_calls);
  EXPECT_EQ(st.map_calls, st0.map_calls + g.regions);
  EXPECT_EQ(st.pooled_bytes, 0);
  EXPECT_EQ(st.reuse_hits, 0);
  EXPECT_TRUE(Consistent(*cache_));
}

// ---- Isolation ---------------------------------------------------------------

TEST_P(KVCacheTest, ZeroOnReuseHidesThePreviousRequestsData) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  KVCacheOptions o = Options(3);
  o.zero_on_reuse = true;
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 2 * p);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache_->AllocSlot(p));
  VATTN_ASSERT_OK(cache_->Grow(slot, p));
  const std::int64_t backed = Slot(*cache_, slot).backed_tokens;
  WriteTokens(*cache_, slot, 0, backed, 21);
  VATTN_ASSERT_OK(cache_->Free(slot));

  // Same slot, same memory (no driver calls), but it reads as zeros.
  const BackendCounters c0 = backend_->counters();
  VATTN_ASSERT_OK_AND_ASSIGN(int again, cache_->AllocSlot(p));
  ASSERT_EQ(again, slot);
  VATTN_ASSERT_OK(cache_->Grow(again, p));
  EXPECT_EQ(backend_->counters().calls, c0.calls);
  EXPECT_TRUE(CheckTokens(*cache_, again, 0, backed, 0, /*zero=*/true));
  EXPECT_GE(cache_->Stats().zeroed_bytes, g.Extent(p) * g.regions);
  EXPECT_TRUE(Consistent(*cache_));
}

TEST_P(KVCacheTest, ZeroOnReuseZeroesPooledHandlesMappedElsewhere) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  KVCacheOptions o = Options(3);
  o.zero_on_reuse = true;
  o.defer_reclaim = false;  // Free returns the handles to the pool.
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 2 * p);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot());
  VATTN_ASSERT_OK(cache_->Grow(a, p));
  const std::int64_t backed = Slot(*cache_, a).backed_tokens;
  WriteTokens(*cache_, a, 0, backed, 22);
  VATTN_ASSERT_OK(cache_->Free(a));
  VATTN_ASSERT_OK_AND_ASSIGN(int keep, cache_->AllocSlot());
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot());
  ASSERT_NE(b, a);
  (void)keep;
  const std::int64_t creates = cache_->Stats().create_calls;
  VATTN_ASSERT_OK(cache_->Grow(b, p));
  EXPECT_EQ(cache_->Stats().create_calls, creates) << "pooled handles reused";
  EXPECT_TRUE(CheckTokens(*cache_, b, 0, backed, 0, /*zero=*/true));
  EXPECT_TRUE(Consistent(*cache_));
}

// Off (the default): the Host backend shows the old request's data, both in
// a reused slot and through a pooled handle mapped elsewhere; this is what
// zero_on_reuse exists to prevent.
TEST_P(KVCacheTest, WithoutZeroOnReuseOldDataIsVisible) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  KVCacheOptions o = Options(3);
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 2 * p);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache_->AllocSlot(p));
  VATTN_ASSERT_OK(cache_->Grow(slot, p));
  WriteTokens(*cache_, slot, 0, p, 23);
  VATTN_ASSERT_OK(cache_->Free(slot));
  VATTN_ASSERT_OK_AND_ASSIGN(int again, cache_->AllocSlot(p));
  ASSERT_EQ(again, slot);
  VATTN_ASSERT_OK(cache_->Grow(again, p));
  EXPECT_TRUE(CheckTokens(*cache_, again, 0, p, 23));
  EXPECT_EQ(cache_->Stats().zeroed_bytes, 0);
}

TEST_P(KVCacheTest, WithoutZeroOnReusePooledHandleShowsOldData) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  KVCacheOptions o = Options(3);
  o.defer_reclaim = false;
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 2 * p);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot());
  VATTN_ASSERT_OK(cache_->Grow(a, p));
  WriteTokens(*cache_, a, 0, p, 24);
  VATTN_ASSERT_OK(cache_->Free(a));
  VATTN_ASSERT_OK_AND_ASSIGN(int keep, cache_->AllocSlot());
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot());
  ASSERT_NE(b, a);
  (void)keep;
  VATTN_ASSERT_OK(cache_->Grow(b, p));
  // Some of a's bytes show up in b (the same physical memory). In
  // layer-major the handles may land in other regions, so only "some".
  EXPECT_TRUE(AnyNonZero(*cache_, b, 0, p));
}

// ---- Fences ------------------------------------------------------------------

TEST_P(KVCacheTest, FreeWithAFenceOnHostCompletesAtOnce) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  KVCacheOptions o = Options(2);
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 2 * p);
  o.memory_budget_bytes = static_cast<std::size_t>(g.Extent(p) * g.regions);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot());
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot());
  VATTN_ASSERT_OK(cache_->Grow(a, p));
  int dummy_stream = 0;
  VATTN_ASSERT_OK(cache_->Free(a, Stream::FromHandle(&dummy_stream)));
  EXPECT_EQ(backend_->counters().fences, 0);
  // b's growth reclaims a's memory at once, without waiting.
  VATTN_ASSERT_OK(cache_->Grow(b, p));
  const CacheStats st = cache_->Stats();
  EXPECT_EQ(st.fence_waits, 0);
  EXPECT_EQ(st.reclaimed_extents, 1);
  EXPECT_EQ(backend_->counters().fences, 0);
  // The default stream too.
  VATTN_ASSERT_OK(cache_->Free(b, Stream::Legacy()));
  EXPECT_EQ(backend_->counters().fences, 0);
  EXPECT_TRUE(Consistent(*cache_));
}

// ---- Bad input -----------------------------------------------------------------

TEST_P(KVCacheTest, BadCallsChangeNothing) {
  const Shape& s = shape();
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  KVCacheOptions o = Options(2);
  o.max_tokens = std::max<std::int64_t>(s.max_tokens, 2 * p);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot());
  VATTN_ASSERT_OK(cache_->Grow(a, p));
  WriteTokens(*cache_, a, 0, p, 31);
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot());
  VATTN_ASSERT_OK(cache_->Grow(b, 1));
  VATTN_ASSERT_OK(cache_->Free(b));  // b: idle, with memory.
  Snapshot before = Snapshot::Of(*cache_);

  using absl::StatusCode;
  const int bad_slots[] = {-1, 2, 1000, std::numeric_limits<int>::min(),
                           std::numeric_limits<int>::max()};
  for (int bad : bad_slots) {
    VATTN_EXPECT_CODE(cache_->Grow(bad, 1), StatusCode::kInvalidArgument);
    VATTN_EXPECT_CODE(cache_->Shrink(bad, 0), StatusCode::kInvalidArgument);
    VATTN_EXPECT_CODE(cache_->Free(bad), StatusCode::kInvalidArgument);
    VATTN_EXPECT_CODE(cache_->GetSlot(bad), StatusCode::kInvalidArgument);
    EXPECT_TRUE(Unchanged(before, *cache_)) << "slot " << bad;
  }
  VATTN_EXPECT_CODE(cache_->Grow(a, -1), StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(cache_->Grow(a, o.max_tokens + 1), StatusCode::kOutOfRange);
  VATTN_EXPECT_CODE(cache_->Grow(a, std::numeric_limits<std::int64_t>::max()),
                    StatusCode::kOutOfRange);
  VATTN_EXPECT_CODE(cache_->Grow(a, std::numeric_limits<std::int64_t>::min()),
                    StatusCode::kInvalidArgument);
  EXPECT_TRUE(Unchanged(before, *cache_));
  VATTN_EXPECT_CODE(cache_->Shrink(a, p + 1), StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(cache_->Shrink(a, -1), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Unchanged(before, *cache_));
  // The freed slot b.
  VATTN_EXPECT_CODE(cache_->Grow(b, 1), StatusCode::kFailedPrecondition);
  VATTN_EXPECT_CODE(cache_->Shrink(b, 0), StatusCode::kFailedPrecondition);
  VATTN_EXPECT_CODE(cache_->Free(b), StatusCode::kFailedPrecondition);
  VATTN_EXPECT_CODE(cache_->Free(b, Stream::Legacy()),
                    StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Unchanged(before, *cache_));
  // Bad hints.
  VATTN_EXPECT_CODE(cache_->AllocSlot(-1), StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(cache_->AllocSlot(o.max_tokens + 1),
                    StatusCode::kOutOfRange);
  EXPECT_TRUE(Unchanged(before, *cache_));
  // Step with one bad request changes nothing, even for the good ones.
  const StepRequest bad_step[] = {{a, p + 1}, {b, 1}};
  VATTN_EXPECT_CODE(cache_->Step(bad_step), StatusCode::kFailedPrecondition);
  const StepRequest bad_step2[] = {{a, p + 1}, {a, o.max_tokens + 1}};
  VATTN_EXPECT_CODE(cache_->Step(bad_step2), StatusCode::kOutOfRange);
  EXPECT_TRUE(Unchanged(before, *cache_));

  // All slots busy.
  VATTN_ASSERT_OK_AND_ASSIGN(int b2, cache_->AllocSlot());
  EXPECT_EQ(b2, b);
  before = Snapshot::Of(*cache_);
  VATTN_EXPECT_CODE(cache_->AllocSlot(), StatusCode::kResourceExhausted);
  VATTN_EXPECT_CODE(cache_->AllocSlot(1), StatusCode::kResourceExhausted);
  EXPECT_TRUE(Unchanged(before, *cache_));

  // The data and the slots still work.
  EXPECT_TRUE(CheckTokens(*cache_, a, 0, p, 31));
  VATTN_ASSERT_OK(cache_->Grow(a, o.max_tokens));
  EXPECT_TRUE(CheckTokens(*cache_, a, 0, p, 31));
  VATTN_ASSERT_OK(cache_->Free(a));
  VATTN_EXPECT_CODE(cache_->Free(a), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Consistent(*cache_));
}

// ---- Pre-created handles ------------------------------------------------------

TEST_P(KVCacheTest, PreallocatedHandlesServeTheFirstGrow) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  const std::int64_t e = g.Extent(p);
  KVCacheOptions o = Options(3);
  o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 2 * p);
  o.prealloc_handles = 2 * g.regions;
  o.prealloc_handle_bytes = static_cast<std::size_t>(e);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  CacheStats st = cache_->Stats();
  EXPECT_EQ(st.create_calls, 2 * g.regions);
  EXPECT_EQ(st.pooled_bytes, 2 * e * g.regions);
  EXPECT_EQ(st.physical_bytes, 2 * e * g.regions);
  EXPECT_EQ(st.mapped_bytes, 0);
  EXPECT_TRUE(Consistent(*cache_));

  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot(p));
  VATTN_ASSERT_OK(cache_->Grow(a, p));
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot(p));
  VATTN_ASSERT_OK(cache_->Grow(b, p));
  st = cache_->Stats();
  EXPECT_EQ(st.create_calls, 2 * g.regions) << "no handle created";
  EXPECT_EQ(st.pooled_bytes, 0);
  EXPECT_EQ(st.map_calls, 2 * g.regions);
  WriteTokens(*cache_, a, 0, p, 41);
  WriteTokens(*cache_, b, 0, p, 42);
  EXPECT_TRUE(CheckTokens(*cache_, a, 0, p, 41));
  EXPECT_TRUE(CheckTokens(*cache_, b, 0, p, 42));
  EXPECT_TRUE(Consistent(*cache_));
}

TEST_P(KVCacheTest, PreallocationDefaultsToOneGranuleAndMustFitTheBudget) {
  const Geometry g = geo();
  KVCacheOptions o = Options(2);
  o.memory_budget_bytes = static_cast<std::size_t>(3 * kGran * g.regions);
  // More handles than the budget holds: refused up front, naming the field,
  // rather than silently cut short.
  o.prealloc_handles = 1000;
  std::shared_ptr<Backend> host = MustHost();
  ASSERT_NE(host, nullptr);
  auto refused = KVCache::Create(o, host);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("prealloc_handles"),
            std::string::npos)
      << refused.status();
  EXPECT_TRUE(host->counters().Empty());
  // Exactly what fits: one granule each.
  o.prealloc_handles = static_cast<int>(3 * g.regions);
  ASSERT_NO_FATAL_FAILURE(Make(o));
  const CacheStats st = cache_->Stats();
  EXPECT_EQ(st.physical_bytes, st.budget_bytes);
  EXPECT_EQ(st.pooled_bytes, st.physical_bytes);
  EXPECT_EQ(st.pooled_bytes, st.create_calls * kGran);
  EXPECT_EQ(st.create_calls, 3 * g.regions);
  EXPECT_TRUE(Consistent(*cache_));
}

// ---- Teardown ------------------------------------------------------------------

// Destroying a cache in every kind of state (active slots, idle slots with
// memory, pooled handles, right after failed calls) gives everything back.
TEST_P(KVCacheTest, DestroyGivesEverythingBack) {
  const Geometry g = geo();
  const std::int64_t p = g.TokensPerGranule();
  for (int scenario = 0; scenario < 4; ++scenario) {
    SCOPED_TRACE(::testing::Message() << "scenario " << scenario);
    std::shared_ptr<Backend> backend = MustHost();
    ASSERT_NE(backend, nullptr);
    KVCacheOptions o = Options(3);
    o.max_tokens = std::max<std::int64_t>(shape().max_tokens, 4 * p);
    o.prealloc_handles = scenario == 3 ? static_cast<int>(g.regions) : 0;
    o.defer_reclaim = scenario != 2;
    o.memory_budget_bytes =
        static_cast<std::size_t>(2 * g.Extent(p) * g.regions);
    {
      VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> cache,
                                 KVCache::Create(o, backend));
      EXPECT_EQ(backend->counters().reservations, 1);
      VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlot());
      VATTN_ASSERT_OK(cache->Grow(a, p));
      if (scenario >= 1) {
        VATTN_ASSERT_OK_AND_ASSIGN(int b, cache->AllocSlot());
        VATTN_ASSERT_OK(cache->Grow(b, p));
        VATTN_ASSERT_OK(cache->Free(b));
        VATTN_EXPECT_CODE(cache->Grow(a, o.max_tokens),
                          absl::StatusCode::kResourceExhausted);
        VATTN_EXPECT_CODE(cache->Free(b), absl::StatusCode::kFailedPrecondition);
      }
      EXPECT_TRUE(Consistent(*cache));
      EXPECT_FALSE(backend->counters().Empty());
    }
    EXPECT_TRUE(AllGivenBack(*backend));
  }
}

INSTANTIATE_TEST_SUITE_P(Host, KVCacheTest, ::testing::ValuesIn(AllParams()),
                         ParamName);

// ---------------------------------------------------------------------------
// Options and Create.

// Create with bad options: InvalidArgument naming the field, nothing made.
TEST(KVCacheOptionsTest, InvalidOptionsNameTheField) {
  std::shared_ptr<Backend> backend = MustHost();
  ASSERT_NE(backend, nullptr);
  struct Case {
    const char* field;
    void (*mutate)(KVCacheOptions&);
  };
  const Case cases[] = {
      {"num_layers", [](KVCacheOptions& o) { o.num_layers = 0; }},
      {"num_layers", [](KVCacheOptions& o) { o.num_layers = -3; }},
      {"num_kv_heads", [](KVCacheOptions& o) { o.num_kv_heads = 0; }},
      {"num_kv_heads", [](KVCacheOptions& o) { o.num_kv_heads = -1; }},
      {"head_dim", [](KVCacheOptions& o) { o.head_dim = 0; }},
      {"head_dim", [](KVCacheOptions& o) { o.head_dim = -128; }},
      {"max_slots", [](KVCacheOptions& o) { o.max_slots = 0; }},
      {"max_slots", [](KVCacheOptions& o) { o.max_slots = -1; }},
      {"max_tokens", [](KVCacheOptions& o) { o.max_tokens = 0; }},
      {"max_tokens", [](KVCacheOptions& o) { o.max_tokens = -5; }},
      {"max_tokens",
       [](KVCacheOptions& o) {
         o.max_tokens = std::numeric_limits<std::int64_t>::min();
       }},
      {"dtype", [](KVCacheOptions& o) { o.dtype = static_cast<DType>(99); }},
      {"dtype", [](KVCacheOptions& o) { o.dtype = static_cast<DType>(-1); }},
      {"layout", [](KVCacheOptions& o) { o.layout = static_cast<Layout>(2); }},
      {"layout", [](KVCacheOptions& o) { o.layout = static_cast<Layout>(-7); }},
      // Products that overflow.
      {"max_tokens",
       [](KVCacheOptions& o) {
         o.max_tokens = std::numeric_limits<std::int64_t>::max();
       }},
      {"max_slots",
       [](KVCacheOptions& o) {
         o.max_slots = std::numeric_limits<int>::max();
         o.max_tokens = std::int64_t{1} << 40;
       }},
      {"num_layers",
       [](KVCacheOptions& o) {
         o.num_layers = std::numeric_limits<int>::max();
         o.num_kv_heads = std::numeric_limits<int>::max();
         o.head_dim = std::numeric_limits<int>::max();
       }},
      {"min_extent_bytes",
       [](KVCacheOptions& o) {
         o.min_extent_bytes = 4 << 20;
         o.max_extent_bytes = 2 << 20;
       }},
      {"prealloc_handles", [](KVCacheOptions& o) { o.prealloc_handles = -1; }},
      {"map_ahead_tokens", [](KVCacheOptions& o) { o.map_ahead_tokens = -1; }},
      {"pool_low_water", [](KVCacheOptions& o) { o.pool_low_water = -1; }},
      {"pool_high_water",
       [](KVCacheOptions& o) {
         o.pool_low_water = 4;
         o.pool_high_water = 2;
       }},
      // Sizes beyond any address space (they would wrap as int64).
      {"prealloc_handle_bytes",
       [](KVCacheOptions& o) {
         o.prealloc_handles = 1;
         o.prealloc_handle_bytes = std::numeric_limits<std::size_t>::max();
       }},
      {"prealloc_handle_bytes",
       [](KVCacheOptions& o) {
         o.prealloc_handles = 1;
         o.prealloc_handle_bytes = std::size_t{1} << 63;
       }},
      {"memory_budget_bytes",
       [](KVCacheOptions& o) {
         o.memory_budget_bytes = std::numeric_limits<std::size_t>::max();
       }},
      {"min_extent_bytes",
       [](KVCacheOptions& o) {
         o.min_extent_bytes = std::numeric_limits<std::size_t>::max();
         o.max_extent_bytes = 0;
       }},
      {"max_extent_bytes",
       [](KVCacheOptions& o) {
         o.max_extent_bytes = std::numeric_limits<std::size_t>::max();
       }},
  };
  for (const Case& c : cases) {
    KVCacheOptions o = MakeOptions(kShapes[1], Layout::kTokenMajor, 2);
    c.mutate(o);
    const absl::Status v = o.Validate();
    EXPECT_EQ(v.code(), absl::StatusCode::kInvalidArgument)
        << c.field << ": " << v;
    EXPECT_NE(v.message().find(c.field), absl::string_view::npos)
        << "message does not name " << c.field << ": " << v;
    absl::StatusOr<std::unique_ptr<KVCache>> cache = KVCache::Create(o, backend);
    EXPECT_EQ(cache.status().code(), absl::StatusCode::kInvalidArgument)
        << c.field << ": " << cache.status();
    EXPECT_TRUE(AllGivenBack(*backend)) << c.field;
    EXPECT_EQ(backend->counters().calls_of(BackendOp::kReserve), 0) << c.field;
  }
  // The defaults are valid.
  VATTN_EXPECT_OK(KVCacheOptions{}.Validate());
  // A null backend.
  VATTN_EXPECT_CODE(
      KVCache::Create(MakeOptions(kShapes[1], Layout::kTokenMajor, 2), nullptr),
      absl::StatusCode::kInvalidArgument);
}

TEST(KVCacheOptionsTest, CacheLargerThanTheBackendCanReserve) {
  HostBackendOptions ho;
  ho.granularity = kGranularity;
  ho.max_reservation_bytes = 16 * kGranularity;
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> backend,
                             MakeHostBackend(ho));
  for (Layout layout : {Layout::kTokenMajor, Layout::kLayerMajor}) {
    KVCacheOptions o = MakeOptions(kShapes[0], layout, 8);
    absl::StatusOr<std::unique_ptr<KVCache>> cache = KVCache::Create(o, backend);
    EXPECT_EQ(cache.status().code(), absl::StatusCode::kInvalidArgument)
        << cache.status();
    EXPECT_NE(cache.status().message().find("max_reservation_bytes"),
              absl::string_view::npos)
        << cache.status();
    EXPECT_NE(cache.status().message().find("max_slots"),
              absl::string_view::npos)
        << cache.status();
    EXPECT_TRUE(AllGivenBack(*backend));
    EXPECT_EQ(backend->counters().calls_of(BackendOp::kReserve), 0);
  }
  // Exactly the largest reservation fits.
  KVCacheOptions o = MakeOptions(kShapes[2], Layout::kTokenMajor, 1);
  o.max_tokens = 16 * kGran / Geometry(kShapes[2], Layout::kTokenMajor).token_bytes;
  {
    VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> cache,
                               KVCache::Create(o, backend));
  }
  EXPECT_TRUE(AllGivenBack(*backend));
}

TEST(KVCacheOptionsTest, BudgetBelowOneExtentIsInvalid) {
  std::shared_ptr<Backend> backend = MustHost();
  ASSERT_NE(backend, nullptr);
  for (Layout layout : {Layout::kTokenMajor, Layout::kLayerMajor}) {
    const Geometry g(kShapes[1], layout);
    KVCacheOptions o = MakeOptions(kShapes[1], layout, 2);
    for (std::size_t budget :
         {std::size_t{1}, static_cast<std::size_t>(kGran * g.regions - 1)}) {
      o.memory_budget_bytes = budget;
      absl::StatusOr<std::unique_ptr<KVCache>> cache =
          KVCache::Create(o, backend);
      EXPECT_EQ(cache.status().code(), absl::StatusCode::kInvalidArgument)
          << cache.status();
      EXPECT_NE(cache.status().message().find("memory_budget_bytes"),
                absl::string_view::npos)
          << cache.status();
      EXPECT_TRUE(AllGivenBack(*backend));
    }
    // One extent of every tensor is enough.
    o.memory_budget_bytes = static_cast<std::size_t>(kGran * g.regions);
    VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> cache,
                               KVCache::Create(o, backend));
    VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache->AllocSlot());
    VATTN_ASSERT_OK(cache->Grow(slot, 1));
    cache.reset();
    EXPECT_TRUE(AllGivenBack(*backend));
  }
}

// A failing Reserve (the backend's physical limit does not matter; its
// address space does) leaves nothing behind. Uses fault injection.
TEST(KVCacheOptionsTest, CreateFailuresLeaveNothingBehind) {
  std::shared_ptr<Backend> host = MustHost();
  ASSERT_NE(host, nullptr);
  for (BackendOp op : {BackendOp::kReserve, BackendOp::kCreate}) {
    VATTN_ASSERT_OK_AND_ASSIGN(
        std::shared_ptr<Backend> faulty,
        MakeFaultInjectionBackend(
            host, FaultPlan::FailNth(op, op == BackendOp::kReserve ? 2 : 6)));
    KVCacheOptions o = MakeOptions(kShapes[1], Layout::kLayerMajor, 2);
    o.prealloc_handles = 4;
    {  // The first Create's calls all succeed.
      VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> cache,
                                 KVCache::Create(o, faulty));
    }
    if (op == BackendOp::kReserve) {
      EXPECT_FALSE(KVCache::Create(o, faulty).ok());
    } else {
      // Pre-creating stops at the failed handle: Create fails, with nothing
      // left behind.
      EXPECT_FALSE(KVCache::Create(o, faulty).ok());
    }
    EXPECT_TRUE(AllGivenBack(*faulty));
    EXPECT_TRUE(AllGivenBack(*host));
  }
}

// ---------------------------------------------------------------------------
// Several caches.

struct Tenant {
  Shape shape;
  Layout layout;
  std::shared_ptr<Backend> backend;
  std::unique_ptr<KVCache> cache;
  std::vector<int> slots;
};

TEST(KVCacheSideBySideTest, SeveralCachesOnOneAndOnSeparateBackends) {
  std::shared_ptr<Backend> shared = MustHost();
  std::shared_ptr<Backend> own = MustHost(0, std::size_t{2} << 20);  // 2 MiB.
  ASSERT_NE(shared, nullptr);
  ASSERT_NE(own, nullptr);
  std::vector<Tenant> tenants;
  tenants.push_back({kShapes[0], Layout::kTokenMajor, shared, nullptr, {}});
  tenants.push_back({kShapes[1], Layout::kLayerMajor, shared, nullptr, {}});
  tenants.push_back({kShapes[3], Layout::kTokenMajor, shared, nullptr, {}});
  tenants.push_back({kShapes[2], Layout::kLayerMajor, own, nullptr, {}});
  tenants.push_back({kShapes[1], Layout::kTokenMajor, own, nullptr, {}});
  for (std::size_t i = 0; i < tenants.size(); ++i) {
    Tenant& t = tenants[i];
    KVCacheOptions o = MakeOptions(t.shape, t.layout, 2);
    o.defer_reclaim = i % 2 == 0;
    VATTN_ASSERT_OK_AND_ASSIGN(t.cache, KVCache::Create(o, t.backend));
    for (int j = 0; j < 2; ++j) {
      VATTN_ASSERT_OK_AND_ASSIGN(int slot, t.cache->AllocSlot());
      VATTN_ASSERT_OK(t.cache->Grow(slot, t.shape.max_tokens / (j + 1)));
      WriteTokens(*t.cache, slot, 0, t.shape.max_tokens / (j + 1),
                  static_cast<std::uint32_t>(1000 + 10 * i + j));
      t.slots.push_back(slot);
    }
  }
  auto verify = [&]() {
    for (std::size_t i = 0; i < tenants.size(); ++i) {
      if (tenants[i].cache == nullptr) continue;  // Destroyed.
      Tenant& t = tenants[i];
      for (int j = 0; j < 2; ++j) {
        EXPECT_TRUE(CheckTokens(*t.cache, t.slots[j], 0,
                                t.shape.max_tokens / (j + 1),
                                static_cast<std::uint32_t>(1000 + 10 * i + j)))
            << "cache " << i;
      }
    }
  };
  verify();
  // Growth, frees and reuse in one cache leave the others alone.
  Tenant& t1 = tenants[1];
  VATTN_ASSERT_OK(t1.cache->Free(t1.slots[1]));
  VATTN_ASSERT_OK_AND_ASSIGN(t1.slots[1], t1.cache->AllocSlot());
  VATTN_ASSERT_OK(t1.cache->Grow(t1.slots[1], t1.shape.max_tokens / 2));
  WriteTokens(*t1.cache, t1.slots[1], 0, t1.shape.max_tokens / 2, 1011);
  verify();
  // Destroying one cache leaves the others' data and mappings alone.
  const std::int64_t shared_res = shared->counters().reservations;
  tenants[0].cache.reset();
  EXPECT_EQ(shared->counters().reservations, shared_res - 1);
  verify();
  tenants[3].cache.reset();
  verify();
  for (Tenant& t : tenants) t.cache.reset();
  EXPECT_TRUE(AllGivenBack(*shared));
  EXPECT_TRUE(AllGivenBack(*own));
}

// ---------------------------------------------------------------------------
// Threads: each thread owns the slots it allocates and runs requests (alloc,
// prefill, decode, write, verify, shrink, free) for about half a second per
// layout. Now and then a thread also runs a short side request that it frees
// at once, leaving memory in an idle slot; with a budget below what the
// threads could hold at once, slots' memory is reclaimed by other threads all
// the time, and a Grow sometimes fails with ResourceExhausted (allowed, but
// the slot must then be unchanged). Run under TSan in CI.

class KVCacheThreadTest : public ::testing::TestWithParam<Layout> {};

struct ThreadTally {
  std::atomic<int> requests{0};
  std::atomic<int> exhausted{0};
  std::atomic<int> failures{0};
};

// One request in `slot`: grows to `prompt`, then token by token to `end`,
// writing every token; verifies it all. Returns the tokens written.
std::int64_t RunRequest(KVCache& cache, int slot, std::int64_t prompt,
                        std::int64_t end, std::uint32_t tag,
                        ThreadTally& tally) {
  std::int64_t written = 0;
  for (std::int64_t len = prompt; len <= end; ++len) {
    const SlotInfo before = Slot(cache, slot);
    const absl::Status s = cache.Grow(slot, len);
    if (s.code() == absl::StatusCode::kResourceExhausted) {
      ++tally.exhausted;
      const SlotInfo after = Slot(cache, slot);
      if (!SameSlot(before, after)) {
        ++tally.failures;
        ADD_FAILURE() << "slot changed by a failed Grow: " << Describe(before)
                      << " -> " << Describe(after);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      break;
    }
    if (!s.ok()) {
      ++tally.failures;
      ADD_FAILURE() << "Grow: " << s;
      break;
    }
    WriteTokens(cache, slot, written, len, tag);
    written = len;
  }
  if (written > 0) {
    ::testing::AssertionResult r = CheckTokens(cache, slot, 0, written, tag);
    if (!r) {
      ++tally.failures;
      ADD_FAILURE() << r.message();
    }
  }
  return written;
}

TEST_P(KVCacheThreadTest, ConcurrentRequestsOnDistinctSlots) {
  Shape shape = kShapes[1];  // bf16 5 x 3 x 64.
  shape.max_tokens = 400;
  const Geometry g(shape, GetParam());
  std::shared_ptr<Backend> backend = MustHost();
  ASSERT_NE(backend, nullptr);
  constexpr int kThreads = 4;
  KVCacheOptions o = MakeOptions(shape, GetParam(), 2 * kThreads + 2);
  const std::int64_t slot_bytes =
      RoundUp(shape.max_tokens * g.token_bytes, kGran) * g.regions;
  o.memory_budget_bytes = static_cast<std::size_t>(3 * slot_bytes);
  o.max_extent_bytes = 2 * kGranularity;
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> cache,
                             KVCache::Create(o, backend));

  // Half a second, longer (up to 10 s, for slow sanitizer builds) until some
  // idle slot's memory has been reclaimed by another thread.
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::milliseconds(500);
  const auto hard_deadline = start + std::chrono::seconds(10);
  auto keep_going = [&]() {
    const auto now = std::chrono::steady_clock::now();
    return now < deadline ||
           (now < hard_deadline && cache->Stats().reclaimed_extents == 0);
  };
  ThreadTally tally;
  std::vector<std::thread> threads;
  for (int th = 0; th < kThreads; ++th) {
    threads.emplace_back([&, th] {
      std::mt19937 rng(static_cast<std::uint32_t>(77 + th));
      for (std::uint32_t iter = 0; keep_going(); ++iter) {
        const std::uint32_t tag =
            static_cast<std::uint32_t>(th) * 1000000 + 2 * iter;
        const std::int64_t prompt =
            1 + static_cast<std::int64_t>(rng() % (shape.max_tokens / 2));
        const std::int64_t end = std::min<std::int64_t>(
            shape.max_tokens,
            prompt + static_cast<std::int64_t>(rng() % 24));
        absl::StatusOr<int> slot = cache->AllocSlot(prompt);
        if (!slot.ok()) {
          ++tally.failures;
          ADD_FAILURE() << "AllocSlot: " << slot.status();
          return;
        }
        if (rng() % 2 == 0) {
          // A short side request in a second slot, freed at once.
          absl::StatusOr<int> side = cache->AllocSlot();
          if (!side.ok()) {
            ++tally.failures;
            ADD_FAILURE() << "AllocSlot (side): " << side.status();
            return;
          }
          const std::int64_t n =
              1 + static_cast<std::int64_t>(rng() % shape.max_tokens);
          RunRequest(*cache, *side, n, n, tag + 1, tally);
          const absl::Status s = cache->Free(*side);
          if (!s.ok()) {
            ++tally.failures;
            ADD_FAILURE() << "Free (side): " << s;
          }
        }
        const std::int64_t written =
            RunRequest(*cache, *slot, prompt, end, tag, tally);
        if (written > 0) {
          const absl::Status s = cache->Shrink(*slot, written / 2);
          if (!s.ok()) {
            ++tally.failures;
            ADD_FAILURE() << "Shrink: " << s;
          }
          if (!CheckTokens(*cache, *slot, 0, written, tag)) ++tally.failures;
        }
        const absl::Status s = cache->Free(*slot);
        if (!s.ok()) {
          ++tally.failures;
          ADD_FAILURE() << "Free: " << s;
          return;
        }
        ++tally.requests;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(tally.failures.load(), 0);
  EXPECT_GT(tally.requests.load(), kThreads);
  const CacheStats st = cache->Stats();
  EXPECT_EQ(st.active_slots, 0);
  EXPECT_EQ(st.logical_bytes, 0);
  EXPECT_TRUE(Consistent(*cache));
  ::testing::Test::RecordProperty("requests", tally.requests.load());
  ::testing::Test::RecordProperty("exhausted", tally.exhausted.load());
  ::testing::Test::RecordProperty("reclaimed_extents",
                                  static_cast<int>(st.reclaimed_extents));
  ::testing::Test::RecordProperty("reuse_hits", static_cast<int>(st.reuse_hits));
  // The budget was tight enough that threads took memory from idle slots.
  EXPECT_GT(st.reclaimed_extents, 0);
  EXPECT_GT(st.reuse_hits, 0);
  cache.reset();
  EXPECT_TRUE(AllGivenBack(*backend));
}

INSTANTIATE_TEST_SUITE_P(Host, KVCacheThreadTest,
                         ::testing::Values(Layout::kTokenMajor,
                                           Layout::kLayerMajor),
                         [](const ::testing::TestParamInfo<Layout>& p) {
                           return std::string(p.param == Layout::kTokenMajor
                                                  ? "TokenMajor"
                                                  : "LayerMajor");
                         });

// A growth extent larger than needed is speculative: it must not take memory
// from idle slots. Under pressure the Grow maps exactly what it needs and the
// idle slot keeps its extent for the next request.
TEST(KVCachePolicyTest, GrowthExtentNeverEvictsIdleSlots) {
  HostBackendOptions host_opts;
  auto host = MakeHostBackend(host_opts);
  ASSERT_TRUE(host.ok());
  KVCacheOptions o;
  o.num_layers = 1;
  o.num_kv_heads = 8;
  o.head_dim = 128;  // 4 KiB per token: a 2 MiB granule holds 512 tokens.
  o.max_extent_bytes = std::size_t{32} << 20;  // Decode extents double.
  o.max_slots = 2;
  o.max_tokens = 4096;
  o.memory_budget_bytes = std::size_t{8} << 20;  // 4 granules.
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, *host));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlot(512));
  VATTN_ASSERT_OK(cache->Grow(a, 512));
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache->AllocSlot(0));
  VATTN_ASSERT_OK(cache->Free(a));  // Idle, holding 2 MiB.
  VATTN_ASSERT_OK(cache->Grow(b, 1024));  // One 4 MiB extent.
  // Decode growth would prefer a 4 MiB extent; only 2 MiB fit without
  // touching slot a.
  VATTN_ASSERT_OK(cache->Grow(b, 1025));
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo idle, cache->GetSlot(a));
  EXPECT_EQ(idle.mapped_bytes, std::int64_t{2} << 20);
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo grown, cache->GetSlot(b));
  EXPECT_EQ(grown.mapped_bytes, std::int64_t{6} << 20);
  EXPECT_EQ(cache->Stats().reclaimed_extents, 0);
  // When the memory really is needed, the idle slot gives it up.
  VATTN_ASSERT_OK(cache->Grow(b, 1537));
  VATTN_ASSERT_OK_AND_ASSIGN(idle, cache->GetSlot(a));
  EXPECT_EQ(idle.mapped_bytes, 0);
  EXPECT_EQ(cache->Stats().reclaimed_extents, 1);
}

// Under pressure, an idle extent whose size fits what the Grow can use is
// moved as it is: one Unmap and one Map, no Destroy and no Create.
TEST(KVCachePolicyTest, ReclaimedExtentOfAFittingSizeIsMappedAsItIs) {
  auto host = MakeHostBackend();
  ASSERT_TRUE(host.ok());
  KVCacheOptions o;
  o.num_layers = 1;
  o.num_kv_heads = 8;
  o.head_dim = 128;  // 4 KiB per token: a 2 MiB granule holds 512 tokens.
  o.max_extent_bytes = std::size_t{32} << 20;  // Decode extents double.
  o.max_slots = 2;
  o.max_tokens = 4096;
  o.memory_budget_bytes = std::size_t{8} << 20;
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, *host));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlot(1024));
  VATTN_ASSERT_OK(cache->Grow(a, 1024));  // One 4 MiB extent.
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache->AllocSlot(0));
  VATTN_ASSERT_OK(cache->Free(a));
  VATTN_ASSERT_OK(cache->Grow(b, 1024));  // 4 MiB: the budget is full.
  const CacheStats before = cache->Stats();
  // Needs 2 MiB, would like 4 MiB: a's 4 MiB extent moves over whole.
  VATTN_ASSERT_OK(cache->Grow(b, 1025));
  const CacheStats after = cache->Stats();
  EXPECT_EQ(after.create_calls, before.create_calls);
  EXPECT_EQ(after.destroy_calls, before.destroy_calls);
  EXPECT_EQ(after.unmap_calls - before.unmap_calls, 1);
  EXPECT_EQ(after.map_calls - before.map_calls, 1);
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo grown, cache->GetSlot(b));
  EXPECT_EQ(grown.mapped_bytes, std::int64_t{8} << 20);
  EXPECT_LE(after.peak_physical_bytes, std::int64_t{8} << 20);
}

// A request placed in a slot a longer one used adopts only the extents its
// hint needs; the rest is surplus: adopted for free as it grows, and taken
// back under pressure, so a short request never pins a long one's memory.
TEST(KVCachePolicyTest, SurplusOfAReusedSlotIsAdoptedOrReclaimed) {
  auto host = MakeHostBackend();
  ASSERT_TRUE(host.ok());
  KVCacheOptions o;
  o.num_layers = 1;
  o.num_kv_heads = 8;
  o.head_dim = 128;  // 4 KiB per token: a 2 MiB granule holds 512 tokens.
  o.max_slots = 2;
  o.max_tokens = 4096;
  o.max_extent_bytes = std::size_t{2} << 20;  // Fixed 2 MiB extents.
  o.memory_budget_bytes = std::size_t{8} << 20;
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, *host));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlot(512));
  for (std::int64_t t = 512; t <= 2048; t += 512) {
    VATTN_ASSERT_OK(cache->Grow(a, t));  // Four 2 MiB extents.
  }
  VATTN_ASSERT_OK(cache->Free(a));
  VATTN_ASSERT_OK_AND_ASSIGN(int reused, cache->AllocSlot(100));
  ASSERT_EQ(reused, a);
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache->GetSlot(a));
  EXPECT_EQ(info.mapped_bytes, std::int64_t{8} << 20);
  EXPECT_EQ(info.adopted_bytes, std::int64_t{2} << 20);
  EXPECT_EQ(info.backed_tokens, 512);
  EXPECT_EQ(cache->Stats().surplus_bytes, std::int64_t{6} << 20);
  // Growing into the surplus adopts it: no driver call.
  const CacheStats before = cache->Stats();
  VATTN_ASSERT_OK(cache->Grow(a, 1000));
  CacheStats after = cache->Stats();
  EXPECT_EQ(after.map_calls, before.map_calls);
  EXPECT_EQ(after.create_calls, before.create_calls);
  EXPECT_EQ(after.adopted_extents - before.adopted_extents, 1);
  EXPECT_EQ(after.surplus_bytes, std::int64_t{4} << 20);
  // The budget is full; another request takes the surplus's last extent.
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache->AllocSlot(0));
  VATTN_ASSERT_OK(cache->Grow(b, 512));
  after = cache->Stats();
  EXPECT_EQ(after.reclaimed_extents, 1);
  EXPECT_EQ(after.surplus_bytes, std::int64_t{2} << 20);
  EXPECT_LE(after.peak_physical_bytes, std::int64_t{8} << 20);
  VATTN_ASSERT_OK_AND_ASSIGN(info, cache->GetSlot(a));
  EXPECT_EQ(info.length, 1000);
  EXPECT_GE(info.backed_tokens, 1000);
  EXPECT_EQ(info.mapped_bytes, std::int64_t{6} << 20);
  // A's request can still grow through what is left.
  VATTN_ASSERT_OK(cache->Grow(a, 1536));
  EXPECT_EQ(cache->Stats().surplus_bytes, 0);
}

// A request is not placed in an idle slot whose first extent is far larger
// than its hint (that extent cannot be split): a fresh slot is taken.
TEST(KVCachePolicyTest, AllocSlotAvoidsAnOversizedFirstExtent) {
  auto host = MakeHostBackend();
  ASSERT_TRUE(host.ok());
  KVCacheOptions o;
  o.num_layers = 1;
  o.num_kv_heads = 8;
  o.head_dim = 128;  // 4 KiB per token.
  o.max_slots = 2;
  o.max_tokens = 65536;
  o.max_extent_bytes = std::size_t{2} << 20;
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, *host));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlot(20000));
  VATTN_ASSERT_OK(cache->Grow(a, 20000));  // One ~80 MiB prefill extent.
  VATTN_ASSERT_OK(cache->Free(a));
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache->AllocSlot(100));
  EXPECT_NE(b, a) << "would waste ~78 MiB on a 100-token request";
  // A long request is placed there instead, with zero driver calls.
  const CacheStats before = cache->Stats();
  VATTN_ASSERT_OK_AND_ASSIGN(int c, cache->AllocSlot(19000));
  EXPECT_EQ(c, a);
  VATTN_ASSERT_OK(cache->Grow(c, 19000));
  EXPECT_EQ(cache->Stats().map_calls, before.map_calls);
}

}  // namespace
}  // namespace vattn
