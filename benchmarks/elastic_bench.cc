// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// elastic_bench: two models sharing one memory budget under bursts that
// alternate between them (issue 14's benchmark). The same workload runs,
// in the same process, with the memory shared through one MemoryArbiter and
// split statically in equal shares (each cache's own memory_budget_bytes);
// the modes alternate which runs first over --repeats repeats, each repeat
// with its own seed. Reported per mode and model: requests served (all
// their tokens produced within the run), those whose TTFT (arrival to first
// token, waiting for memory included) met --ttft_bound_ms, TTFT p50/p99,
// peak physical memory; and per repeat the ratio arbiter / static of
// requests served within the bound, with its median and range.
//
// The loop (examples/decode/elastic.h) models the GPU's compute as
// --step_ms per tick and adds the allocator's own measured time; on the
// default backend, h200-model (the Host backend under the latency model
// with the H200's measured driver costs), that includes the driver's costs
// of reclaiming memory from the other model and mapping it. No KV is
// written: the memfd stays sparse, so the budget can be GiBs.
//
// Rates: a model's burst rate is --load times the rate the WHOLE budget
// sustains for it (budget / (bytes per token x (mean prompt + mean
// output / 2)) requests at once, each living mean-output ticks), capped by
// its max_slots; between its bursts it gets --quiet times that rate. With
// --load above 0.5 a burst overloads half the budget.
//
//   elastic_bench [--backend=h200-model|host] [--models=llama3-8b,yi-6b]
//     [--budget_gib=G] [--duration_s=S] [--burst_s=S] [--step_ms=MS]
//     [--load=X] [--quiet=X] [--ttft_bound_ms=MS] [--prompt=MIN:MAX]
//     [--output=MIN:MAX] [--max_slots=N] [--repeats=N] [--seed=N]
//     [--json=FILE] [--svg=FILE]

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "elastic.h"
#include "elastic_cli.h"
#include "fmt/core.h"

namespace {

constexpr const char* kUsage = R"(usage: elastic_bench [flags]
Two models sharing one budget (arbiter) against a static 50/50 split, same
run, bursts that alternate between the models. Flags:
)";

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

std::string RunJson(const vdecode::ElasticResult& r, int repeat, bool first) {
  std::ostringstream j;
  j << fmt::format("{{\"repeat\": {}, \"mode\": \"{}\", \"ran_first\": {}, \"served\": {}, "
                   "\"served_in_bound\": {}, \"ticks\": {}, \"alloc_ms\": {:.3f}, "
                   "\"wall_s\": {:.3f}, \"models\": [",
                   repeat, vdecode::MemoryModeName(r.mode), first ? "true" : "false",
                   r.Completed(), r.CompletedInBound(), r.ticks, r.alloc_ms, r.wall_s);
  for (std::size_t i = 0; i < r.models.size(); ++i) {
    const vdecode::ElasticModelResult& m = r.models[i];
    j << fmt::format(
        "{}{{\"name\": \"{}\", \"arrived\": {}, \"admitted\": {}, \"served\": {}, "
        "\"served_in_bound\": {}, \"generated_tokens\": {}, \"ttft_p50_ms\": {:.1f}, "
        "\"ttft_p99_ms\": {:.1f}, \"ttft_max_ms\": {:.1f}, \"peak_physical_bytes\": {}, "
        "\"reclaimed_by_others_bytes\": {}, \"preemptions\": {}, \"waiting_at_end\": {}, "
        "\"driver_calls\": {}}}",
        i == 0 ? "" : ", ", m.name, m.arrived, m.admitted, m.completed, m.completed_in_bound,
        m.generated_tokens, m.ttft_p50_ms, m.ttft_p99_ms, m.ttft_max_ms,
        m.peak_physical_bytes, m.reclaimed_by_others_bytes, m.preemptions, m.waiting_at_end,
        m.driver_calls);
  }
  j << "]}";
  return j.str();
}

}  // namespace

int main(int argc, char** argv) {
  vdecode::ElasticFlags f;
  int repeats = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      fmt::print("{}{}  --repeats=N                repeats, seed, seed+1, ... (default 3)\n",
                 kUsage, vdecode::ElasticFlagsUsage());
      return 0;
    }
    if (arg.rfind("--repeats=", 0) == 0) {
      if (!absl::SimpleAtoi(arg.substr(10), &repeats) || repeats < 1) {
        fmt::print(stderr, "elastic_bench: bad value for --repeats\n");
        return 2;
      }
      continue;
    }
    std::string error;
    const int parsed = vdecode::ParseElasticFlag(arg, &f, &error);
    if (parsed <= 0) {
      fmt::print(stderr, "elastic_bench: {}\n",
                 parsed < 0 ? error : fmt::format("unknown argument '{}' (--help)", arg));
      return 2;
    }
  }
  absl::StatusOr<std::shared_ptr<vattn::Backend>> backend =
      vdecode::MakeElasticBackend(f.backend);
  if (!backend.ok()) {
    fmt::print(stderr, "elastic_bench: {}\n", backend.status().ToString());
    return 1;
  }
  std::string description;
  absl::StatusOr<vdecode::ElasticConfig> made =
      vdecode::ElasticConfigFromFlags(f, *backend, &description);
  if (!made.ok()) {
    fmt::print(stderr, "elastic_bench: {}\n", made.status().ToString());
    return 2;
  }
  vdecode::ElasticConfig c = *std::move(made);
  fmt::print("elastic_bench: {}", description);

  std::vector<vdecode::ElasticResult> first_repeat;
  std::vector<double> ratio_in_bound, ratio_served;
  std::ostringstream json_runs;
  bool any_json = false;
  for (int rep = 0; rep < repeats; ++rep) {
    c.seed = f.seed + static_cast<std::uint32_t>(rep);
    const std::vector<vdecode::MemoryMode> order =
        rep % 2 == 0
            ? std::vector<vdecode::MemoryMode>{vdecode::MemoryMode::kStaticSplit,
                                               vdecode::MemoryMode::kArbiter}
            : std::vector<vdecode::MemoryMode>{vdecode::MemoryMode::kArbiter,
                                               vdecode::MemoryMode::kStaticSplit};
    std::map<vdecode::MemoryMode, vdecode::ElasticResult> got;
    for (std::size_t k = 0; k < order.size(); ++k) {
      c.mode = order[k];
      absl::StatusOr<vdecode::ElasticResult> r = vdecode::RunElastic(c);
      if (!r.ok()) {
        fmt::print(stderr, "elastic_bench: {} run failed: {}\n",
                   vdecode::MemoryModeName(c.mode), r.status().ToString());
        return 1;
      }
      json_runs << (any_json ? ",\n    " : "\n    ") << RunJson(*r, rep + 1, k == 0);
      any_json = true;
      got.emplace(order[k], *std::move(r));
    }
    const vdecode::ElasticResult& a = got.at(vdecode::MemoryMode::kArbiter);
    const vdecode::ElasticResult& s = got.at(vdecode::MemoryMode::kStaticSplit);
    fmt::print("\nrepeat {} (seed {}; {} ran first)\n{}", rep + 1, c.seed,
               vdecode::MemoryModeName(order[0]), vdecode::ElasticTable({s, a}));
    const double rb = s.CompletedInBound() > 0
                          ? static_cast<double>(a.CompletedInBound()) /
                                static_cast<double>(s.CompletedInBound())
                          : 0;
    const double rs = s.Completed() > 0 ? static_cast<double>(a.Completed()) /
                                              static_cast<double>(s.Completed())
                                        : 0;
    ratio_in_bound.push_back(rb);
    ratio_served.push_back(rs);
    fmt::print("  arbiter / static: served within the TTFT bound x{:.2f}, served x{:.2f}\n", rb,
               rs);
    if (rep == 0) first_repeat = {s, a};
  }
  auto spread = [](const std::vector<double>& v) {
    return fmt::format("x{:.2f} (x{:.2f}..x{:.2f})", Median(v),
                       *std::min_element(v.begin(), v.end()),
                       *std::max_element(v.begin(), v.end()));
  };
  fmt::print("\narbiter / static over {} repeat(s), median (min..max): served within the "
             "TTFT bound {}, served {}\n",
             repeats, spread(ratio_in_bound), spread(ratio_served));
  if (!f.svg.empty()) {
    std::ofstream out(f.svg);
    out << vdecode::ElasticSvg(first_repeat);
    if (!out) {
      fmt::print(stderr, "elastic_bench: cannot write {}\n", f.svg);
      return 1;
    }
    fmt::print("picture of repeat 1 written to {}\n", f.svg);
  }
  if (!f.json.empty()) {
    std::ofstream out(f.json);
    out << fmt::format(
        "{{\n  \"budget_bytes\": {}, \"duration_s\": {}, \"burst_s\": {}, \"step_ms\": {}, "
        "\"load\": {}, \"quiet\": {}, \"ttft_bound_ms\": {}, \"backend\": \"{}\",\n"
        "  \"ratio_in_bound\": {{\"median\": {:.4f}, \"min\": {:.4f}, \"max\": {:.4f}}},\n"
        "  \"runs\": [{}\n  ]\n}}\n",
        c.budget_bytes, f.duration_s, f.burst_s, f.step_ms, f.load, f.quiet, f.ttft_bound_ms,
        c.backend->capabilities().name, Median(ratio_in_bound),
        *std::min_element(ratio_in_bound.begin(), ratio_in_bound.end()),
        *std::max_element(ratio_in_bound.begin(), ratio_in_bound.end()), json_runs.str());
    if (!out) {
      fmt::print(stderr, "elastic_bench: cannot write {}\n", f.json);
      return 1;
    }
  }
  return 0;
}
