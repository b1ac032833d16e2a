// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The multi-model workload (examples/decode/elastic.h): the same requests
// in both memory modes, bursts that alternate, the budget held at every
// sample (per model in the static split, in all with the arbiter), memory
// moving between the models with the arbiter (and never in the split), the
// telemetry, the table and the picture, and the config's errors.
#include "elastic.h"

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/json_value.h"
#include "vattn/vattn.h"

namespace vdecode {
namespace {

ElasticConfig Small(MemoryMode mode) {
  ElasticConfig c;
  auto host = vattn::MakeHostBackend();
  EXPECT_TRUE(host.ok()) << host.status();
  c.backend = *host;
  c.mode = mode;
  c.budget_bytes = std::int64_t{512} << 20;
  c.duration_s = 12;
  c.burst_s = 3;
  c.step_ms = 20;
  c.ttft_bound_ms = 1000;
  for (const char* name : {"llama3-8b", "yi-6b"}) {
    ElasticModel m;
    m.shape = *ModelPreset(name);
    m.max_slots = 64;
    m.prompt_min = 64, m.prompt_max = 256;
    m.output_min = 16, m.output_max = 64;
    // Half the budget holds ~20 (llama) or ~40 (yi) such requests; a burst
    // asks for about 1.5x what half the budget serves.
    m.burst_rate = m.shape.name == "llama3-8b" ? 45 : 90;
    m.quiet_rate = 1;
    c.models.push_back(m);
  }
  return c;
}

TEST(ElasticTest, TheWorkloadIsTheSameInBothModesAndAlternates) {
  const ElasticConfig a = Small(MemoryMode::kArbiter);
  const ElasticConfig s = Small(MemoryMode::kStaticSplit);
  const std::vector<ElasticRequest> wa = ElasticWorkload(a), ws = ElasticWorkload(s);
  ASSERT_EQ(wa.size(), ws.size());
  ASSERT_FALSE(wa.empty());
  for (std::size_t i = 0; i < wa.size(); ++i) {
    EXPECT_EQ(wa[i].model, ws[i].model);
    EXPECT_EQ(wa[i].arrival_ms, ws[i].arrival_ms);
    EXPECT_EQ(wa[i].prompt_tokens, ws[i].prompt_tokens);
    EXPECT_EQ(wa[i].output_tokens, ws[i].output_tokens);
  }
  // Window w is model (w % 2)'s burst: it gets most of the window's arrivals.
  std::vector<std::array<int, 2>> per_window(4, {0, 0});
  EXPECT_TRUE(std::is_sorted(wa.begin(), wa.end(), [](const auto& x, const auto& y) {
    return x.arrival_ms < y.arrival_ms;
  }));
  for (const ElasticRequest& r : wa) {
    ++per_window[static_cast<std::size_t>(r.arrival_ms / 3000)][static_cast<std::size_t>(r.model)];
  }
  for (int w = 0; w < 4; ++w) {
    const auto& n = per_window[static_cast<std::size_t>(w)];
    EXPECT_GT(n[static_cast<std::size_t>(w % 2)], 5 * n[static_cast<std::size_t>(1 - w % 2)])
        << "window " << w;
  }
  ElasticConfig other = a;
  other.seed = 2;
  EXPECT_NE(ElasticWorkload(other).front().arrival_ms, wa.front().arrival_ms);
}

TEST(ElasticTest, StaticSplitHoldsEachShareAndMovesNothing) {
  const ElasticConfig c = Small(MemoryMode::kStaticSplit);
  absl::StatusOr<ElasticResult> r = RunElastic(c);
  ASSERT_TRUE(r.ok()) << r.status();
  const std::int64_t share = c.budget_bytes / 2;
  ASSERT_FALSE(r->timeline.empty());
  for (const ElasticSample& s : r->timeline) {
    ASSERT_EQ(s.physical_bytes.size(), 2u);
    EXPECT_LE(s.physical_bytes[0], share);
    EXPECT_LE(s.physical_bytes[1], share);
  }
  for (const ElasticModelResult& m : r->models) {
    EXPECT_LE(m.peak_physical_bytes, share);
    EXPECT_EQ(m.reclaimed_by_others_bytes, 0);
    EXPECT_GT(m.completed, 0);
    EXPECT_LE(m.completed_in_bound, m.completed);
    EXPECT_LE(m.completed, m.admitted + m.preemptions);
  }
  EXPECT_TRUE(r->telemetry_json.empty());
}

TEST(ElasticTest, TheArbiterMovesMemoryToTheBurstAndServesMoreInTheBound) {
  const ElasticConfig c = Small(MemoryMode::kArbiter);
  absl::StatusOr<ElasticResult> a = RunElastic(c);
  ASSERT_TRUE(a.ok()) << a.status();
  absl::StatusOr<ElasticResult> s = RunElastic(Small(MemoryMode::kStaticSplit));
  ASSERT_TRUE(s.ok()) << s.status();
  // The shared budget holds at every sample.
  std::int64_t most[2] = {0, 0};
  for (const ElasticSample& x : a->timeline) {
    EXPECT_LE(x.physical_bytes[0] + x.physical_bytes[1], c.budget_bytes);
    most[0] = std::max(most[0], x.physical_bytes[0]);
    most[1] = std::max(most[1], x.physical_bytes[1]);
  }
  // Each model, in its burst, held more than a static share, with memory
  // the other model had used.
  EXPECT_GT(most[0], c.budget_bytes / 2);
  EXPECT_GT(most[1], c.budget_bytes / 2);
  EXPECT_GT(a->models[0].reclaimed_by_others_bytes, 0);
  EXPECT_GT(a->models[1].reclaimed_by_others_bytes, 0);
  EXPECT_EQ(a->models[0].arrived, s->models[0].arrived);
  EXPECT_EQ(a->models[1].arrived, s->models[1].arrived);
  EXPECT_GT(a->CompletedInBound(), s->CompletedInBound())
      << ElasticTable({*s, *a});
  // The telemetry is the arbiter's, as JSON, naming both caches.
  absl::StatusOr<vattn::testing::JsonValue> j = vattn::testing::ParseJson(a->telemetry_json);
  ASSERT_TRUE(j.ok()) << j.status() << "\n" << a->telemetry_json;
  EXPECT_EQ((*j)["budget_bytes"].integer, c.budget_bytes);
  ASSERT_EQ((*j)["caches"].array.size(), 2u);
  EXPECT_EQ((*j)["caches"].array[0]["name"].string, "0:llama3-8b");
  EXPECT_EQ((*j)["caches"].array[1]["name"].string, "1:yi-6b");
  EXPECT_EQ((*j)["caches"].array[0]["reclaimed_from_bytes"].integer,
            a->models[0].reclaimed_by_others_bytes);

  // The table has a row per mode and model; the picture a panel per run.
  const std::string table = ElasticTable({*a, *s});
  for (const char* want : {"arbiter      llama3-8b", "arbiter      yi-6b",
                           "static split llama3-8b", "static split yi-6b", "TTFT p99"}) {
    EXPECT_NE(table.find(want), std::string::npos) << want << "\n" << table;
  }
  const std::string svg = ElasticSvg({*a, *s});
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  std::size_t lines = 0;
  for (std::size_t at = svg.find("<polyline"); at != std::string::npos;
       at = svg.find("<polyline", at + 1)) {
    ++lines;
  }
  EXPECT_EQ(lines, 4u);
}

TEST(ElasticTest, BadConfigsNameTheField) {
  ElasticConfig c = Small(MemoryMode::kArbiter);
  c.models.clear();
  EXPECT_TRUE(absl::IsInvalidArgument(RunElastic(c).status()));
  c = Small(MemoryMode::kArbiter);
  c.backend = nullptr;
  EXPECT_TRUE(absl::IsInvalidArgument(RunElastic(c).status()));
  c = Small(MemoryMode::kArbiter);
  c.step_ms = 0;
  EXPECT_NE(RunElastic(c).status().message().find("step_ms"), std::string::npos);
  c = Small(MemoryMode::kStaticSplit);
  c.models[1].prompt_max = 5000;
  const absl::Status st = RunElastic(c).status();
  EXPECT_TRUE(absl::IsInvalidArgument(st));
  EXPECT_NE(st.message().find("yi-6b"), std::string::npos) << st;
  c = Small(MemoryMode::kStaticSplit);
  c.budget_bytes = 1 << 20;  // Below a granule per model.
  EXPECT_TRUE(absl::IsInvalidArgument(RunElastic(c).status()));
}

}  // namespace
}  // namespace vdecode
