// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// batch_decode: continuous-batching decode with real attention on vattn
// memory. Requests take a slot (AllocSlot, prompt as hint), prefill writes
// their prompts' K/V rows for every layer, and each decode step grows the
// cache through KVCache::Step, writes one new K/V row per layer and runs
// decode attention for every layer with kernels that only see strided
// views. Finished requests free their slots for the next ones.
//
// With no flags it picks the best backend (CUDA device 0 when built with
// the CUDA kernels and a device is present, else the Host backend on the
// CPU) and a workload that suits it, and says which. It runs the same
// requests on vattn and on a paged baseline (the same kernel reading K/V
// through a 16-token block table), both under the same memory budget, in
// alternating order over --repeats runs, and prints every run, the spread
// of the ratios and where the memory was: in use (backing active
// requests), reclaimable (vattn memory still mapped that no request relies
// on) and pooled (vattn's idle handles; paged's free blocks).
//
//   batch_decode [--backend=auto|cuda|host] [--model=NAME] [--layers=N]
//     [--kv_heads=N] [--q_heads=N] [--head_dim=N] [--dtype=fp16|bf16|fp32]
//     [--max_slots=N] [--max_tokens=N] [--layout=token-major|layer-major]
//     [--requests=N] [--prompt=MIN:MAX] [--output=MIN:MAX] [--trace=CSV]
//     [--seed=N] [--map_ahead_tokens=N | --no-map-ahead]
//     [--max_extent_tokens=N] [--budget_mib=N] [--repeats=N] [--vattn-only]
//     [--check[=SAMPLES]] [--threads=N] [--json=FILE] [--no-progress]
//     [--shared-prefix=TOKENS]
//   batch_decode --models=2 [flags]   several models sharing one budget
//     (examples/decode/elastic_cli.h; --models=2 --help lists its flags)

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "cuda_attention.h"
#include "decode_loop.h"
#include "elastic_cli.h"
#include "fmt/core.h"
#include "vattn/vattn.h"

namespace {

using vdecode::DType;
using vdecode::Engine;
using vdecode::RunResult;

constexpr const char* kUsage = R"(usage: batch_decode [flags]
  --backend=auto|cuda|host   where the KV cache lives (auto: CUDA if present)
  --model=NAME               llama3-8b, llama3-70b-tp8, yi-6b, mistral-7b, tiny
  --layers=N --kv_heads=N --q_heads=N --head_dim=N --dtype=fp16|bf16|fp32
  --max_slots=N              requests decoded at once
  --max_tokens=N             longest request (prompt + output)
  --layout=token-major|layer-major
  --requests=N               random requests, all arriving at step 0, with
  --prompt=MIN:MAX --output=MIN:MAX   uniform prompt / output lengths
  --trace=FILE               CSV rows arrival_step,prompt_tokens,output_tokens
  --seed=N
  --map_ahead_tokens=N       vattn's map-ahead look-ahead (default: 256 on a
                             GPU, 8 on the CPU)
  --no-map-ahead             map on the caller's thread (for comparison)
  --max_extent_tokens=N      vattn's decode-extent cap (default: the library's
                             64 on a GPU, 32 on the CPU)
  --budget_mib=N             memory both engines may use (default: the plan's
                             peak in 16-token blocks x1.25 on the CPU, x2 on
                             a GPU)
  --repeats=N                runs per engine, in alternating order (default
                             3 on the CPU, 1 on a GPU)
  --vattn-only               run vattn alone (no paged baseline)
  --compare-paged            run the paged baseline too (the default)
  --check[=N]                check N attention outputs (default 16) against
                             a float64 reference during the run
  --threads=N                CPU attention threads (default: every core)
  --json=FILE                write the summary as JSON
  --no-progress              no progress bar
  --shared-prefix=TOKENS     every request starts with the same TOKENS-token
                             system prompt (added to its prompt); vattn keeps
                             it once (KeepPrefix after the first prefill,
                             AllocSlotWithPrefix for the rest) and the run is
                             repeated without sharing to report the memory
                             saved (examples/decode/shared_prefix.h)
  --models=N|A,B             N models (one cache each) sharing one budget
                             through a MemoryArbiter, bursts alternating
                             between them, against a static split; a table
                             and an SVG of each cache's memory over time
                             (--models=2 --help lists its own flags)
)";

struct Flags {
  std::string backend = "auto";
  std::optional<std::string> model;
  std::optional<int> layers, kv_heads, q_heads, head_dim;
  std::optional<DType> dtype;
  std::optional<int> max_slots;
  std::optional<std::int64_t> max_tokens;
  vattn::Layout layout = vattn::Layout::kTokenMajor;
  std::optional<int> requests;
  std::optional<std::pair<std::int64_t, std::int64_t>> prompt, output;
  std::optional<std::string> trace;
  std::uint32_t seed = 1;
  std::optional<std::int64_t> map_ahead_tokens;
  std::optional<std::int64_t> max_extent_tokens;
  std::optional<std::int64_t> budget_mib;
  std::optional<int> repeats;
  bool compare_paged = true;
  int check = 0;
  int threads = 0;
  std::optional<std::string> json;
  bool progress = true;
  std::int64_t shared_prefix = 0;
};

bool ParseRange(std::string_view v, std::pair<std::int64_t, std::int64_t>* r) {
  const std::size_t colon = v.find(':');
  if (colon == std::string_view::npos) {
    std::int64_t x;
    if (!absl::SimpleAtoi(std::string(v), &x)) return false;
    *r = {x, x};
    return x >= 1;
  }
  return absl::SimpleAtoi(std::string(v.substr(0, colon)), &r->first) &&
         absl::SimpleAtoi(std::string(v.substr(colon + 1)), &r->second) && r->first >= 1 &&
         r->second >= r->first;
}

// Returns an error message, or "" when every flag parsed.
std::string ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") return "help";
    if (arg.substr(0, 2) != "--") return fmt::format("unexpected argument '{}'", arg);
    std::string key(arg.substr(2));
    std::string value;
    bool has_value = false;
    if (const std::size_t eq = key.find('='); eq != std::string::npos) {
      value = key.substr(eq + 1);
      key = key.substr(0, eq);
      has_value = true;
    }
    std::replace(key.begin(), key.end(), '-', '_');
    // Flags without a value.
    if (key == "compare_paged") { f->compare_paged = true; continue; }
    if (key == "vattn_only") { f->compare_paged = false; continue; }
    if (key == "no_map_ahead") { f->map_ahead_tokens = 0; continue; }
    if (key == "no_progress") { f->progress = false; continue; }
    if (key == "check" && !has_value) { f->check = 16; continue; }
    if (!has_value) {
      if (i + 1 >= argc) return fmt::format("--{} needs a value", key);
      value = argv[++i];
    }
    auto to_int = [&](auto* out) {
      std::int64_t x;
      if (!absl::SimpleAtoi(value, &x) || x < 0) return false;
      *out = static_cast<std::remove_pointer_t<decltype(out)>>(x);
      return true;
    };
    auto to_opt_int = [&](auto* out) {
      std::int64_t x;
      if (!absl::SimpleAtoi(value, &x) || x <= 0) return false;
      *out = static_cast<typename std::remove_reference_t<decltype(*out)>::value_type>(x);
      return true;
    };
    bool ok = true;
    if (key == "backend") {
      f->backend = value;
      ok = value == "auto" || value == "cuda" || value == "host";
    } else if (key == "model") {
      f->model = value;
      ok = vdecode::ModelPreset(value).has_value();
    } else if (key == "layers") { ok = to_opt_int(&f->layers);
    } else if (key == "kv_heads") { ok = to_opt_int(&f->kv_heads);
    } else if (key == "q_heads") { ok = to_opt_int(&f->q_heads);
    } else if (key == "head_dim") { ok = to_opt_int(&f->head_dim);
    } else if (key == "dtype") {
      if (value == "fp16") f->dtype = DType::kF16;
      else if (value == "bf16") f->dtype = DType::kBF16;
      else if (value == "fp32") f->dtype = DType::kF32;
      else ok = false;
    } else if (key == "max_slots") { ok = to_opt_int(&f->max_slots);
    } else if (key == "max_tokens") { ok = to_opt_int(&f->max_tokens);
    } else if (key == "layout") {
      if (value == "token-major" || value == "token_major") f->layout = vattn::Layout::kTokenMajor;
      else if (value == "layer-major" || value == "layer_major") f->layout = vattn::Layout::kLayerMajor;
      else ok = false;
    } else if (key == "requests") { ok = to_opt_int(&f->requests);
    } else if (key == "prompt") {
      std::pair<std::int64_t, std::int64_t> r;
      ok = ParseRange(value, &r);
      f->prompt = r;
    } else if (key == "output") {
      std::pair<std::int64_t, std::int64_t> r;
      ok = ParseRange(value, &r);
      f->output = r;
    } else if (key == "trace") { f->trace = value;
    } else if (key == "seed") { ok = to_int(&f->seed);
    } else if (key == "map_ahead_tokens") {
      std::int64_t x = 0;
      ok = to_int(&x);
      f->map_ahead_tokens = x;
    } else if (key == "max_extent_tokens") { ok = to_opt_int(&f->max_extent_tokens);
    } else if (key == "budget_mib") { ok = to_opt_int(&f->budget_mib);
    } else if (key == "repeats") { ok = to_opt_int(&f->repeats);
    } else if (key == "check") { ok = to_int(&f->check);
    } else if (key == "threads") { ok = to_int(&f->threads);
    } else if (key == "json") { f->json = value;
    } else if (key == "shared_prefix") { ok = to_int(&f->shared_prefix);
    } else {
      return fmt::format("unknown flag --{}", key);
    }
    if (!ok) return fmt::format("bad value '{}' for --{}", value, key);
  }
  return {};
}

std::string HumanBytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.1f} {}", b, units[u]);
}

// ---- Progress ----------------------------------------------------------------

class ProgressBar {
 public:
  explicit ProgressBar(bool enabled) : enabled_(enabled), tty_(isatty(2) == 1) {}
  void Update(const vdecode::ProgressInfo& p) {
    if (!enabled_) return;
    const double frac = p.tokens_total > 0
                            ? static_cast<double>(p.tokens_done) / static_cast<double>(p.tokens_total)
                            : 1.0;
    const double rate = p.elapsed_s > 0 ? static_cast<double>(p.tokens_done) / p.elapsed_s : 0;
    const std::string text = fmt::format(
        "{:<5} {:>3.0f}% {}/{} tokens  {:.0f} tok/s  active {}  physical {}",
        vdecode::EngineName(p.engine), 100 * frac, p.tokens_done, p.tokens_total,
        rate, p.active, HumanBytes(static_cast<double>(p.physical_bytes)));
    if (tty_) {
      constexpr int kWidth = 24;
      const int filled = static_cast<int>(frac * kWidth);
      fmt::print(stderr, "\r[{}{}] {}\x1b[K", std::string(static_cast<std::size_t>(filled), '#'),
                 std::string(static_cast<std::size_t>(kWidth - filled), '.'), text);
      if (p.final) fmt::print(stderr, "\n");
    } else if (p.final || p.elapsed_s - last_plain_s_ >= 5.0) {
      // Not a terminal: a plain line every few seconds of run time.
      last_plain_s_ = p.elapsed_s;
      fmt::print(stderr, "progress: {}\n", text);
    }
    std::fflush(stderr);
  }

 private:
  bool enabled_;
  bool tty_;
  double last_plain_s_ = 0;
};

// ---- Output --------------------------------------------------------------------

std::string Mib(std::int64_t b) {
  return fmt::format("{:.1f}", static_cast<double>(b) / (1 << 20));
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// A median and the range over the repeats.
struct Spread {
  double median = 0, min = 0, max = 0;
  std::string ToString() const {
    return fmt::format("{:.3f} ({:.3f}..{:.3f})", median, min, max);
  }
};
Spread SpreadOf(const std::vector<double>& v) {
  Spread s;
  if (v.empty()) return s;
  s.median = Median(v);
  s.min = *std::min_element(v.begin(), v.end());
  s.max = *std::max_element(v.begin(), v.end());
  return s;
}

// One engine's runs (index = repeat) and where each ran in its repeat.
struct EngineRuns {
  Engine engine = Engine::kVattn;
  std::vector<RunResult> runs;
  std::vector<int> order;  // 1: ran first in its repeat, 2: second.
};

// vattn over paged: ratios per repeat (each vattn run over the paged run of
// the same repeat), their median and range; memory peaks of the first runs
// (the schedule is the same in every run).
struct Summary {
  Spread tokens_per_s, attention, step;
  double in_use = 0, in_use_with_next = 0;
};

double Ratio(double a, double b) { return b > 0 ? a / b : 0.0; }

Summary Summarize(const EngineRuns& v, const EngineRuns& p) {
  std::vector<double> tps, att, step;
  for (std::size_t i = 0; i < v.runs.size() && i < p.runs.size(); ++i) {
    tps.push_back(Ratio(v.runs[i].tokens_per_s, p.runs[i].tokens_per_s));
    att.push_back(Ratio(v.runs[i].attention_us, p.runs[i].attention_us));
    step.push_back(Ratio(v.runs[i].step_us, p.runs[i].step_us));
  }
  Summary s;
  s.tokens_per_s = SpreadOf(tps);
  s.attention = SpreadOf(att);
  s.step = SpreadOf(step);
  std::int64_t vi = 0, vn = 0, pi = 0, pn = 0;
  for (const RunResult& r : v.runs) {
    vi = std::max(vi, r.peak_in_use_bytes);
    vn = std::max(vn, r.peak_in_use_overlap_bytes);
  }
  for (const RunResult& r : p.runs) {
    pi = std::max(pi, r.peak_in_use_bytes);
    pn = std::max(pn, r.peak_in_use_overlap_bytes);
  }
  s.in_use = Ratio(static_cast<double>(vi), static_cast<double>(pi));
  s.in_use_with_next = Ratio(static_cast<double>(vn), static_cast<double>(pn));
  return s;
}

void PrintTable(const std::vector<EngineRuns>& engines) {
  constexpr const char* kHead =
      "{:<6} {:>3} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6} {:>5} {:>7} {:>7} {:>7} {:>7} "
      "{:>8} {:>7}\n";
  fmt::print("\n");
  fmt::print(fmt::runtime(kHead), "engine", "run", "tokens/s", "step ms", "attn ms", "alloc us",
             "Step p99", "Step max", "misses", "calls", "in use", "+next", "reclaim", "pooled",
             "physical", "logical");
  fmt::print(fmt::runtime(kHead), "", "", "", "", "", "per step", "us", "us", "", "", "MiB",
             "MiB", "MiB", "MiB", "MiB", "MiB");
  fmt::print("{:-<128}\n", "");
  for (const EngineRuns& e : engines) {
    for (std::size_t i = 0; i < e.runs.size(); ++i) {
      const RunResult& r = e.runs[i];
      fmt::print("{:<6} {:>3} {:>8.1f} {:>9.3f} {:>9.3f} {:>8.1f} {:>8.1f} {:>8.1f} {:>6} {:>5} "
                 "{:>7} {:>7} {:>7} {:>7} {:>8} {:>7}\n",
                 vdecode::EngineName(r.engine),
                 fmt::format("{}{}", i + 1, e.order[i] == 1 ? "a" : "b"), r.tokens_per_s,
                 r.step_us / 1e3, r.attention_us / 1e3, r.alloc_us, r.step_call_p99_us,
                 r.step_call_max_us, r.misses, r.driver_calls, Mib(r.peak_in_use_bytes),
                 Mib(r.peak_in_use_overlap_bytes), Mib(r.peak_reclaimable_bytes),
                 Mib(r.peak_pooled_bytes), Mib(r.peak_physical_bytes),
                 Mib(r.peak_logical_bytes));
    }
  }
  fmt::print(
      "  run: the repeat; a = ran first in it, b = second. Memory columns are peaks. in use:\n"
      "  backing the step's batch (vattn: its requests' extents, look-ahead included; paged:\n"
      "  their blocks). +next: also while the next step's requests hold their slots (vattn\n"
      "  maps their prompts ahead, during this step). reclaim: vattn memory still mapped that\n"
      "  no request relies on (idle slots, surplus); any Grow takes it back. pooled: vattn's\n"
      "  idle handles, paged's free blocks. physical: everything (paged allocates its pool,\n"
      "  the whole budget, up front).\n");
  for (const EngineRuns& e : engines) {
    const RunResult& r = e.runs.front();
    fmt::print("  {}: {} on {}, layout {}; {} requests, {} steps, {} tokens generated, "
               "{} prefilled; K/V writes {:.3f} ms/step{}\n",
               vdecode::EngineName(r.engine), r.backend, r.device, r.layout, r.requests,
               r.steps, r.generated_tokens, r.prefill_tokens, r.fill_us / 1e3,
               r.budget_bytes > 0 ? fmt::format("; budget {} MiB", Mib(r.budget_bytes))
                                  : std::string());
    for (const RunResult& x : e.runs) {
      if (x.checks.empty()) continue;
      fmt::print("  {}: {} attention outputs checked against float64: max relative "
                 "error {:.2e} (tolerance {:.0e})\n",
                 vdecode::EngineName(x.engine), x.checks.size(), x.max_rel_error, x.tolerance);
      break;
    }
  }
  if (engines.size() == 2) {
    const Summary s = Summarize(engines[0], engines[1]);
    fmt::print("  vattn / paged over {} repeat(s), median (min..max): tokens/s x{}, "
               "attention time x{}, step time x{}\n",
               engines[0].runs.size(), s.tokens_per_s.ToString(), s.attention.ToString(),
               s.step.ToString());
    fmt::print("  vattn / paged peak memory in use x{:.3f} (x{:.3f} with the next step's "
               "prompts mapped ahead), same budget\n",
               s.in_use, s.in_use_with_next);
  }
}

std::string JsonEscape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) continue;
    o += ch;
  }
  return o;
}

std::string ToJson(const vdecode::DecodeConfig& c, const std::vector<EngineRuns>& engines) {
  std::ostringstream j;
  j << fmt::format(
      "{{\n  \"model\": {{\"name\": \"{}\", \"layers\": {}, \"kv_heads\": {}, \"q_heads\": {}, "
      "\"head_dim\": {}, \"dtype\": \"{}\"}},\n  \"max_slots\": {}, \"max_tokens\": {}, "
      "\"map_ahead_tokens\": {}, \"max_extent_tokens\": {}, \"budget_bytes\": {},\n"
      "  \"runs\": [",
      JsonEscape(c.shape.name), c.shape.layers, c.shape.kv_heads, c.shape.q_heads,
      c.shape.head_dim, vdecode::DTypeName(c.shape.dtype), c.max_slots, c.max_tokens,
      c.map_ahead_tokens, c.max_extent_tokens, c.budget_bytes);
  bool first = true;
  for (const EngineRuns& e : engines) {
    for (std::size_t i = 0; i < e.runs.size(); ++i) {
      const RunResult& r = e.runs[i];
      j << fmt::format(
          "{}\n    {{\"engine\": \"{}\", \"repeat\": {}, \"ran_first\": {}, \"device\": \"{}\", "
          "\"backend\": \"{}\", \"layout\": \"{}\", "
          "\"requests\": {}, \"steps\": {}, \"generated_tokens\": {}, \"prefill_tokens\": {}, "
          "\"max_batch\": {}, \"wall_s\": {:.6f}, \"tokens_per_s\": {:.3f}, \"step_us\": {:.3f}, "
          "\"attention_us_per_step\": {:.3f}, \"fill_us_per_step\": {:.3f}, "
          "\"alloc_us_per_step\": {:.3f}, \"alloc_share\": {:.6f}, \"step_call_p50_us\": {:.3f}, "
          "\"step_call_p99_us\": {:.3f}, \"step_call_max_us\": {:.3f}, \"misses\": {}, "
          "\"driver_calls\": {}, \"peak_physical_bytes\": {}, \"peak_logical_bytes\": {}, "
          "\"peak_in_use_bytes\": {}, \"peak_in_use_with_next_bytes\": {}, "
          "\"peak_reclaimable_bytes\": {}, \"peak_pooled_bytes\": {}, \"budget_bytes\": {}, "
          "\"checks\": {}, \"max_rel_error\": {:.3e}, \"tolerance\": {:.1e}}}",
          first ? "" : ",", vdecode::EngineName(r.engine), i + 1,
          e.order[i] == 1 ? "true" : "false", JsonEscape(r.device), JsonEscape(r.backend),
          JsonEscape(r.layout), r.requests, r.steps, r.generated_tokens, r.prefill_tokens,
          r.max_batch, r.wall_s, r.tokens_per_s, r.step_us, r.attention_us, r.fill_us,
          r.alloc_us, r.alloc_share, r.step_call_p50_us, r.step_call_p99_us,
          r.step_call_max_us, r.misses, r.driver_calls, r.peak_physical_bytes,
          r.peak_logical_bytes, r.peak_in_use_bytes, r.peak_in_use_overlap_bytes,
          r.peak_reclaimable_bytes, r.peak_pooled_bytes, r.budget_bytes, r.checks.size(),
          r.max_rel_error, r.tolerance);
      first = false;
    }
  }
  j << "\n  ]";
  if (engines.size() == 2) {
    const Summary s = Summarize(engines[0], engines[1]);
    j << fmt::format(
        ",\n  \"vattn_over_paged\": {{\"tokens_per_s\": {{\"median\": {:.4f}, \"min\": {:.4f}, "
        "\"max\": {:.4f}}}, \"attention_time\": {{\"median\": {:.4f}, \"min\": {:.4f}, "
        "\"max\": {:.4f}}}, \"peak_in_use\": {:.4f}, \"peak_in_use_with_next\": {:.4f}}}",
        s.tokens_per_s.median, s.tokens_per_s.min, s.tokens_per_s.max, s.attention.median,
        s.attention.min, s.attention.max, s.in_use, s.in_use_with_next);
  }
  j << "\n}\n";
  return j.str();
}

// ---- Backend choice --------------------------------------------------------------

struct Choice {
  std::shared_ptr<vattn::Backend> backend;
  vdecode::Device device = vdecode::Device::kCpu;
  std::string why;
};

absl::StatusOr<Choice> ChooseBackend(const std::string& want) {
  std::string why;
  if (want == "host") {
    why = "--backend=host was asked for";
  } else if (!vdecode::cuda::Built()) {
    why = "built without the CUDA kernels (nvcc not found)";
  } else {
    int kernels_see = 0;
    const std::string e = vdecode::cuda::DeviceCount(&kernels_see);
    const absl::StatusOr<int> count = vattn::CudaDeviceCount();
    if (!count.ok()) {
      why = fmt::format("CUDA is unavailable ({})", std::string(count.status().message()));
    } else if (*count == 0 || kernels_see == 0) {
      why = e.empty() ? std::string("no CUDA device") : e;
    } else {
      absl::StatusOr<std::shared_ptr<vattn::Backend>> cuda = vattn::MakeCudaBackend(0);
      if (cuda.ok()) {
        return Choice{*std::move(cuda), vdecode::Device::kCuda,
                      fmt::format("CUDA device 0 (of {})", *count)};
      }
      why = fmt::format("MakeCudaBackend(0) failed ({})", std::string(cuda.status().message()));
    }
  }
  if (want == "cuda") return absl::UnavailableError(why);
  VATTN_ASSIGN_OR_RETURN(std::shared_ptr<vattn::Backend> host, vattn::MakeHostBackend());
  return Choice{std::move(host), vdecode::Device::kCpu, why + "; using the Host backend on the CPU"};
}

int Fail(const std::string& what) {
  fmt::print(stderr, "batch_decode: {}\n", what);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]).rfind("--models=", 0) == 0) {
      return vdecode::ModelsMain(argc, argv);
    }
  }
  Flags f;
  if (const std::string e = ParseFlags(argc, argv, &f); !e.empty()) {
    if (e == "help") {
      fmt::print("{}", kUsage);
      return 0;
    }
    fmt::print(stderr, "batch_decode: {}\n{}", e, kUsage);
    return 2;
  }
  absl::StatusOr<Choice> choice = ChooseBackend(f.backend);
  if (!choice.ok()) return Fail(std::string(choice.status().message()));
  const bool gpu = choice->device == vdecode::Device::kCuda;

  // Defaults by device: the GPU gets Llama-3-8B at batch 64; the CPU a
  // workload that finishes in well under a minute on two cores.
  vdecode::DecodeConfig c;
  const std::string model = f.model.value_or(gpu ? "llama3-8b" : "yi-6b");
  c.shape = *vdecode::ModelPreset(model);
  if (f.layers) c.shape.layers = *f.layers, c.shape.name = "custom";
  if (f.kv_heads) c.shape.kv_heads = *f.kv_heads, c.shape.name = "custom";
  if (f.q_heads) c.shape.q_heads = *f.q_heads, c.shape.name = "custom";
  if (f.head_dim) c.shape.head_dim = *f.head_dim, c.shape.name = "custom";
  if (f.dtype) c.shape.dtype = *f.dtype;
  c.device = choice->device;
  c.backend = choice->backend;
  c.layout = f.layout;
  c.max_slots = f.max_slots.value_or(gpu ? 64 : 8);
  c.max_tokens = f.max_tokens.value_or(gpu ? 8192 : 2048);
  // On the CPU (Host backend) a map is one mmap call of a few microseconds
  // against steps of tens of milliseconds: a short look-ahead (8 tokens:
  // the next extent is mapped a few steps before it is needed) and
  // one-granule decode extents (32 tokens of Yi-6B) cost nothing there and
  // keep the memory in use close to what the requests hold (look-ahead 32:
  // 1.19x paged's peak in use; 8: 1.08x; docs/BENCHMARKS.md). A GPU's
  // driver calls cost 30-50 us each: the library's 64-token extents and a
  // long look-ahead.
  c.map_ahead_tokens = f.map_ahead_tokens.value_or(gpu ? 256 : 8);
  c.max_extent_tokens = f.max_extent_tokens.value_or(gpu ? 0 : 32);
  c.threads = f.threads;
  c.check_samples = f.check;
  c.seed = f.seed;

  std::vector<vdecode::Request> requests;
  if (f.trace) {
    std::ifstream in(*f.trace);
    if (!in) return Fail(fmt::format("cannot read --trace file {}", *f.trace));
    std::stringstream text;
    text << in.rdbuf();
    absl::StatusOr<std::vector<vdecode::Request>> t = vdecode::ParseTraceCsv(text.str());
    if (!t.ok()) return Fail(t.status().ToString());
    requests = *std::move(t);
  } else {
    const auto prompt = f.prompt.value_or(gpu ? std::pair<std::int64_t, std::int64_t>{128, 2048}
                                              : std::pair<std::int64_t, std::int64_t>{32, 256});
    const auto output = f.output.value_or(gpu ? std::pair<std::int64_t, std::int64_t>{64, 512}
                                              : std::pair<std::int64_t, std::int64_t>{16, 64});
    requests = vdecode::RandomRequests(f.requests.value_or(gpu ? 256 : 32), prompt.first,
                                       prompt.second, output.first, output.second, f.seed);
  }

  // The shared system prompt starts every request.
  c.shared_prefix_tokens = f.shared_prefix;
  if (f.shared_prefix > 0) {
    std::int64_t longest_request = 0;
    for (vdecode::Request& r : requests) {
      r.prompt_tokens += f.shared_prefix;
      longest_request = std::max(longest_request, r.prompt_tokens + r.output_tokens);
    }
    if (!f.max_tokens) c.max_tokens = std::max(c.max_tokens, longest_request);
  }

  fmt::print("backend      {}: {}\n", choice->backend->capabilities().name, choice->why);
  fmt::print("model        {}: {} layers, {} KV heads, {} query heads, head dim {}, {} "
             "({} of K/V per token)\n",
             c.shape.name, c.shape.layers, c.shape.kv_heads, c.shape.q_heads, c.shape.head_dim,
             vdecode::DTypeName(c.shape.dtype), HumanBytes(static_cast<double>(c.shape.BytesPerToken())));
  std::int64_t prompt_sum = 0, output_sum = 0, longest = 0;
  for (const vdecode::Request& r : requests) {
    prompt_sum += r.prompt_tokens;
    output_sum += r.output_tokens;
    longest = std::max(longest, r.prompt_tokens + r.output_tokens);
  }
  fmt::print("workload     {} requests{}, {} prompt and {} output tokens in all, longest {}; "
             "batch up to {}, max_tokens {}, layout {}, map-ahead {}\n",
             requests.size(), f.trace ? fmt::format(" from {}", *f.trace) : std::string(),
             prompt_sum, output_sum, longest, c.max_slots, c.max_tokens,
             vattn::LayoutName(c.layout),
             c.map_ahead_tokens > 0 ? fmt::format("{} tokens", c.map_ahead_tokens) : "off");
  if (f.shared_prefix > 0) {
    fmt::print("             every prompt starts with the same {}-token system prompt\n",
               f.shared_prefix);
  }
  // Both engines get the same memory: the paged pool is that many bytes of
  // blocks, vattn's memory_budget_bytes is that. On a GPU, 2x: its 256-token
  // look-ahead maps ahead of every request and of the next step's prompts,
  // memory no Step can take back while those requests live.
  const double headroom = gpu ? 2.0 : 1.25;
  c.budget_bytes = f.budget_mib ? *f.budget_mib << 20
                                : vdecode::DefaultBudgetBytes(requests, c.max_slots, c.shape,
                                                              headroom);
  fmt::print("memory       budget {} MiB for each engine{}; vattn decode extents up to {} "
             "tokens\n",
             Mib(c.budget_bytes),
             f.budget_mib ? std::string()
                          : fmt::format(" ({}x the plan's peak in 16-token blocks)", headroom),
             c.max_extent_tokens > 0 ? c.max_extent_tokens : vattn::KVCacheOptions().max_extent_tokens);
  if (!f.model && !f.requests && !f.trace) {
    fmt::print("             (the default {} workload; flags change it, --help lists them)\n",
               gpu ? "GPU" : "CPU");
  }

  std::vector<EngineRuns> engines(f.compare_paged ? 2 : 1);
  engines[0].engine = Engine::kVattn;
  if (f.compare_paged) engines[1].engine = Engine::kPaged;
  const int repeats = f.repeats.value_or(gpu ? 1 : 3);
  for (int rep = 0; rep < repeats; ++rep) {
    // Alternating order: neither engine always runs on a warm (or a
    // throttled) machine.
    std::vector<std::size_t> order = {0};
    if (engines.size() == 2) {
      order = rep % 2 == 0 ? std::vector<std::size_t>{0, 1} : std::vector<std::size_t>{1, 0};
    }
    for (std::size_t k = 0; k < order.size(); ++k) {
      EngineRuns& e = engines[order[k]];
      ProgressBar bar(f.progress);
      c.engine = e.engine;
      c.progress = [&bar](const vdecode::ProgressInfo& p) { bar.Update(p); };
      absl::StatusOr<RunResult> r = vdecode::RunDecode(c, requests);
      if (!r.ok()) {
        return Fail(fmt::format("{} run failed: {}", vdecode::EngineName(e.engine),
                                r.status().ToString()));
      }
      e.runs.push_back(*std::move(r));
      e.order.push_back(k == 0 ? 1 : 2);
    }
  }
  PrintTable(engines);
  if (f.shared_prefix > 0) {
    // The same requests on vattn, every request holding its own copy.
    ProgressBar bar(f.progress);
    c.engine = Engine::kVattn;
    c.share_prefix = false;
    c.progress = [&bar](const vdecode::ProgressInfo& p) { bar.Update(p); };
    absl::StatusOr<RunResult> unshared = vdecode::RunDecode(c, requests);
    if (!unshared.ok()) {
      return Fail(fmt::format("vattn run without sharing failed: {}",
                              unshared.status().ToString()));
    }
    const RunResult& shared = engines[0].runs.front();
    fmt::print("  vattn without sharing: {:.1f} tokens/s, peak physical {} MiB, in use {} MiB\n",
               unshared->tokens_per_s, Mib(unshared->peak_physical_bytes),
               Mib(unshared->peak_in_use_bytes));
    fmt::print("{}", vdecode::SharedPrefixSummary(shared.sharing, unshared->sharing));
  }
  if (f.json) {
    std::ofstream out(*f.json);
    out << ToJson(c, engines);
    if (!out) return Fail(fmt::format("cannot write --json file {}", *f.json));
    fmt::print("  summary written to {}\n", *f.json);
  }
  return 0;
}
