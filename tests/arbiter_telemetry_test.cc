// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn/arbiter_telemetry.h: the JSON snapshot parses (a strict RFC 8259
// parser, tests/support/json_value.h), holds every ArbiterStats field with
// its value, escapes any cache name into valid JSON, and follows the
// arbiter's real state as memory moves between two caches.
#include "vattn/arbiter_telemetry.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/json_value.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn {
namespace {

using ::vattn::testing::JsonValue;
using ::vattn::testing::ParseJson;

constexpr const char* kArbiterFields[] = {
    "budget_bytes",   "physical_bytes",        "peak_physical_bytes",
    "floors_bytes",   "cross_reclaims",        "cross_reclaimed_bytes",
    "refused_charges", "trimmed_bytes"};
constexpr const char* kCacheFields[] = {
    "physical_bytes",      "reclaimable_bytes",    "pooled_bytes",
    "active_bytes",        "floor_bytes",          "cap_bytes",
    "peak_physical_bytes", "reclaimed_from_bytes", "reclaimed_for_bytes",
    "trimmed_bytes"};

std::int64_t Int(const JsonValue& v, const std::string& key) {
  const JsonValue& x = v[key];
  EXPECT_EQ(x.kind, JsonValue::Kind::kNumber) << key;
  EXPECT_TRUE(x.integral) << key;
  return x.integer;
}

// Every field of the JSON equals the stats' field of the same name.
void ExpectMirrors(const JsonValue& j, const ArbiterStats& s) {
  ASSERT_EQ(j.kind, JsonValue::Kind::kObject);
  EXPECT_EQ(Int(j, "version"), kArbiterTelemetryVersion);
  EXPECT_EQ(Int(j, "budget_bytes"), s.budget_bytes);
  EXPECT_EQ(Int(j, "physical_bytes"), s.physical_bytes);
  EXPECT_EQ(Int(j, "peak_physical_bytes"), s.peak_physical_bytes);
  EXPECT_EQ(Int(j, "floors_bytes"), s.floors_bytes);
  EXPECT_EQ(Int(j, "cross_reclaims"), s.cross_reclaims);
  EXPECT_EQ(Int(j, "cross_reclaimed_bytes"), s.cross_reclaimed_bytes);
  EXPECT_EQ(Int(j, "refused_charges"), s.refused_charges);
  EXPECT_EQ(Int(j, "trimmed_bytes"), s.trimmed_bytes);
  EXPECT_EQ(j.object.size(), std::size(kArbiterFields) + 2);  // + version, caches.
  const JsonValue& caches = j["caches"];
  ASSERT_EQ(caches.kind, JsonValue::Kind::kArray);
  ASSERT_EQ(caches.array.size(), s.caches.size());
  for (std::size_t i = 0; i < s.caches.size(); ++i) {
    const JsonValue& c = caches.array[i];
    const ArbiterCacheStats& e = s.caches[i];
    SCOPED_TRACE(e.name);
    EXPECT_EQ(Int(c, "id"), static_cast<std::int64_t>(e.id));
    EXPECT_EQ(c["name"].kind, JsonValue::Kind::kString);
    EXPECT_EQ(Int(c, "physical_bytes"), e.physical_bytes);
    EXPECT_EQ(Int(c, "reclaimable_bytes"), e.reclaimable_bytes);
    EXPECT_EQ(Int(c, "pooled_bytes"), e.pooled_bytes);
    EXPECT_EQ(Int(c, "active_bytes"), e.active_bytes);
    EXPECT_EQ(Int(c, "floor_bytes"), e.floor_bytes);
    EXPECT_EQ(Int(c, "cap_bytes"), e.cap_bytes);
    EXPECT_EQ(Int(c, "peak_physical_bytes"), e.peak_physical_bytes);
    EXPECT_EQ(Int(c, "reclaimed_from_bytes"), e.reclaimed_from_bytes);
    EXPECT_EQ(Int(c, "reclaimed_for_bytes"), e.reclaimed_for_bytes);
    EXPECT_EQ(Int(c, "trimmed_bytes"), e.trimmed_bytes);
    EXPECT_EQ(c.object.size(), std::size(kCacheFields) + 2);  // + id, name.
  }
}

TEST(ArbiterTelemetryTest, EveryFieldWithItsValue) {
  ArbiterStats s;
  // Distinct values, one of them above 2^53, so a swapped or rounded field shows.
  s.budget_bytes = (std::int64_t{1} << 60) + 1;
  s.physical_bytes = 2;
  s.peak_physical_bytes = 3;
  s.floors_bytes = 4;
  s.cross_reclaims = 5;
  s.cross_reclaimed_bytes = 6;
  s.refused_charges = 7;
  s.trimmed_bytes = 8;
  for (int k = 0; k < 3; ++k) {
    ArbiterCacheStats c;
    const std::int64_t b = 100 * (k + 1);
    c.id = static_cast<std::uint64_t>(k + 1);
    c.name = "cache-" + std::to_string(k + 1);
    c.physical_bytes = b + 1;
    c.reclaimable_bytes = b + 2;
    c.pooled_bytes = b + 3;
    c.active_bytes = b + 4;
    c.floor_bytes = b + 5;
    c.cap_bytes = b + 6;
    c.peak_physical_bytes = b + 7;
    c.reclaimed_from_bytes = b + 8;
    c.reclaimed_for_bytes = b + 9;
    c.trimmed_bytes = b + 10;
    s.caches.push_back(c);
  }
  const std::string json = ArbiterStatsJson(s);
  absl::StatusOr<JsonValue> j = ParseJson(json);
  ASSERT_TRUE(j.ok()) << j.status() << "\n" << json;
  ExpectMirrors(*j, s);
  EXPECT_EQ((*j)["caches"].array[2]["name"].string, "cache-3");
}

TEST(ArbiterTelemetryTest, NoCacheIsAnEmptyList) {
  ArbiterStats s;
  s.budget_bytes = 1 << 20;
  absl::StatusOr<JsonValue> j = ParseJson(ArbiterStatsJson(s));
  ASSERT_TRUE(j.ok()) << j.status();
  ExpectMirrors(*j, s);
  EXPECT_TRUE((*j)["caches"].array.empty());
}

TEST(ArbiterTelemetryTest, AnyNameGivesValidJson) {
  struct Case {
    std::string name, want;
  };
  const std::vector<Case> cases = {
      {"", ""},
      {"quote\" backslash\\ slash/", "quote\" backslash\\ slash/"},
      {std::string("nl\n tab\t nul") + '\0' + " \x01\x1f\x7f", std::string("nl\n tab\t nul") + '\0' + " \x01\x1f\x7f"},
      {"\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80", "\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80"},  // é日😀
      // Not UTF-8: a lone continuation byte, a truncated sequence, an
      // overlong '/', a surrogate, above U+10FFFF: each bad byte -> U+FFFD.
      {"a\x80z", "a\xef\xbf\xbdz"},
      {"\xe6\x97", "\xef\xbf\xbd\xef\xbf\xbd"},
      {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"},
      {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
      {"\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
  };
  for (const Case& c : cases) {
    ArbiterStats s;
    ArbiterCacheStats e;
    e.id = 1;
    e.name = c.name;
    s.caches.push_back(e);
    const std::string json = ArbiterStatsJson(s);
    absl::StatusOr<JsonValue> j = ParseJson(json);
    ASSERT_TRUE(j.ok()) << j.status() << " for " << json;
    EXPECT_EQ((*j)["caches"].array[0]["name"].string, c.want) << json;
  }
}

TEST(ArbiterTelemetryTest, FollowsMemoryMovingBetweenTwoCaches) {
  auto host = MakeHostBackend();
  ASSERT_TRUE(host.ok()) << host.status();
  std::shared_ptr<Backend> backend = *host;
  const std::size_t g = backend->granularity();
  auto made = MemoryArbiter::Create(backend, 8 * g);
  ASSERT_TRUE(made.ok()) << made.status();
  std::shared_ptr<MemoryArbiter> arbiter = *made;

  KVCacheOptions o;
  o.num_layers = 2;
  o.num_kv_heads = 2;
  o.head_dim = 64;  // 1 KiB of K/V per token: a 2 MiB granule is 2048 tokens.
  o.max_slots = 4;
  o.max_tokens = 8192;
  o.arbiter = arbiter;
  o.arbiter_name = "alpha \"a\"";
  o.arbiter_floor_bytes = g;
  auto alpha = KVCache::Create(o, backend);
  ASSERT_TRUE(alpha.ok()) << alpha.status();
  o.arbiter_name = "beta";
  o.arbiter_floor_bytes = 0;
  o.arbiter_cap_bytes = 6 * g;
  auto beta = KVCache::Create(o, backend);
  ASSERT_TRUE(beta.ok()) << beta.status();

  // alpha fills the budget, then its requests end: its memory stays mapped.
  std::vector<int> slots;
  for (int i = 0; i < 2; ++i) {
    auto slot = (*alpha)->AllocSlot(8192);
    ASSERT_TRUE(slot.ok()) << slot.status();
    VATTN_ASSERT_OK((*alpha)->Grow(*slot, 8192));
    slots.push_back(*slot);
  }
  for (int s : slots) VATTN_ASSERT_OK((*alpha)->Free(s, kNoFence));
  {
    absl::StatusOr<JsonValue> j = ParseJson(TelemetryJson(*arbiter));
    ASSERT_TRUE(j.ok()) << j.status();
    ExpectMirrors(*j, arbiter->Stats());
    EXPECT_EQ(Int(*j, "physical_bytes"), static_cast<std::int64_t>(8 * g));
    EXPECT_EQ((*j)["caches"].array[0]["name"].string, "alpha \"a\"");
    EXPECT_EQ(Int((*j)["caches"].array[0], "floor_bytes"), static_cast<std::int64_t>(g));
    EXPECT_EQ(Int((*j)["caches"].array[1], "cap_bytes"), static_cast<std::int64_t>(6 * g));
  }
  // beta needs 4 granules: the arbiter takes them from alpha's idle memory.
  auto slot = (*beta)->AllocSlot(8192);
  ASSERT_TRUE(slot.ok()) << slot.status();
  VATTN_ASSERT_OK((*beta)->Grow(*slot, 8192));
  const std::string json = TelemetryJson(*arbiter);
  const ArbiterStats s = arbiter->Stats();
  EXPECT_EQ(json, ArbiterStatsJson(s));  // Nothing moved in between.
  absl::StatusOr<JsonValue> j = ParseJson(json);
  ASSERT_TRUE(j.ok()) << j.status() << "\n" << json;
  ExpectMirrors(*j, s);
  const JsonValue& a = (*j)["caches"].array[0];
  const JsonValue& b = (*j)["caches"].array[1];
  EXPECT_GE(Int(a, "reclaimed_from_bytes"), static_cast<std::int64_t>(4 * g)) << json;
  EXPECT_EQ(Int(a, "reclaimed_from_bytes"), Int(b, "reclaimed_for_bytes")) << json;
  EXPECT_EQ(Int(b, "active_bytes"), static_cast<std::int64_t>(4 * g)) << json;
  EXPECT_GE(Int(*j, "cross_reclaims"), 1) << json;
  EXPECT_LE(Int(a, "physical_bytes") + Int(b, "physical_bytes"),
            static_cast<std::int64_t>(8 * g));
}

}  // namespace
}  // namespace vattn
