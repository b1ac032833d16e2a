// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The C API's elastic memory (vattn/c_api.h, "Elastic memory") on the Host
// backend: an arbiter shared by two caches made through the C options
// (arbiter, floor, cap, name), memory moving from one cache's idle slots to
// the other, set_budget and trim on the arbiter and on a cache, the JSON
// telemetry and its buffer protocol, and the error paths (NULL arguments,
// bad budgets, a cache on another backend, codes and messages).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/json_value.h"
#include "vattn/c_api.h"

namespace {

using ::testing::HasSubstr;
using ::vattn::testing::JsonValue;
using ::vattn::testing::ParseJson;

constexpr std::size_t kGranule = std::size_t{2} << 20;

class CApiArbiterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(vattn_backend_host(&backend_), VATTN_OK) << vattn_last_error();
  }
  void TearDown() override {
    for (vattn_cache* c : caches_) vattn_cache_destroy(c);
    vattn_arbiter_release(arbiter_);
    vattn_backend_release(backend_);
  }

  // 1 KiB of K/V per token: one granule is 2048 tokens; a slot holds 4.
  vattn_cache_options Options(const char* name) const {
    vattn_cache_options o;
    vattn_cache_options_default(&o);
    o.num_layers = 2;
    o.num_kv_heads = 2;
    o.head_dim = 64;
    o.max_slots = 4;
    o.max_tokens = 8192;
    o.memory_budget_bytes = 0;
    o.arbiter = arbiter_;
    o.arbiter_name = name;
    return o;
  }
  vattn_cache* Make(const vattn_cache_options& o) {
    vattn_cache* c = nullptr;
    EXPECT_EQ(vattn_cache_create(&o, backend_, &c), VATTN_OK) << vattn_last_error();
    if (c != nullptr) caches_.push_back(c);
    return c;
  }
  JsonValue Telemetry() const {
    size_t length = 0;
    EXPECT_EQ(vattn_arbiter_telemetry_json(arbiter_, nullptr, 0, &length), VATTN_OK)
        << vattn_last_error();
    std::string buf(length + 64, '\xff');
    size_t got = 0;
    EXPECT_EQ(vattn_arbiter_telemetry_json(arbiter_, buf.data(), buf.size(), &got), VATTN_OK)
        << vattn_last_error();
    EXPECT_EQ(buf[got], '\0');
    buf.resize(got);
    absl::StatusOr<JsonValue> j = ParseJson(buf);
    EXPECT_TRUE(j.ok()) << j.status() << "\n" << buf;
    return j.ok() ? *j : JsonValue{};
  }
  static std::int64_t CacheField(const JsonValue& j, std::size_t i, const char* field) {
    return j["caches"].array.at(i)[field].integer;
  }
  static std::int64_t Physical(vattn_cache* c) {
    vattn_cache_stats s;
    s.struct_size = sizeof(s);
    EXPECT_EQ(vattn_cache_get_stats(c, &s), VATTN_OK) << vattn_last_error();
    return s.physical_bytes;
  }

  vattn_backend* backend_ = nullptr;
  vattn_arbiter* arbiter_ = nullptr;
  std::vector<vattn_cache*> caches_;
};

TEST_F(CApiArbiterTest, DefaultOptionsNameNoArbiter) {
  vattn_cache_options o;
  vattn_cache_options_default(&o);
  EXPECT_EQ(o.struct_size, sizeof(vattn_cache_options));
  EXPECT_EQ(o.arbiter, nullptr);
  EXPECT_EQ(o.arbiter_floor_bytes, 0u);
  EXPECT_EQ(o.arbiter_cap_bytes, 0u);
  EXPECT_EQ(o.arbiter_name, nullptr);
}

TEST_F(CApiArbiterTest, TwoCachesShareOneBudget) {
  ASSERT_EQ(vattn_arbiter_create(backend_, 8 * kGranule, &arbiter_), VATTN_OK)
      << vattn_last_error();
  size_t budget = 0;
  ASSERT_EQ(vattn_arbiter_budget_bytes(arbiter_, &budget), VATTN_OK);
  EXPECT_EQ(budget, 8 * kGranule);
  vattn_cache_options oa = Options("alpha");
  oa.arbiter_floor_bytes = kGranule;
  vattn_cache* a = Make(oa);
  vattn_cache_options ob = Options("beta");
  ob.arbiter_cap_bytes = 6 * kGranule;
  vattn_cache* b = Make(ob);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  // The caller's reference may go at once: the caches hold theirs.
  vattn_arbiter_release(arbiter_);
  arbiter_ = nullptr;
  ASSERT_EQ(vattn_cache_set_budget(b, 6 * kGranule), VATTN_OK) << vattn_last_error();

  // alpha takes the whole budget, then its requests end (memory kept).
  int s0 = -1, s1 = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(a, 8192, &s0), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(a, s0, 8192), VATTN_OK) << vattn_last_error();
  ASSERT_EQ(vattn_cache_alloc_slot(a, 8192, &s1), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(a, s1, 8192), VATTN_OK) << vattn_last_error();
  int extra = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(a, 1, &extra), VATTN_OK);
  EXPECT_EQ(vattn_cache_grow(a, extra, 1), VATTN_RESOURCE_EXHAUSTED);  // Budget full.
  EXPECT_THAT(vattn_last_error(), HasSubstr("RESOURCE_EXHAUSTED"));
  ASSERT_EQ(vattn_cache_free_no_fence(a, extra), VATTN_OK);
  ASSERT_EQ(vattn_cache_free_no_fence(a, s0), VATTN_OK);
  ASSERT_EQ(vattn_cache_free_no_fence(a, s1), VATTN_OK);
  EXPECT_EQ(Physical(a), static_cast<std::int64_t>(8 * kGranule));

  // beta's request is served from alpha's idle memory.
  int sb = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(b, 8192, &sb), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(b, sb, 8192), VATTN_OK) << vattn_last_error();
  EXPECT_EQ(Physical(b), static_cast<std::int64_t>(4 * kGranule));
  EXPECT_LE(Physical(a) + Physical(b), static_cast<std::int64_t>(8 * kGranule));
}

TEST_F(CApiArbiterTest, TelemetryNamesCachesAndCountsWhatMoved) {
  ASSERT_EQ(vattn_arbiter_create(backend_, 8 * kGranule, &arbiter_), VATTN_OK);
  {
    const JsonValue j = Telemetry();
    EXPECT_EQ(j["version"].integer, 1);
    EXPECT_EQ(j["budget_bytes"].integer, static_cast<std::int64_t>(8 * kGranule));
    EXPECT_TRUE(j["caches"].array.empty());
  }
  vattn_cache_options oa = Options("alpha");
  oa.arbiter_floor_bytes = kGranule;
  vattn_cache* a = Make(oa);
  vattn_cache_options ob = Options(nullptr);  // Named by the arbiter.
  ob.arbiter_cap_bytes = 6 * kGranule;
  vattn_cache* b = Make(ob);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  int s0 = -1, s1 = -1, sb = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(a, 8192, &s0), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(a, s0, 8192), VATTN_OK);
  ASSERT_EQ(vattn_cache_alloc_slot(a, 8192, &s1), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(a, s1, 8192), VATTN_OK);
  ASSERT_EQ(vattn_cache_free_no_fence(a, s0), VATTN_OK);
  ASSERT_EQ(vattn_cache_free_no_fence(a, s1), VATTN_OK);
  ASSERT_EQ(vattn_cache_alloc_slot(b, 8192, &sb), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(b, sb, 8192), VATTN_OK) << vattn_last_error();

  const JsonValue j = Telemetry();
  ASSERT_EQ(j["caches"].array.size(), 2u);
  EXPECT_EQ(j["caches"].array[0]["name"].string, "alpha");
  EXPECT_EQ(j["caches"].array[1]["name"].string, "cache-2");
  EXPECT_EQ(CacheField(j, 0, "floor_bytes"), static_cast<std::int64_t>(kGranule));
  EXPECT_EQ(CacheField(j, 1, "cap_bytes"), static_cast<std::int64_t>(6 * kGranule));
  EXPECT_EQ(CacheField(j, 0, "physical_bytes"), Physical(a));
  EXPECT_EQ(CacheField(j, 1, "physical_bytes"), Physical(b));
  EXPECT_GE(CacheField(j, 0, "reclaimed_from_bytes"), static_cast<std::int64_t>(4 * kGranule));
  EXPECT_EQ(CacheField(j, 1, "reclaimed_for_bytes"), CacheField(j, 0, "reclaimed_from_bytes"));
  EXPECT_EQ(CacheField(j, 1, "active_bytes"), static_cast<std::int64_t>(4 * kGranule));

  // The buffer protocol: too small is InvalidArgument, *length still set,
  // nothing written.
  size_t length = 0;
  char small[8] = "unset";
  EXPECT_EQ(vattn_arbiter_telemetry_json(arbiter_, small, sizeof(small), &length),
            VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(vattn_last_error(), HasSubstr("capacity 8"));
  EXPECT_GT(length, sizeof(small));
  EXPECT_STREQ(small, "unset");
  std::string exact(length + 1, 'x');
  size_t again = 0;
  ASSERT_EQ(vattn_arbiter_telemetry_json(arbiter_, exact.data(), length + 1, &again), VATTN_OK);
  EXPECT_EQ(again, length);
  EXPECT_EQ(vattn_arbiter_telemetry_json(arbiter_, exact.data(), length, &again),
            VATTN_INVALID_ARGUMENT);  // No room for the NUL.
}

TEST_F(CApiArbiterTest, SetBudgetAndTrim) {
  ASSERT_EQ(vattn_arbiter_create(backend_, 8 * kGranule, &arbiter_), VATTN_OK);
  vattn_cache* a = Make(Options("alpha"));
  ASSERT_NE(a, nullptr);
  int s0 = -1, s1 = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(a, 8192, &s0), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(a, s0, 8192), VATTN_OK);  // 4 granules, active.
  ASSERT_EQ(vattn_cache_alloc_slot(a, 4096, &s1), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(a, s1, 4096), VATTN_OK);  // 2 granules, then idle.
  ASSERT_EQ(vattn_cache_free_no_fence(a, s1), VATTN_OK);
  EXPECT_EQ(Physical(a), static_cast<std::int64_t>(6 * kGranule));

  // Below what active memory holds: idle memory goes, the new budget stands.
  EXPECT_EQ(vattn_arbiter_set_budget(arbiter_, 2 * kGranule), VATTN_RESOURCE_EXHAUSTED);
  EXPECT_THAT(vattn_last_error(), HasSubstr("vattn_arbiter_set_budget"));
  size_t budget = 0;
  ASSERT_EQ(vattn_arbiter_budget_bytes(arbiter_, &budget), VATTN_OK);
  EXPECT_EQ(budget, 2 * kGranule);
  EXPECT_EQ(Physical(a), static_cast<std::int64_t>(4 * kGranule));
  ASSERT_EQ(vattn_arbiter_set_budget(arbiter_, 8 * kGranule), VATTN_OK) << vattn_last_error();
  ASSERT_EQ(vattn_cache_grow(a, s0, 8192), VATTN_OK);

  // Trim gives idle memory back to the driver, down to the target.
  ASSERT_EQ(vattn_cache_free_no_fence(a, s0), VATTN_OK);
  size_t destroyed = 0;
  ASSERT_EQ(vattn_arbiter_trim(arbiter_, kGranule * 4, &destroyed), VATTN_OK)
      << vattn_last_error();
  EXPECT_EQ(Physical(a), static_cast<std::int64_t>(4 * kGranule)) << destroyed;
  ASSERT_EQ(vattn_arbiter_trim(arbiter_, 0, nullptr), VATTN_OK);
  EXPECT_EQ(Physical(a), 0);
  // SetBudget destroyed 2 granules, the trims 4.
  EXPECT_EQ(Telemetry()["caches"].array[0]["trimmed_bytes"].integer,
            static_cast<std::int64_t>(6 * kGranule));

  // A cache's own SetBudget and Trim: a slot of two 2-granule extents.
  int s2 = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(a, 4096, &s2), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(a, s2, 4096), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(a, s2, 8192), VATTN_OK);
  ASSERT_EQ(vattn_cache_free_no_fence(a, s2), VATTN_OK);
  EXPECT_EQ(Physical(a), static_cast<std::int64_t>(4 * kGranule));
  ASSERT_EQ(vattn_cache_trim(a, 2 * kGranule, &destroyed), VATTN_OK) << vattn_last_error();
  EXPECT_EQ(destroyed, 2 * kGranule);
  EXPECT_EQ(Physical(a), static_cast<std::int64_t>(2 * kGranule));
  // An extent is never split: a cap of one granule takes the whole one.
  ASSERT_EQ(vattn_cache_set_budget(a, kGranule), VATTN_OK) << vattn_last_error();
  EXPECT_EQ(Physical(a), 0);
  int s3 = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(a, 0, &s3), VATTN_OK);
  EXPECT_EQ(vattn_cache_grow(a, s3, 4096), VATTN_RESOURCE_EXHAUSTED);  // Capped at 1.
  ASSERT_EQ(vattn_cache_set_budget(a, 4 * kGranule), VATTN_OK);
  EXPECT_EQ(vattn_cache_grow(a, s3, 4096), VATTN_OK) << vattn_last_error();

  // A cache without an arbiter has SetBudget and Trim too.
  vattn_cache_options own = Options("own");
  own.arbiter = nullptr;
  own.arbiter_name = nullptr;
  own.memory_budget_bytes = 4 * kGranule;
  vattn_cache* c = Make(own);
  ASSERT_NE(c, nullptr);
  ASSERT_EQ(vattn_cache_set_budget(c, 2 * kGranule), VATTN_OK) << vattn_last_error();
  vattn_cache_stats st;
  st.struct_size = sizeof(st);
  ASSERT_EQ(vattn_cache_get_stats(c, &st), VATTN_OK);
  EXPECT_EQ(st.budget_bytes, static_cast<std::int64_t>(2 * kGranule));
  ASSERT_EQ(vattn_cache_trim(c, 0, &destroyed), VATTN_OK);
  EXPECT_EQ(destroyed, 0u);
}

TEST_F(CApiArbiterTest, Errors) {
  vattn_arbiter* out = reinterpret_cast<vattn_arbiter*>(0x1);
  EXPECT_EQ(vattn_arbiter_create(nullptr, kGranule, &out), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(out, nullptr);  // Handle outputs are NULL on failure.
  EXPECT_THAT(vattn_last_error(), HasSubstr("backend is NULL"));
  EXPECT_EQ(vattn_arbiter_create(backend_, kGranule, nullptr), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_arbiter_create(backend_, 0, &out), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(vattn_last_error(), HasSubstr("vattn_arbiter_create"));
  EXPECT_EQ(out, nullptr);
  EXPECT_EQ(vattn_arbiter_set_budget(nullptr, kGranule), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(vattn_last_error(), HasSubstr("arbiter is NULL"));
  EXPECT_EQ(vattn_arbiter_trim(nullptr, 0, nullptr), VATTN_INVALID_ARGUMENT);
  size_t n = 0;
  EXPECT_EQ(vattn_arbiter_budget_bytes(nullptr, &n), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_arbiter_telemetry_json(nullptr, nullptr, 0, &n), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_set_budget(nullptr, kGranule), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(vattn_last_error(), HasSubstr("cache is NULL"));
  EXPECT_EQ(vattn_cache_trim(nullptr, 0, nullptr), VATTN_INVALID_ARGUMENT);
  vattn_arbiter_release(nullptr);  // Ignored.

  ASSERT_EQ(vattn_arbiter_create(backend_, 4 * kGranule, &arbiter_), VATTN_OK);
  EXPECT_EQ(vattn_arbiter_budget_bytes(arbiter_, nullptr), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_arbiter_telemetry_json(arbiter_, nullptr, 0, nullptr),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_arbiter_telemetry_json(arbiter_, nullptr, 16, &n), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(vattn_last_error(), HasSubstr("buffer is NULL but capacity is 16"));
  EXPECT_EQ(vattn_arbiter_set_budget(arbiter_, 0), VATTN_INVALID_ARGUMENT);

  // Options the C++ side refuses: a budget of its own beside an arbiter; a
  // floor without an arbiter; a cache on another backend.
  vattn_cache* c = reinterpret_cast<vattn_cache*>(0x1);
  vattn_cache_options o = Options("x");
  o.memory_budget_bytes = kGranule;
  EXPECT_EQ(vattn_cache_create(&o, backend_, &c), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(vattn_last_error(), HasSubstr("memory_budget_bytes"));
  EXPECT_EQ(c, nullptr);
  o = Options("x");
  o.arbiter = nullptr;
  o.arbiter_floor_bytes = kGranule;
  EXPECT_EQ(vattn_cache_create(&o, backend_, &c), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(vattn_last_error(), HasSubstr("arbiter_floor_bytes"));
  vattn_backend* other = nullptr;
  ASSERT_EQ(vattn_backend_host(&other), VATTN_OK);
  o = Options("x");
  EXPECT_EQ(vattn_cache_create(&o, other, &c), VATTN_INVALID_ARGUMENT);
  vattn_backend_release(other);
  // A floor above the arbiter's budget.
  o = Options("x");
  o.arbiter_floor_bytes = 8 * kGranule;
  EXPECT_EQ(vattn_cache_create(&o, backend_, &c), VATTN_INVALID_ARGUMENT);
}

}  // namespace
