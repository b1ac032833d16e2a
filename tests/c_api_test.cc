// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The C API (vattn/c_api.h) on the Host backend: every function, its
// conversions against the C++ API, and its error paths (NULL arguments,
// bad slots and layers, bad options, struct_size mismatches, the codes).
// tests/c_api_program.c proves the header is valid C99.

#include "vattn/c_api.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "vattn/backend.h"
#include "vattn/options.h"

// Sanitizer runtimes bring their own operator new; elsewhere this binary
// replaces it so a test can make every allocation on its thread fail.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define VATTN_TEST_SANITIZER 1
#endif
#endif
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define VATTN_TEST_SANITIZER 1
#endif

#if !defined(VATTN_TEST_SANITIZER)
namespace {
thread_local bool fail_allocations = false;
}  // namespace

// Out of line, so GCC does not see free() meet operator new's pointer
// (-Wmismatched-new-delete).
__attribute__((noinline)) void* operator new(std::size_t bytes) {
  if (fail_allocations) throw std::bad_alloc();
  if (void* p = std::malloc(bytes == 0 ? 1 : bytes)) return p;
  throw std::bad_alloc();
}
__attribute__((noinline)) void operator delete(void* p) noexcept {
  std::free(p);
}
__attribute__((noinline)) void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
#endif

namespace vattn {
namespace {

using ::testing::AllOf;
using ::testing::AnyOf;
using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string LastError() { return vattn_last_error(); }

// A small model: 2 layers x 2 heads x 8 dims, float32 (256 bytes a token).
vattn_cache_options SmallOptions() {
  vattn_cache_options o;
  vattn_cache_options_default(&o);
  o.num_layers = 2;
  o.num_kv_heads = 2;
  o.head_dim = 8;
  o.dtype = VATTN_DTYPE_FLOAT32;
  o.max_slots = 4;
  o.max_tokens = 32768;
  return o;
}

// Owns a host backend and a cache made with `options`.
class CApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(vattn_backend_host(&backend_), VATTN_OK) << LastError();
    ASSERT_NE(backend_, nullptr);
  }
  void TearDown() override {
    vattn_cache_destroy(cache_);
    vattn_backend_release(backend_);
  }
  void MakeCache(const vattn_cache_options& options) {
    ASSERT_EQ(vattn_cache_create(&options, backend_, &cache_), VATTN_OK)
        << LastError();
    ASSERT_NE(cache_, nullptr);
  }

  vattn_backend* backend_ = nullptr;
  vattn_cache* cache_ = nullptr;
};

TEST(CApiOptionsTest, DefaultsAreTheCppDefaults) {
  vattn_cache_options c;
  std::memset(&c, 0xAB, sizeof(c));
  vattn_cache_options_default(&c);
  const KVCacheOptions o;
  EXPECT_EQ(c.struct_size, sizeof(vattn_cache_options));
  EXPECT_EQ(c.num_layers, o.num_layers);
  EXPECT_EQ(c.num_kv_heads, o.num_kv_heads);
  EXPECT_EQ(c.head_dim, o.head_dim);
  EXPECT_EQ(c.dtype, static_cast<int>(o.dtype));
  EXPECT_EQ(c.max_slots, o.max_slots);
  EXPECT_EQ(c.max_tokens, o.max_tokens);
  EXPECT_EQ(c.layout, static_cast<int>(o.layout));
  EXPECT_EQ(c.memory_budget_bytes, o.memory_budget_bytes);
  EXPECT_EQ(c.min_extent_bytes, o.min_extent_bytes);
  EXPECT_EQ(c.max_extent_tokens, o.max_extent_tokens);
  EXPECT_EQ(c.max_extent_bytes, o.max_extent_bytes);
  EXPECT_EQ(c.prealloc_handles, o.prealloc_handles);
  EXPECT_EQ(c.prealloc_handle_bytes, o.prealloc_handle_bytes);
  EXPECT_EQ(c.defer_reclaim != 0, o.defer_reclaim);
  EXPECT_EQ(c.zero_on_reuse != 0, o.zero_on_reuse);
  EXPECT_EQ(c.map_ahead_tokens, o.map_ahead_tokens);
  EXPECT_EQ(c.pool_low_water, o.pool_low_water);
  EXPECT_EQ(c.pool_high_water, o.pool_high_water);
  vattn_cache_options_default(nullptr);  // Ignored.
}

TEST(CApiOptionsTest, DTypeSizes) {
  size_t size = 0;
  ASSERT_EQ(vattn_dtype_size(VATTN_DTYPE_FLOAT16, &size), VATTN_OK);
  EXPECT_EQ(size, 2u);
  ASSERT_EQ(vattn_dtype_size(VATTN_DTYPE_BFLOAT16, &size), VATTN_OK);
  EXPECT_EQ(size, 2u);
  ASSERT_EQ(vattn_dtype_size(VATTN_DTYPE_FLOAT32, &size), VATTN_OK);
  EXPECT_EQ(size, 4u);
  ASSERT_EQ(vattn_dtype_size(VATTN_DTYPE_FLOAT8_E4M3, &size), VATTN_OK);
  EXPECT_EQ(size, 1u);
  ASSERT_EQ(vattn_dtype_size(VATTN_DTYPE_INT8, &size), VATTN_OK);
  EXPECT_EQ(size, 1u);
  EXPECT_EQ(vattn_dtype_size(99, &size), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), HasSubstr("dtype 99"));
  EXPECT_EQ(vattn_dtype_size(VATTN_DTYPE_FLOAT16, nullptr),
            VATTN_INVALID_ARGUMENT);
}

TEST_F(CApiTest, RoundTripMatchesTheCppApi) {
  vattn_cache_options opts = SmallOptions();
  MakeCache(opts);
  // The cache holds its own reference: the caller's can go at once.
  vattn_backend_release(backend_);
  backend_ = nullptr;

  int64_t bytes_per_token = 0;
  ASSERT_EQ(vattn_cache_bytes_per_token(cache_, &bytes_per_token), VATTN_OK);
  EXPECT_EQ(bytes_per_token, 2 * 2 * 2 * 8 * 4);

  int slot = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 100, &slot), VATTN_OK)
      << LastError();
  ASSERT_GE(slot, 0);
  ASSERT_LT(slot, opts.max_slots);
  ASSERT_EQ(vattn_cache_grow(cache_, slot, 100), VATTN_OK) << LastError();

  vattn_slot_info info;
  info.struct_size = sizeof(info);
  ASSERT_EQ(vattn_cache_get_slot(cache_, slot, &info), VATTN_OK);
  EXPECT_EQ(info.active, 1);
  EXPECT_EQ(info.length, 100);
  EXPECT_GE(info.backed_tokens, 100);
  EXPECT_GT(info.mapped_bytes, 0);
  EXPECT_GE(info.extents, 1);

  // Write every element of the prompt through the views, read it back.
  for (int layer = 0; layer < opts.num_layers; ++layer) {
    vattn_tensor_view k;
    vattn_tensor_view v;
    ASSERT_EQ(vattn_cache_k(cache_, layer, &k), VATTN_OK);
    ASSERT_EQ(vattn_cache_v(cache_, layer, &v), VATTN_OK);
    ASSERT_NE(k.data, nullptr);
    ASSERT_NE(v.data, nullptr);
    EXPECT_NE(k.data, v.data);
    EXPECT_EQ(k.dtype, VATTN_DTYPE_FLOAT32);
    EXPECT_EQ(k.shape[0], opts.max_slots);
    EXPECT_EQ(k.shape[1], opts.max_tokens);
    EXPECT_EQ(k.shape[2], opts.num_kv_heads);
    EXPECT_EQ(k.shape[3], opts.head_dim);
    EXPECT_EQ(k.strides[3], 1);
    for (const vattn_tensor_view* view : {&k, &v}) {
      float* base = static_cast<float*>(view->data);
      for (int64_t t = 0; t < 100; ++t) {
        for (int64_t h = 0; h < opts.num_kv_heads; ++h) {
          for (int64_t d = 0; d < opts.head_dim; ++d) {
            base[slot * view->strides[0] + t * view->strides[1] +
                 h * view->strides[2] + d * view->strides[3]] =
                static_cast<float>(layer * 100000 + t * 100 + h * 10 + d) +
                (view == &v ? 0.5f : 0.0f);
          }
        }
      }
    }
  }
  for (int layer = 0; layer < opts.num_layers; ++layer) {
    vattn_tensor_view k;
    vattn_tensor_view v;
    ASSERT_EQ(vattn_cache_k(cache_, layer, &k), VATTN_OK);
    ASSERT_EQ(vattn_cache_v(cache_, layer, &v), VATTN_OK);
    const float* kb = static_cast<const float*>(k.data);
    const float* vb = static_cast<const float*>(v.data);
    for (int64_t t = 0; t < 100; t += 7) {
      const int64_t h = t % opts.num_kv_heads;
      const int64_t d = t % opts.head_dim;
      const float want =
          static_cast<float>(layer * 100000 + t * 100 + h * 10 + d);
      EXPECT_EQ(kb[slot * k.strides[0] + t * k.strides[1] +
                   h * k.strides[2] + d * k.strides[3]],
                want);
      EXPECT_EQ(vb[slot * v.strides[0] + t * v.strides[1] +
                   h * v.strides[2] + d * v.strides[3]],
                want + 0.5f);
    }
  }

  // A decode step, then stats.
  vattn_step_request req = {slot, 101};
  vattn_step_result result;
  result.misses = -1;
  result.map_nanos = -1;
  ASSERT_EQ(vattn_cache_step(cache_, &req, 1, &result), VATTN_OK)
      << LastError();
  EXPECT_GE(result.misses, 0);
  EXPECT_GE(result.map_nanos, 0);
  ASSERT_EQ(vattn_cache_step(cache_, &req, 1, nullptr), VATTN_OK);
  ASSERT_EQ(vattn_cache_step(cache_, nullptr, 0, nullptr), VATTN_OK);

  vattn_cache_stats stats;
  stats.struct_size = sizeof(stats);
  ASSERT_EQ(vattn_cache_get_stats(cache_, &stats), VATTN_OK);
  EXPECT_EQ(stats.active_slots, 1);
  EXPECT_EQ(stats.logical_bytes, 101 * bytes_per_token);
  EXPECT_GE(stats.map_calls, 1);
  EXPECT_GE(stats.create_calls, 1);
  EXPECT_GE(stats.grow_calls, 1);
  EXPECT_EQ(stats.step_calls, 3);
  EXPECT_GT(stats.physical_bytes, 0);
  EXPECT_GE(stats.peak_physical_bytes, stats.physical_bytes);
  EXPECT_EQ(stats.mapped_bytes, info.mapped_bytes);

  ASSERT_EQ(vattn_cache_shrink(cache_, slot, 50), VATTN_OK);
  ASSERT_EQ(vattn_cache_get_slot(cache_, slot, &info), VATTN_OK);
  EXPECT_EQ(info.length, 50);

  ASSERT_EQ(vattn_cache_free(cache_, slot, nullptr, 0), VATTN_OK)
      << LastError();
  ASSERT_EQ(vattn_cache_get_slot(cache_, slot, &info), VATTN_OK);
  EXPECT_EQ(info.active, 0);
  ASSERT_EQ(vattn_cache_get_stats(cache_, &stats), VATTN_OK);
  EXPECT_EQ(stats.active_slots, 0);
  EXPECT_EQ(stats.idle_slots_with_memory, 1);

  // The next request reuses the idle slot's memory; free it with a fence
  // (the Host backend's fences complete at once).
  int again = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 100, &again), VATTN_OK);
  EXPECT_EQ(again, slot);
  ASSERT_EQ(vattn_cache_get_stats(cache_, &stats), VATTN_OK);
  EXPECT_EQ(stats.reuse_hits, 1);
  ASSERT_EQ(vattn_cache_free(cache_, again, nullptr, 1), VATTN_OK)
      << LastError();
}

TEST_F(CApiTest, MapAheadCacheStartsAndStops) {
  vattn_cache_options opts = SmallOptions();
  opts.map_ahead_tokens = 256;
  opts.pool_low_water = 1;
  opts.pool_high_water = 2;
  opts.layout = VATTN_LAYOUT_LAYER_MAJOR;
  MakeCache(opts);
  int slot = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 10, &slot), VATTN_OK);
  for (int64_t len = 1; len <= 300; ++len) {
    vattn_step_request req = {slot, len};
    ASSERT_EQ(vattn_cache_step(cache_, &req, 1, nullptr), VATTN_OK)
        << LastError();
  }
  vattn_slot_info info;
  info.struct_size = sizeof(info);
  ASSERT_EQ(vattn_cache_get_slot(cache_, slot, &info), VATTN_OK);
  EXPECT_EQ(info.length, 300);
  EXPECT_GE(info.backed_tokens, 300);

  // The thread's and the faults' counters are filled in (0xff bytes would
  // read as -1).
  vattn_cache_stats stats;
  std::memset(&stats, 0xff, sizeof(stats));
  stats.struct_size = sizeof(stats);
  ASSERT_EQ(vattn_cache_get_stats(cache_, &stats), VATTN_OK);
  EXPECT_GE(stats.background_wakeups, 0);
  EXPECT_GE(stats.background_caller_wakeups, 0);
  EXPECT_GE(stats.background_deadline_wakeups, 0);
  EXPECT_LE(stats.background_deadline_wakeups, stats.background_wakeups);
  EXPECT_EQ(stats.quarantined_extents, 0);
  EXPECT_EQ(stats.quarantined_bytes, 0);
  EXPECT_EQ(stats.background_failures, 0);
  // Destroyed in TearDown with the slot active and the thread running.
}

TEST(CApiErrorsTest, NullArgumentsAreInvalidArgumentNamingTheArgument) {
  vattn_backend* backend = nullptr;
  ASSERT_EQ(vattn_backend_host(&backend), VATTN_OK);
  vattn_cache_options opts = SmallOptions();
  vattn_cache* cache = nullptr;
  ASSERT_EQ(vattn_cache_create(&opts, backend, &cache), VATTN_OK);
  int slot = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache, 0, &slot), VATTN_OK);

  struct Case {
    const char* call;
    int rc;
    const char* argument;
  };
  int i = 0;
  int64_t i64 = 0;
  vattn_cache* out_cache = reinterpret_cast<vattn_cache*>(&i);
  vattn_tensor_view view;
  vattn_cache_stats stats;
  stats.struct_size = sizeof(stats);
  vattn_slot_info info;
  info.struct_size = sizeof(info);
  vattn_step_request req = {slot, 1};
  const std::vector<Case> cases = {
      {"vattn_backend_host", vattn_backend_host(nullptr), "out"},
      {"vattn_backend_cuda", vattn_backend_cuda(0, nullptr), "out"},
      {"vattn_cuda_device_count", vattn_cuda_device_count(nullptr), "out"},
      {"vattn_dtype_size", vattn_dtype_size(0, nullptr), "out"},
      {"vattn_cache_create", vattn_cache_create(nullptr, backend, &out_cache),
       "options"},
      {"vattn_cache_create", vattn_cache_create(&opts, nullptr, &out_cache),
       "backend"},
      {"vattn_cache_create", vattn_cache_create(&opts, backend, nullptr),
       "out"},
      {"vattn_cache_alloc_slot", vattn_cache_alloc_slot(nullptr, 0, &i),
       "cache"},
      {"vattn_cache_alloc_slot", vattn_cache_alloc_slot(cache, 0, nullptr),
       "slot"},
      {"vattn_cache_grow", vattn_cache_grow(nullptr, slot, 1), "cache"},
      {"vattn_cache_shrink", vattn_cache_shrink(nullptr, slot, 0), "cache"},
      {"vattn_cache_free", vattn_cache_free(nullptr, slot, nullptr, 0),
       "cache"},
      {"vattn_cache_step", vattn_cache_step(nullptr, &req, 1, nullptr),
       "cache"},
      {"vattn_cache_step", vattn_cache_step(cache, nullptr, 1, nullptr),
       "requests"},
      {"vattn_cache_k", vattn_cache_k(nullptr, 0, &view), "cache"},
      {"vattn_cache_k", vattn_cache_k(cache, 0, nullptr), "out"},
      {"vattn_cache_v", vattn_cache_v(nullptr, 0, &view), "cache"},
      {"vattn_cache_v", vattn_cache_v(cache, 0, nullptr), "out"},
      {"vattn_cache_get_stats", vattn_cache_get_stats(nullptr, &stats),
       "cache"},
      {"vattn_cache_get_stats", vattn_cache_get_stats(cache, nullptr), "out"},
      {"vattn_cache_get_slot", vattn_cache_get_slot(nullptr, slot, &info),
       "cache"},
      {"vattn_cache_get_slot", vattn_cache_get_slot(cache, slot, nullptr),
       "out"},
      {"vattn_cache_bytes_per_token",
       vattn_cache_bytes_per_token(nullptr, &i64), "cache"},
      {"vattn_cache_bytes_per_token", vattn_cache_bytes_per_token(cache, nullptr),
       "out"},
  };
  // The calls above ran in order and only the last message survives: a few
  // are repeated below, one at a time, for their messages.
  for (const Case& c : cases) {
    EXPECT_EQ(c.rc, VATTN_INVALID_ARGUMENT) << c.call << "(" << c.argument
                                            << " = NULL)";
  }
  EXPECT_EQ(out_cache, nullptr) << "a failed create sets *out to NULL";
  EXPECT_EQ(vattn_cache_get_slot(cache, slot, nullptr),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(LastError(), "INVALID_ARGUMENT: vattn_cache_get_slot: out is NULL");
  EXPECT_EQ(vattn_cache_create(&opts, nullptr, &out_cache),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(LastError(),
            "INVALID_ARGUMENT: vattn_cache_create: backend is NULL");
  EXPECT_EQ(vattn_cache_step(cache, nullptr, 1, nullptr),
            VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), AllOf(HasSubstr("vattn_cache_step"),
                                 HasSubstr("requests")));

  // Release and destroy ignore NULL.
  vattn_backend_release(nullptr);
  vattn_cache_destroy(nullptr);

  // Nothing changed: the slot is still active with length 0.
  ASSERT_EQ(vattn_cache_get_slot(cache, slot, &info), VATTN_OK);
  EXPECT_EQ(info.active, 1);
  EXPECT_EQ(info.length, 0);
  vattn_cache_destroy(cache);
  vattn_backend_release(backend);
}

TEST_F(CApiTest, CodesAndMessagesOfTheCppApi) {
  vattn_cache_options opts = SmallOptions();
  opts.max_slots = 2;
  MakeCache(opts);
  int slot = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 0, &slot), VATTN_OK);

  // Bad slots.
  EXPECT_EQ(vattn_cache_grow(cache_, 99, 1), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(),
              AllOf(StartsWith("INVALID_ARGUMENT: vattn_cache_grow: "),
                    HasSubstr("99")));
  EXPECT_EQ(vattn_cache_grow(cache_, -1, 1), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_shrink(cache_, 99, 0), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_free(cache_, 99, nullptr, 0), VATTN_INVALID_ARGUMENT);
  vattn_slot_info info;
  info.struct_size = sizeof(info);
  EXPECT_EQ(vattn_cache_get_slot(cache_, 99, &info), VATTN_INVALID_ARGUMENT);
  vattn_step_request bad = {99, 1};
  EXPECT_EQ(vattn_cache_step(cache_, &bad, 1, nullptr),
            VATTN_INVALID_ARGUMENT);

  // A success leaves the last message alone (like errno).
  const std::string before = LastError();
  ASSERT_EQ(vattn_cache_grow(cache_, slot, 10), VATTN_OK);
  EXPECT_EQ(LastError(), before);

  // Negative counts, shrinking above the length.
  EXPECT_EQ(vattn_cache_grow(cache_, slot, -1), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_shrink(cache_, slot, 11), VATTN_INVALID_ARGUMENT);
  int other = -1;
  EXPECT_EQ(vattn_cache_alloc_slot(cache_, -1, &other),
            VATTN_INVALID_ARGUMENT);

  // Beyond max_tokens.
  EXPECT_EQ(vattn_cache_grow(cache_, slot, opts.max_tokens + 1),
            VATTN_OUT_OF_RANGE);
  EXPECT_THAT(LastError(), StartsWith("OUT_OF_RANGE: vattn_cache_grow: "));
  EXPECT_EQ(vattn_cache_alloc_slot(cache_, opts.max_tokens + 1, &other),
            VATTN_OUT_OF_RANGE);
  vattn_step_request far = {slot, opts.max_tokens + 1};
  EXPECT_EQ(vattn_cache_step(cache_, &far, 1, nullptr), VATTN_OUT_OF_RANGE);

  // Bad layers.
  vattn_tensor_view view;
  EXPECT_EQ(vattn_cache_k(cache_, opts.num_layers, &view),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(LastError(),
            "INVALID_ARGUMENT: vattn_cache_k: layer 2 is outside [0, 2)");
  EXPECT_EQ(vattn_cache_v(cache_, -1, &view), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), HasSubstr("layer -1"));

  // Every slot active.
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 0, &other), VATTN_OK);
  int third = -7;
  EXPECT_EQ(vattn_cache_alloc_slot(cache_, 0, &third),
            VATTN_RESOURCE_EXHAUSTED);
  EXPECT_EQ(third, -7) << "outputs are written only on success";

  // A freed slot.
  ASSERT_EQ(vattn_cache_free(cache_, other, nullptr, 0), VATTN_OK);
  EXPECT_EQ(vattn_cache_free(cache_, other, nullptr, 0),
            VATTN_FAILED_PRECONDITION);
  EXPECT_THAT(LastError(), StartsWith("FAILED_PRECONDITION: vattn_cache_free"));
  EXPECT_EQ(vattn_cache_grow(cache_, other, 1), VATTN_FAILED_PRECONDITION);
  vattn_step_request freed = {other, 1};
  EXPECT_EQ(vattn_cache_step(cache_, &freed, 1, nullptr),
            VATTN_FAILED_PRECONDITION);
}

TEST_F(CApiTest, BudgetIsResourceExhausted) {
  vattn_cache_options opts = SmallOptions();
  opts.memory_budget_bytes = std::size_t{2} << 20;  // One granule.
  MakeCache(opts);
  int slot = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 0, &slot), VATTN_OK);
  // 256 bytes a token: 2 MiB is 8192 tokens.
  EXPECT_EQ(vattn_cache_grow(cache_, slot, 10000), VATTN_RESOURCE_EXHAUSTED);
  EXPECT_THAT(LastError(), StartsWith("RESOURCE_EXHAUSTED: vattn_cache_grow"));
  ASSERT_EQ(vattn_cache_grow(cache_, slot, 8192), VATTN_OK) << LastError();
}

TEST_F(CApiTest, BadOptionsNameTheField) {
  struct Case {
    const char* field;
    void (*change)(vattn_cache_options*);
  };
  const Case cases[] = {
      {"num_layers", [](vattn_cache_options* o) { o->num_layers = 0; }},
      {"num_kv_heads", [](vattn_cache_options* o) { o->num_kv_heads = -1; }},
      {"head_dim", [](vattn_cache_options* o) { o->head_dim = 0; }},
      {"dtype", [](vattn_cache_options* o) { o->dtype = 99; }},
      {"max_slots", [](vattn_cache_options* o) { o->max_slots = 0; }},
      {"max_tokens", [](vattn_cache_options* o) { o->max_tokens = 0; }},
      {"layout", [](vattn_cache_options* o) { o->layout = 7; }},
      {"max_extent_tokens",
       [](vattn_cache_options* o) { o->max_extent_tokens = 0; }},
      {"pool_low_water",
       [](vattn_cache_options* o) {
         o->pool_low_water = 3;
         o->pool_high_water = 1;
       }},
  };
  for (const Case& c : cases) {
    vattn_cache_options opts = SmallOptions();
    c.change(&opts);
    vattn_cache* cache = reinterpret_cast<vattn_cache*>(&opts);
    EXPECT_EQ(vattn_cache_create(&opts, backend_, &cache),
              VATTN_INVALID_ARGUMENT)
        << c.field;
    EXPECT_EQ(cache, nullptr) << c.field;
    EXPECT_THAT(LastError(),
                AllOf(StartsWith("INVALID_ARGUMENT: vattn_cache_create: "),
                      HasSubstr(c.field)));
  }
}

TEST_F(CApiTest, StructSizeMismatchIsInvalidArgument) {
  vattn_cache_options opts = SmallOptions();
  for (const size_t wrong :
       {size_t{0}, sizeof(opts) - 8, sizeof(opts) + 8, size_t{1} << 40}) {
    opts.struct_size = wrong;
    vattn_cache* cache = nullptr;
    EXPECT_EQ(vattn_cache_create(&opts, backend_, &cache),
              VATTN_INVALID_ARGUMENT);
    EXPECT_EQ(cache, nullptr);
    EXPECT_THAT(LastError(),
                AllOf(HasSubstr("options->struct_size is " +
                                std::to_string(wrong)),
                      HasSubstr(std::to_string(sizeof(opts)))));
  }

  MakeCache(SmallOptions());
  vattn_cache_stats stats;
  stats.struct_size = sizeof(stats) - 8;  // An older header's struct.
  EXPECT_EQ(vattn_cache_get_stats(cache_, &stats), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), AllOf(HasSubstr("vattn_cache_get_stats"),
                                 HasSubstr("out->struct_size")));
  vattn_slot_info info;
  info.struct_size = 0;
  EXPECT_EQ(vattn_cache_get_slot(cache_, 0, &info), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), AllOf(HasSubstr("vattn_cache_get_slot"),
                                 HasSubstr("out->struct_size")));
}

TEST(CApiCudaTest, UnavailableWithoutADriverAndAgreesWithCpp) {
  int count = -1;
  const int rc = vattn_cuda_device_count(&count);
  const absl::StatusOr<int> cpp = CudaDeviceCount();
  ASSERT_EQ(rc, static_cast<int>(cpp.status().code())) << LastError();
  vattn_backend* backend = reinterpret_cast<vattn_backend*>(&count);
  if (rc != VATTN_OK) {
    // This CPU machine: no driver.
    EXPECT_EQ(rc, VATTN_UNAVAILABLE);
    EXPECT_EQ(count, -1);
    EXPECT_THAT(LastError(),
                AllOf(StartsWith("UNAVAILABLE: vattn_cuda_device_count: "),
                      AnyOf(HasSubstr("libcuda"), HasSubstr("cuInit"))));
    EXPECT_EQ(vattn_backend_cuda(0, &backend), VATTN_UNAVAILABLE);
    EXPECT_EQ(backend, nullptr);
    EXPECT_THAT(LastError(),
                AllOf(StartsWith("UNAVAILABLE: vattn_backend_cuda: "),
                      AnyOf(HasSubstr("libcuda"), HasSubstr("cuInit"))));
    return;
  }
  EXPECT_EQ(count, *cpp);
  if (count == 0) {
    EXPECT_EQ(vattn_backend_cuda(0, &backend), VATTN_UNAVAILABLE);
    EXPECT_EQ(backend, nullptr);
    return;
  }
  ASSERT_EQ(vattn_backend_cuda(0, &backend), VATTN_OK) << LastError();
  ASSERT_NE(backend, nullptr);
  EXPECT_EQ(vattn_backend_cuda(count, &backend), VATTN_INVALID_ARGUMENT);
  vattn_backend_release(backend);
}

TEST_F(CApiTest, OutOfHostMemoryIsAStatusNeverAnException) {
#if defined(VATTN_TEST_SANITIZER)
  GTEST_SKIP() << "the sanitizer's runtime owns operator new";
#else
  MakeCache(SmallOptions());
  int slot = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 0, &slot), VATTN_OK);
  // Formatting the message fails: the code comes back, with a fixed text.
  fail_allocations = true;
  const int bad_dtype = vattn_dtype_size(99, nullptr);
  fail_allocations = false;
  EXPECT_EQ(bad_dtype, VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), HasSubstr("out of host memory"));
  // An allocation of this layer fails (a new thread's first step sizes its
  // request buffer): ResourceExhausted, and nothing escapes. (Not every
  // allocation can be caught: absl::StrFormat appends in a destructor, so
  // std::bad_alloc while the C++ API formats an error message terminates.)
  int step = -1;
  std::string message;
  std::thread([&] {
    vattn_step_request req = {slot, 1};
    fail_allocations = true;
    step = vattn_cache_step(cache_, &req, 1, nullptr);
    fail_allocations = false;
    message = vattn_last_error();
  }).join();
  EXPECT_EQ(step, VATTN_RESOURCE_EXHAUSTED);
  EXPECT_THAT(message, HasSubstr("out of host memory"));
  // The cache still works.
  ASSERT_EQ(vattn_cache_grow(cache_, slot, 10), VATTN_OK) << LastError();
#endif
}

TEST_F(CApiTest, ThreadsShareACacheAndKeepTheirOwnLastError) {
  vattn_cache_options opts = SmallOptions();
  opts.max_slots = 4;
  opts.map_ahead_tokens = 64;
  MakeCache(opts);
  // The main thread's last error.
  ASSERT_EQ(vattn_cache_grow(cache_, 99, 1), VATTN_INVALID_ARGUMENT);
  const std::string mine = LastError();

  std::vector<std::thread> threads;
  std::vector<std::string> errors(4);
  std::vector<int> failures(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([this, t, &errors, &failures] {
      if (std::string(vattn_last_error()) != "") ++failures[t];
      for (int round = 0; round < 5; ++round) {
        int slot = -1;
        if (vattn_cache_alloc_slot(cache_, 20, &slot) != VATTN_OK) {
          ++failures[t];
          continue;
        }
        for (int64_t len = 1; len <= 200; ++len) {
          vattn_step_request req = {slot, len};
          if (vattn_cache_step(cache_, &req, 1, nullptr) != VATTN_OK) {
            ++failures[t];
          }
        }
        vattn_cache_stats stats;
        stats.struct_size = sizeof(stats);
        if (vattn_cache_get_stats(cache_, &stats) != VATTN_OK) ++failures[t];
        if (vattn_cache_free(cache_, slot, nullptr, 0) != VATTN_OK) {
          ++failures[t];
        }
      }
      // A failure of this thread's own, seen only here.
      if (vattn_cache_shrink(cache_, 100 + t, 0) != VATTN_INVALID_ARGUMENT) {
        ++failures[t];
      }
      errors[t] = vattn_last_error();
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < 4; ++t) {
    EXPECT_EQ(failures[t], 0) << "thread " << t << ": " << errors[t];
    EXPECT_THAT(errors[t], AllOf(HasSubstr("vattn_cache_shrink"),
                                 HasSubstr(std::to_string(100 + t))));
  }
  EXPECT_EQ(LastError(), mine);
  vattn_cache_stats stats;
  stats.struct_size = sizeof(stats);
  ASSERT_EQ(vattn_cache_get_stats(cache_, &stats), VATTN_OK);
  EXPECT_EQ(stats.active_slots, 0);
  EXPECT_EQ(stats.step_calls, 4 * 5 * 200);
}

}  // namespace
}  // namespace vattn
