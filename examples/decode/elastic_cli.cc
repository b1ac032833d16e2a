// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "elastic_cli.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace vdecode {
namespace {

bool ParseRange(const std::string& v, std::pair<std::int64_t, std::int64_t>* r) {
  std::vector<std::string> p = absl::StrSplit(v, ':');
  std::pair<std::int64_t, std::int64_t> x;
  if (p.size() != 2 || !absl::SimpleAtoi(p[0], &x.first) ||
      !absl::SimpleAtoi(p[1], &x.second) || x.first < 1 || x.second < x.first) {
    return false;
  }
  *r = x;
  return true;
}

// "2" (or "3"): that many of the default pair and then other presets;
// otherwise a comma-separated list of preset names.
bool ParseModels(const std::string& v, std::vector<std::string>* out) {
  int n = 0;
  if (absl::SimpleAtoi(v, &n)) {
    static const char* kOrder[] = {"llama3-8b", "yi-6b", "llama3-70b-tp8", "mistral-7b"};
    if (n < 1 || n > 4) return false;
    out->assign(kOrder, kOrder + n);
    return true;
  }
  std::vector<std::string> names = absl::StrSplit(v, ',');
  for (const std::string& name : names) {
    if (!ModelPreset(name)) return false;
  }
  *out = names;
  return !names.empty();
}

}  // namespace

const char* ElasticFlagsUsage() {
  return R"(  --models=N|A,B             N of llama3-8b, yi-6b, llama3-70b-tp8, mistral-7b,
                             or a list of presets (default llama3-8b,yi-6b)
  --backend=h200-model|host|cuda   (default h200-model: the Host backend under
                             the latency model with the H200's driver costs)
  --budget_gib=G             the shared budget (default 4)
  --duration_s=S             modelled seconds of arrivals (default 60)
  --burst_s=S                length of one burst; bursts alternate (default 10)
  --step_ms=MS               modelled compute per tick (default 20)
  --load=X                   a burst's rate / what the whole budget sustains
                             for that model (default 0.8)
  --quiet=X                  rate between a model's bursts, same unit (0.05)
  --ttft_bound_ms=MS         the TTFT a served request must meet (2000)
  --prompt=MIN:MAX --output=MIN:MAX   lengths (default 256:1024, 64:256)
  --max_slots=N              requests per model at once (default 128)
  --map_ahead_tokens=N       the caches' map-ahead look-ahead (default 0: off)
  --seed=N
  --json=FILE                results as JSON
  --svg=FILE                 the picture of each cache's physical bytes
)";
}

int ParseElasticFlag(const std::string& arg, ElasticFlags* f, std::string* error) {
  const std::size_t eq = arg.find('=');
  if (arg.rfind("--", 0) != 0 || eq == std::string::npos) return 0;
  std::string key = arg.substr(2, eq - 2);
  std::replace(key.begin(), key.end(), '-', '_');
  const std::string value = arg.substr(eq + 1);
  auto positive = [&](double* out) {
    double x = 0;
    if (!absl::SimpleAtod(value, &x) || !(x > 0)) return false;
    *out = x;
    return true;
  };
  bool ok = true;
  if (key == "backend") {
    ok = value == "h200-model" || value == "latency" || value == "host" || value == "cuda";
    if (ok) f->backend = value;
  } else if (key == "models") {
    ok = ParseModels(value, &f->models);
  } else if (key == "budget_gib") {
    ok = positive(&f->budget_gib);
  } else if (key == "duration_s") {
    ok = positive(&f->duration_s);
  } else if (key == "burst_s") {
    ok = positive(&f->burst_s);
  } else if (key == "step_ms") {
    ok = positive(&f->step_ms);
  } else if (key == "load") {
    ok = positive(&f->load);
  } else if (key == "quiet") {
    double x = 0;
    ok = absl::SimpleAtod(value, &x) && x >= 0;
    if (ok) f->quiet = x;
  } else if (key == "ttft_bound_ms") {
    ok = positive(&f->ttft_bound_ms);
  } else if (key == "prompt") {
    ok = ParseRange(value, &f->prompt);
  } else if (key == "output") {
    ok = ParseRange(value, &f->output);
  } else if (key == "max_slots") {
    int x = 0;
    ok = absl::SimpleAtoi(value, &x) && x > 0;
    if (ok) f->max_slots = x;
  } else if (key == "map_ahead_tokens") {
    std::int64_t x = 0;
    ok = absl::SimpleAtoi(value, &x) && x >= 0;
    if (ok) f->map_ahead_tokens = x;
  } else if (key == "seed") {
    ok = absl::SimpleAtoi(value, &f->seed);
  } else if (key == "json") {
    f->json = value;
  } else if (key == "svg") {
    f->svg = value;
  } else {
    return 0;
  }
  if (!ok) {
    *error = absl::StrCat("bad value '", value, "' for --", key);
    return -1;
  }
  return 1;
}

absl::StatusOr<std::shared_ptr<vattn::Backend>> MakeElasticBackend(const std::string& name) {
  if (name == "cuda") return vattn::MakeCudaBackend(0);
  if (name != "host" && name != "h200-model" && name != "latency") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown backend '", name, "' (h200-model, host or cuda)"));
  }
  // No KV is written, so the memfd stays sparse: a large limit costs nothing.
  vattn::HostBackendOptions host_opts;
  host_opts.physical_limit_bytes = std::size_t{1} << 40;
  absl::StatusOr<std::shared_ptr<vattn::Backend>> host = vattn::MakeHostBackend(host_opts);
  if (!host.ok() || name == "host") return host;
  return vattn::MakeLatencyModelBackend(*host, vattn::LatencyCosts::H200());
}

absl::StatusOr<ElasticConfig> ElasticConfigFromFlags(const ElasticFlags& f,
                                                     std::shared_ptr<vattn::Backend> backend,
                                                     std::string* description) {
  ElasticConfig c;
  c.backend = std::move(backend);
  c.budget_bytes = static_cast<std::int64_t>(f.budget_gib * (1 << 30));
  c.duration_s = f.duration_s;
  c.burst_s = f.burst_s;
  c.step_ms = f.step_ms;
  c.ttft_bound_ms = f.ttft_bound_ms;
  c.map_ahead_tokens = f.map_ahead_tokens;
  c.seed = f.seed;
  const double mean_prompt = static_cast<double>(f.prompt.first + f.prompt.second) / 2;
  const double mean_output = static_cast<double>(f.output.first + f.output.second) / 2;
  std::string d = absl::StrFormat(
      "backend %s; budget %.2f GiB shared by %d models; %g s of arrivals in bursts of %g s "
      "that alternate; %g ms of modelled compute per tick; TTFT bound %g ms\n",
      c.backend != nullptr ? c.backend->capabilities().name : "none", f.budget_gib,
      f.models.size(), f.duration_s, f.burst_s, f.step_ms, f.ttft_bound_ms);
  for (const std::string& name : f.models) {
    const std::optional<ModelShape> shape = ModelPreset(name);
    if (!shape) return absl::InvalidArgumentError(absl::StrCat("unknown model '", name, "'"));
    ElasticModel m;
    m.shape = *shape;
    m.max_slots = f.max_slots;
    m.prompt_min = f.prompt.first, m.prompt_max = f.prompt.second;
    m.output_min = f.output.first, m.output_max = f.output.second;
    m.max_tokens = std::max<std::int64_t>(4096, f.prompt.second + f.output.second);
    const double per_request =
        static_cast<double>(shape->BytesPerToken()) * (mean_prompt + mean_output / 2);
    const double concurrent = std::min(static_cast<double>(f.max_slots),
                                       static_cast<double>(c.budget_bytes) / per_request);
    const double sustained = concurrent / (mean_output * f.step_ms / 1e3);  // Requests/s.
    m.burst_rate = f.load * sustained;
    m.quiet_rate = f.quiet * sustained;
    absl::StrAppendFormat(&d,
                          "  %s: %d KiB of K/V per token, up to %d requests at once; %.1f "
                          "requests/s in its bursts, %.2f between them\n",
                          m.shape.name, m.shape.BytesPerToken() / 1024, m.max_slots,
                          m.burst_rate, m.quiet_rate);
    c.models.push_back(m);
  }
  if (description != nullptr) *description = d;
  return c;
}

namespace {

std::string ModelsJson(const std::vector<ElasticResult>& runs) {
  std::ostringstream j;
  j << "{\"runs\": [";
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const ElasticResult& r = runs[i];
    j << (i ? ", " : "")
      << absl::StrFormat("{\"mode\": \"%s\", \"budget_bytes\": %d, \"served\": %d, "
                         "\"served_in_bound\": %d, \"ttft_bound_ms\": %g, \"models\": [",
                         MemoryModeName(r.mode), r.budget_bytes, r.Completed(),
                         r.CompletedInBound(), r.ttft_bound_ms);
    for (std::size_t k = 0; k < r.models.size(); ++k) {
      const ElasticModelResult& m = r.models[k];
      j << (k ? ", " : "")
        << absl::StrFormat(
               "{\"name\": \"%s\", \"arrived\": %d, \"served\": %d, \"served_in_bound\": %d, "
               "\"generated_tokens\": %d, \"ttft_p50_ms\": %.1f, \"ttft_p99_ms\": %.1f, "
               "\"peak_physical_bytes\": %d, \"reclaimed_by_others_bytes\": %d, "
               "\"preemptions\": %d}",
               m.name, m.arrived, m.completed, m.completed_in_bound, m.generated_tokens,
               m.ttft_p50_ms, m.ttft_p99_ms, m.peak_physical_bytes,
               m.reclaimed_by_others_bytes, m.preemptions);
    }
    j << "]";
    if (!r.telemetry_json.empty()) j << ", \"telemetry\": " << r.telemetry_json;
    j << "}";
  }
  j << "]}\n";
  return j.str();
}

}  // namespace

int ModelsMain(int argc, char** argv) {
  ElasticFlags f;
  bool compare_static = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf(
          "usage: batch_decode --models=N|A,B [flags]\n"
          "Several models, one KV cache each, share one memory budget through a\n"
          "vattn::MemoryArbiter under bursts that alternate between them; the same\n"
          "requests also run on a static split (budget / N per model) unless\n"
          "--arbiter-only. No attention runs: one tick is --step_ms of modelled\n"
          "compute plus the allocator's measured time.\n%s"
          "  --arbiter-only             skip the static split\n",
          ElasticFlagsUsage());
      return 0;
    }
    if (arg == "--arbiter-only" || arg == "--arbiter_only") {
      compare_static = false;
      continue;
    }
    if (arg == "--compare-static" || arg == "--compare_static") {
      compare_static = true;
      continue;
    }
    std::string error;
    const int parsed = ParseElasticFlag(arg, &f, &error);
    if (parsed < 0 || parsed == 0) {
      std::fprintf(stderr, "batch_decode --models: %s\n",
                   parsed < 0 ? error.c_str()
                              : absl::StrCat("unknown argument '", arg,
                                             "' (--models --help lists the flags)")
                                    .c_str());
      return 2;
    }
  }
  if (f.svg.empty()) {
    const std::string self = argc > 0 ? argv[0] : "";
    const std::size_t slash = self.rfind('/');
    f.svg = (slash == std::string::npos ? std::string(".") : self.substr(0, slash)) +
            "/elastic_memory.svg";
  }
  absl::StatusOr<std::shared_ptr<vattn::Backend>> backend = MakeElasticBackend(f.backend);
  if (!backend.ok()) {
    std::fprintf(stderr, "batch_decode --models: %s\n", backend.status().ToString().c_str());
    return 1;
  }
  std::string description;
  absl::StatusOr<ElasticConfig> config = ElasticConfigFromFlags(f, *backend, &description);
  if (!config.ok()) {
    std::fprintf(stderr, "batch_decode --models: %s\n", config.status().ToString().c_str());
    return 2;
  }
  std::printf("%s", description.c_str());
  std::vector<MemoryMode> modes = {MemoryMode::kArbiter};
  if (compare_static) modes.push_back(MemoryMode::kStaticSplit);
  std::vector<ElasticResult> runs;
  for (MemoryMode mode : modes) {
    config->mode = mode;
    absl::StatusOr<ElasticResult> r = RunElastic(*config);
    if (!r.ok()) {
      std::fprintf(stderr, "batch_decode --models: %s run failed: %s\n", MemoryModeName(mode),
                   r.status().ToString().c_str());
      return 1;
    }
    runs.push_back(*std::move(r));
  }
  std::printf("\n%s", ElasticTable(runs).c_str());
  std::printf(
      "  served: requests that produced all their tokens in the run; in bnd: of those, TTFT\n"
      "  (arrival to first token, waiting for memory included) within the bound. from other:\n"
      "  bytes the arbiter took from the other model's idle memory for this one; lost to oth:\n"
      "  the reverse. preempt: requests sent back to the queue when a decode step found no\n"
      "  memory; wait: never admitted.\n");
  if (runs.size() == 2 && runs[1].CompletedInBound() > 0) {
    std::printf("  arbiter / static split: served within the TTFT bound x%.2f, served x%.2f\n",
                static_cast<double>(runs[0].CompletedInBound()) /
                    static_cast<double>(runs[1].CompletedInBound()),
                static_cast<double>(runs[0].Completed()) /
                    static_cast<double>(std::max<std::int64_t>(1, runs[1].Completed())));
  }
  if (!runs[0].telemetry_json.empty()) {
    std::printf("  arbiter telemetry at the end: %s\n", runs[0].telemetry_json.c_str());
  }
  {
    std::ofstream out(f.svg);
    out << ElasticSvg(runs);
    if (!out) {
      std::fprintf(stderr, "batch_decode --models: cannot write --svg file %s\n", f.svg.c_str());
      return 1;
    }
    std::printf("  picture of each cache's physical bytes over time: %s\n", f.svg.c_str());
  }
  if (!f.json.empty()) {
    std::ofstream out(f.json);
    out << ModelsJson(runs);
    if (!out) {
      std::fprintf(stderr, "batch_decode --models: cannot write --json file %s\n",
                   f.json.c_str());
      return 1;
    }
    std::printf("  results written to %s\n", f.json.c_str());
  }
  return 0;
}

}  // namespace vdecode
