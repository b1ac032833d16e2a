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
// CPU) and a workload that suits it, and says which. --compare-paged runs
// the same requests again on a paged baseline (the same kernel reading K/V
// through a 16-token block table) and prints both rows and their ratio.
//
//   batch_decode [--backend=auto|cuda|host] [--model=NAME] [--layers=N]
//     [--kv_heads=N] [--q_heads=N] [--head_dim=N] [--dtype=fp16|bf16|fp32]
//     [--max_slots=N] [--max_tokens=N] [--layout=token-major|layer-major]
//     [--requests=N] [--prompt=MIN:MAX] [--output=MIN:MAX] [--trace=CSV]
//     [--seed=N] [--map_ahead_tokens=N | --no-map-ahead] [--compare-paged]
//     [--check[=SAMPLES]] [--threads=N] [--json=FILE] [--no-progress]

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
  --map_ahead_tokens=N       vattn's map-ahead look-ahead (default 256)
  --no-map-ahead             map on the caller's thread (for comparison)
  --compare-paged            also run the paged baseline on the same requests
  --check[=N]                check N attention outputs (default 16) against
                             a float64 reference during the run
  --threads=N                CPU attention threads (default: every core)
  --json=FILE                write the summary as JSON
  --no-progress              no progress bar
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
  std::int64_t map_ahead_tokens = 256;
  bool compare_paged = false;
  int check = 0;
  int threads = 0;
  std::optional<std::string> json;
  bool progress = true;
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
    } else if (key == "map_ahead_tokens") { ok = to_int(&f->map_ahead_tokens);
    } else if (key == "check") { ok = to_int(&f->check);
    } else if (key == "threads") { ok = to_int(&f->threads);
    } else if (key == "json") { f->json = value;
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

void PrintTable(const std::vector<RunResult>& rows) {
  fmt::print("\n{:<7} {:>10} {:>12} {:>10} {:>11} {:>10} {:>7} {:>12} {:>7} {:>8} {:>11} {:>11}\n",
             "engine", "tokens/s", "step (ms)", "attn (ms)", "alloc (us)", "alloc %",
             "Step p99", "Step max", "misses", "drv calls", "peak phys", "peak logic");
  fmt::print("{:-<128}\n", "");
  for (const RunResult& r : rows) {
    fmt::print("{:<7} {:>10.1f} {:>12.3f} {:>10.3f} {:>11.1f} {:>9.3f}% {:>6.1f}us {:>10.1f}us {:>7} {:>8} {:>11} {:>11}\n",
               vdecode::EngineName(r.engine), r.tokens_per_s, r.step_us / 1e3,
               r.attention_us / 1e3, r.alloc_us, 100 * r.alloc_share,
               r.step_call_p99_us, r.step_call_max_us, r.misses, r.driver_calls,
               HumanBytes(static_cast<double>(r.peak_physical_bytes)),
               HumanBytes(static_cast<double>(r.peak_logical_bytes)));
  }
  for (const RunResult& r : rows) {
    fmt::print("  {}: {} on {}, layout {}; {} requests, {} steps, {} tokens generated, "
               "{} prefilled; K/V writes {:.3f} ms/step\n",
               vdecode::EngineName(r.engine), r.backend, r.device, r.layout, r.requests,
               r.steps, r.generated_tokens, r.prefill_tokens, r.fill_us / 1e3);
    if (!r.checks.empty()) {
      fmt::print("  {}: {} attention outputs checked against float64: max relative "
                 "error {:.2e} (tolerance {:.0e})\n",
                 vdecode::EngineName(r.engine), r.checks.size(), r.max_rel_error, r.tolerance);
    }
  }
  if (rows.size() == 2) {
    const RunResult& v = rows[0];
    const RunResult& p = rows[1];
    auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
    fmt::print("  vattn / paged: tokens/s x{:.3f}, attention time x{:.3f}, step time x{:.3f}, "
               "peak physical x{:.3f}\n",
               ratio(v.tokens_per_s, p.tokens_per_s), ratio(v.attention_us, p.attention_us),
               ratio(v.step_us, p.step_us),
               ratio(static_cast<double>(v.peak_physical_bytes),
                     static_cast<double>(p.peak_physical_bytes)));
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

std::string ToJson(const vdecode::DecodeConfig& c, const std::vector<RunResult>& rows) {
  std::ostringstream j;
  j << fmt::format(
      "{{\n  \"model\": {{\"name\": \"{}\", \"layers\": {}, \"kv_heads\": {}, \"q_heads\": {}, "
      "\"head_dim\": {}, \"dtype\": \"{}\"}},\n  \"max_slots\": {}, \"max_tokens\": {}, "
      "\"map_ahead_tokens\": {},\n  \"runs\": [",
      JsonEscape(c.shape.name), c.shape.layers, c.shape.kv_heads, c.shape.q_heads,
      c.shape.head_dim, vdecode::DTypeName(c.shape.dtype), c.max_slots, c.max_tokens,
      c.map_ahead_tokens);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const RunResult& r = rows[i];
    j << fmt::format(
        "{}\n    {{\"engine\": \"{}\", \"device\": \"{}\", \"backend\": \"{}\", \"layout\": \"{}\", "
        "\"requests\": {}, \"steps\": {}, \"generated_tokens\": {}, \"prefill_tokens\": {}, "
        "\"max_batch\": {}, \"wall_s\": {:.6f}, \"tokens_per_s\": {:.3f}, \"step_us\": {:.3f}, "
        "\"attention_us_per_step\": {:.3f}, \"fill_us_per_step\": {:.3f}, "
        "\"alloc_us_per_step\": {:.3f}, \"alloc_share\": {:.6f}, \"step_call_p50_us\": {:.3f}, "
        "\"step_call_p99_us\": {:.3f}, \"step_call_max_us\": {:.3f}, \"misses\": {}, "
        "\"driver_calls\": {}, \"peak_physical_bytes\": {}, \"peak_logical_bytes\": {}, "
        "\"checks\": {}, \"max_rel_error\": {:.3e}, \"tolerance\": {:.1e}}}",
        i == 0 ? "" : ",", vdecode::EngineName(r.engine), JsonEscape(r.device),
        JsonEscape(r.backend), JsonEscape(r.layout), r.requests, r.steps, r.generated_tokens,
        r.prefill_tokens, r.max_batch, r.wall_s, r.tokens_per_s, r.step_us, r.attention_us,
        r.fill_us, r.alloc_us, r.alloc_share, r.step_call_p50_us, r.step_call_p99_us,
        r.step_call_max_us, r.misses, r.driver_calls, r.peak_physical_bytes,
        r.peak_logical_bytes, r.checks.size(), r.max_rel_error, r.tolerance);
  }
  j << "\n  ]";
  if (rows.size() == 2 && rows[1].tokens_per_s > 0 && rows[1].attention_us > 0) {
    j << fmt::format(",\n  \"vattn_over_paged\": {{\"tokens_per_s\": {:.4f}, \"attention_time\": {:.4f}}}",
                     rows[0].tokens_per_s / rows[1].tokens_per_s,
                     rows[0].attention_us / rows[1].attention_us);
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
  c.map_ahead_tokens = f.map_ahead_tokens;
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
  if (!f.model && !f.requests && !f.trace) {
    fmt::print("             (the default {} workload; flags change it, --help lists them)\n",
               gpu ? "GPU" : "CPU");
  }

  std::vector<Engine> engines = {Engine::kVattn};
  if (f.compare_paged) engines.push_back(Engine::kPaged);
  std::vector<RunResult> results;
  for (Engine e : engines) {
    ProgressBar bar(f.progress);
    c.engine = e;
    c.progress = [&bar](const vdecode::ProgressInfo& p) { bar.Update(p); };
    absl::StatusOr<RunResult> r = vdecode::RunDecode(c, requests);
    if (!r.ok()) {
      return Fail(fmt::format("{} run failed: {}", vdecode::EngineName(e), r.status().ToString()));
    }
    results.push_back(*std::move(r));
  }
  PrintTable(results);
  if (f.json) {
    std::ofstream out(*f.json);
    out << ToJson(c, results);
    if (!out) return Fail(fmt::format("cannot write --json file {}", *f.json));
    fmt::print("  summary written to {}\n", *f.json);
  }
  return 0;
}
