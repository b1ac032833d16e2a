// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The peer's workload: what an inference engine does to the cache when a
// wave of requests arrives and then decodes. Llama-3-8B shape (the options'
// defaults: 32 layers, 8 KV heads, head dim 128, fp16, token-major),
// max_tokens 4096. For each look-ahead setting (on: 256 tokens, pool water
// marks 8/32; off: 0, same marks) and each decode batch:
//   1. prompts: `batch` requests arrive at once, prompts uniform in
//      1..--max_prompt: AllocSlot(prompt) for all (the engine schedules the
//      wave), then Grow(prompt) for each (its prefill). Timed from the first
//      AllocSlot until every prompt is backed and the map-ahead thread is
//      idle, with the driver calls (create, map, unmap, destroy) it made.
//   2. steady decode: --steps steps of Step(batch) (timed), finished
//      requests (outputs uniform in 64..512 tokens) replaced by new ones
//      (AllocSlot + Grow), then --compute_us of spinning for the GPU's step.
//      Reports Step's distribution after --warmup steps, misses (slots Step
//      had to map itself), and the thread's wake-ups per second.
//   3. quiet: the requests stay but nobody steps for --quiet_ms, then all
//      are freed and nothing happens for --quiet_ms: wake-ups in each.
// The machine's load (/proc/loadavg) is printed before and after.
//
//   peer_bench [--backend=h200-model|host|cuda] [--batches=256,512]
//              [--lookahead=on,off] [--steps=3000] [--warmup=300]
//              [--compute_us=1000] [--max_prompt=1024] [--quiet_ms=500]
//              [--seed=42] [--json]

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_split.h"
#include "fmt/core.h"
#include "vattn/vattn.h"
#include "bench_backend.h"

namespace {

struct Flags {
  std::string backend = "h200-model";
  std::vector<int> batches = {256, 512};
  std::vector<bool> lookahead = {true, false};
  int steps = 3000;
  int warmup = 300;
  int compute_us = 1000;
  std::int64_t max_prompt = 1024;
  int quiet_ms = 500;
  std::uint64_t seed = 42;
  bool json = false;
};

const char kHelp[] =
    "peer_bench: a wave of prompts, then steady decode, on a Llama-3-8B "
    "shaped KV cache\n"
    "  --backend=NAME     h200-model (H200 driver costs over Host, default),\n"
    "                     host, cuda\n"
    "  --batches=LIST     decode batches, one run each (default 256,512); the\n"
    "                     prompt wave has one request per slot of the batch\n"
    "  --lookahead=LIST   on (256 tokens), off, or both (default on,off)\n"
    "  --steps=N          decode steps per run (default 3000)\n"
    "  --warmup=N         decode steps left out of Step's figures (default "
    "300)\n"
    "  --compute_us=N     simulated GPU time per step (default 1000)\n"
    "  --max_prompt=N     prompts are uniform in 1..N tokens (default 1024)\n"
    "  --quiet_ms=N       length of each quiet phase (default 500)\n"
    "  --seed=N           workload seed (default 42)\n"
    "  --json             one JSON object on stdout instead of the summary\n";

using Clock = std::chrono::steady_clock;

double MicrosSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

void SpinFor(std::chrono::microseconds d) {
  const auto end = Clock::now() + d;
  while (Clock::now() < end) {
  }
}

std::string LoadAvg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

std::int64_t DriverCalls(const vattn::CacheStats& s) {
  return s.create_calls + s.destroy_calls + s.map_calls + s.unmap_calls;
}

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const std::size_t i = std::min(
      sorted.size() - 1,
      static_cast<std::size_t>(p * static_cast<double>(sorted.size())));
  return sorted[i];
}

struct Result {
  int batch = 0;
  bool lookahead = false;
  std::string error;
  // Prompt wave.
  double prompt_ms = 0;         // First AllocSlot until backed and idle.
  double prompt_caller_ms = 0;  // ... until the last Grow returned.
  std::int64_t prompt_maps = 0;
  std::int64_t prompt_creates = 0;
  std::int64_t prompt_driver_calls = 0;
  std::int64_t prompt_tokens = 0;
  double prompt_mapped_mib = 0;  // Mapped after the wave (incl. look-ahead).
  // Steady decode.
  int measured_steps = 0;
  double p50_us = 0, p90_us = 0, p99_us = 0, p999_us = 0, max_us = 0,
         mean_us = 0;
  int over_10us = 0, over_100us = 0, over_1ms = 0;
  std::int64_t misses = 0;  // After warm-up.
  std::int64_t misses_warmup = 0;
  std::int64_t decode_driver_calls = 0;
  double decode_seconds = 0;
  double wakeups_per_s = 0;
  double caller_wakeups_per_s = 0;
  // Quiet phases.
  std::int64_t quiet_active_wakeups = 0;
  std::int64_t quiet_idle_wakeups = 0;
};

Result Run(const std::shared_ptr<vattn::Backend>& backend, const Flags& flags,
           int batch, bool lookahead) {
  Result res;
  res.batch = batch;
  res.lookahead = lookahead;
  vattn::KVCacheOptions opts;  // Llama-3-8B by default.
  opts.max_slots = batch + batch / 4 + 1;
  opts.max_tokens = 4096;
  opts.map_ahead_tokens = lookahead ? 256 : 0;
  opts.pool_low_water = 8;
  opts.pool_high_water = 32;
  auto cache_or = vattn::KVCache::Create(opts, backend);
  if (!cache_or.ok()) {
    res.error = std::string(cache_or.status().message());
    return res;
  }
  vattn::KVCache& cache = **cache_or;
  (void)cache.WaitForBackgroundIdle();  // The initial pool fill.
  std::mt19937_64 rng(flags.seed);
  std::uniform_int_distribution<std::int64_t> prompt_len(1, flags.max_prompt);
  std::uniform_int_distribution<std::int64_t> output_len(64, 512);
  struct Req {
    int slot;
    std::int64_t tokens;
    std::int64_t end;
  };
  std::vector<Req> reqs;
  reqs.reserve(static_cast<std::size_t>(batch));
  auto fail = [&](const absl::Status& s) {
    res.error = std::string(s.message());
    return res;
  };

  // ---- 1. The prompt wave.
  const vattn::CacheStats before = cache.Stats();
  const auto t0 = Clock::now();
  for (int i = 0; i < batch; ++i) {
    const std::int64_t p = prompt_len(rng);
    auto slot = cache.AllocSlot(p);
    if (!slot.ok()) return fail(slot.status());
    reqs.push_back({*slot, p, p + output_len(rng)});
    res.prompt_tokens += p;
  }
  for (const Req& r : reqs) {
    absl::Status s = cache.Grow(r.slot, r.tokens);
    if (!s.ok()) return fail(s);
  }
  res.prompt_caller_ms = MicrosSince(t0) / 1000;
  absl::Status idle = cache.WaitForBackgroundIdle();
  if (!idle.ok()) return fail(idle);
  res.prompt_ms = MicrosSince(t0) / 1000;
  const vattn::CacheStats after_wave = cache.Stats();
  res.prompt_maps = after_wave.map_calls - before.map_calls;
  res.prompt_creates = after_wave.create_calls - before.create_calls;
  res.prompt_driver_calls = DriverCalls(after_wave) - DriverCalls(before);
  res.prompt_mapped_mib =
      static_cast<double>(after_wave.mapped_bytes) / (1 << 20);

  // ---- 2. Steady decode.
  std::vector<vattn::StepRequest> step_batch;
  step_batch.reserve(static_cast<std::size_t>(batch));
  std::vector<double> times;
  times.reserve(static_cast<std::size_t>(flags.steps));
  vattn::CacheStats at_warmup = after_wave;
  Clock::time_point warm_t = Clock::now();
  double total_us = 0;
  for (int step = 0; step < flags.steps; ++step) {
    if (step == flags.warmup) {
      at_warmup = cache.Stats();
      warm_t = Clock::now();
    }
    step_batch.clear();
    for (const Req& r : reqs) step_batch.push_back({r.slot, r.tokens});
    const auto s0 = Clock::now();
    auto result = cache.Step(step_batch);
    const double us = MicrosSince(s0);
    if (!result.ok()) return fail(result.status());
    if (step >= flags.warmup) {
      times.push_back(us);
      total_us += us;
      res.misses += result->misses;
    } else {
      res.misses_warmup += result->misses;
    }
    for (std::size_t i = 0; i < reqs.size();) {
      if (++reqs[i].tokens > reqs[i].end) {
        (void)cache.Free(reqs[i].slot);
        reqs[i] = reqs.back();
        reqs.pop_back();
      } else {
        ++i;
      }
    }
    while (static_cast<int>(reqs.size()) < batch) {
      const std::int64_t p = prompt_len(rng);
      auto slot = cache.AllocSlot(p);
      if (!slot.ok()) return fail(slot.status());
      absl::Status s = cache.Grow(*slot, p);
      if (!s.ok()) return fail(s);
      reqs.push_back({*slot, p, p + output_len(rng)});
    }
    SpinFor(std::chrono::microseconds(flags.compute_us));
  }
  const vattn::CacheStats after_decode = cache.Stats();
  res.decode_seconds = MicrosSince(warm_t) / 1e6;
  std::sort(times.begin(), times.end());
  res.measured_steps = static_cast<int>(times.size());
  res.p50_us = Percentile(times, 0.50);
  res.p90_us = Percentile(times, 0.90);
  res.p99_us = Percentile(times, 0.99);
  res.p999_us = Percentile(times, 0.999);
  res.max_us = times.empty() ? 0 : times.back();
  res.mean_us = times.empty() ? 0 : total_us / static_cast<double>(times.size());
  for (double t : times) {
    res.over_10us += t > 10;
    res.over_100us += t > 100;
    res.over_1ms += t > 1000;
  }
  res.decode_driver_calls = DriverCalls(after_decode) - DriverCalls(at_warmup);
  if (res.decode_seconds > 0) {
    res.wakeups_per_s = static_cast<double>(after_decode.background_wakeups -
                                            at_warmup.background_wakeups) /
                        res.decode_seconds;
    res.caller_wakeups_per_s =
        static_cast<double>(after_decode.background_caller_wakeups -
                            at_warmup.background_caller_wakeups) /
        res.decode_seconds;
  }

  // ---- 3. Quiet: requests held without steps, then none at all.
  (void)cache.WaitForBackgroundIdle();
  const std::int64_t w0 = cache.Stats().background_wakeups;
  std::this_thread::sleep_for(std::chrono::milliseconds(flags.quiet_ms));
  const std::int64_t w1 = cache.Stats().background_wakeups;
  res.quiet_active_wakeups = w1 - w0;
  for (const Req& r : reqs) (void)cache.Free(r.slot);
  reqs.clear();
  (void)cache.WaitForBackgroundIdle();
  const std::int64_t w2 = cache.Stats().background_wakeups;
  std::this_thread::sleep_for(std::chrono::milliseconds(flags.quiet_ms));
  res.quiet_idle_wakeups = cache.Stats().background_wakeups - w2;
  return res;
}

bool ParseFlag(const char* arg, const char* name, std::string* value) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *value = arg + n + 1;
  return true;
}

// Parses argv into *flags; false (with *error) on a bad flag.
bool ParseFlags(int argc, char** argv, Flags* flags, std::string* error) {
  for (int i = 1; i < argc; ++i) {
    std::string v;
    try {
      if (std::strcmp(argv[i], "--json") == 0) {
        flags->json = true;
      } else if (ParseFlag(argv[i], "--backend", &v)) {
        flags->backend = v;
      } else if (ParseFlag(argv[i], "--batches", &v)) {
        flags->batches.clear();
        for (absl::string_view b : absl::StrSplit(v, ',', absl::SkipEmpty())) {
          flags->batches.push_back(std::stoi(std::string(b)));
          if (flags->batches.back() <= 0) throw std::invalid_argument(v);
        }
      } else if (ParseFlag(argv[i], "--lookahead", &v)) {
        flags->lookahead.clear();
        for (absl::string_view b : absl::StrSplit(v, ',', absl::SkipEmpty())) {
          if (b != "on" && b != "off") throw std::invalid_argument(v);
          flags->lookahead.push_back(b == "on");
        }
      } else if (ParseFlag(argv[i], "--steps", &v)) {
        flags->steps = std::stoi(v);
      } else if (ParseFlag(argv[i], "--warmup", &v)) {
        flags->warmup = std::stoi(v);
      } else if (ParseFlag(argv[i], "--compute_us", &v)) {
        flags->compute_us = std::stoi(v);
      } else if (ParseFlag(argv[i], "--max_prompt", &v)) {
        flags->max_prompt = std::stoll(v);
        if (flags->max_prompt < 1 || flags->max_prompt > 4096 - 512) {
          throw std::invalid_argument(v);
        }
      } else if (ParseFlag(argv[i], "--quiet_ms", &v)) {
        flags->quiet_ms = std::stoi(v);
      } else if (ParseFlag(argv[i], "--seed", &v)) {
        flags->seed = std::stoull(v);
      } else {
        *error = std::string("unknown flag ") + argv[i];
        return false;
      }
    } catch (const std::exception&) {
      *error = std::string("bad value in ") + argv[i];
      return false;
    }
  }
  if (flags->steps < 1 || flags->warmup < 0 || flags->warmup >= flags->steps ||
      flags->compute_us < 0 || flags->quiet_ms < 0) {
    *error = "need steps >= 1, 0 <= warmup < steps, compute_us >= 0, "
             "quiet_ms >= 0";
    return false;
  }
  return true;
}

void PrintSummary(const Flags& flags, const std::vector<Result>& results,
                  const std::string& load_before,
                  const std::string& load_after) {
  fmt::print("peer_bench: backend {}, Llama-3-8B shape, prompts 1..{}, {} "
             "decode steps ({} warm-up), {} us compute per step\n",
             flags.backend, flags.max_prompt, flags.steps, flags.warmup,
             flags.compute_us);
  fmt::print("load average: {} before, {} after\n\n", load_before, load_after);
  for (const Result& r : results) {
    fmt::print("batch {} look-ahead {}:\n", r.batch, r.lookahead ? "on" : "off");
    if (!r.error.empty()) {
      fmt::print("  error: {}\n", r.error);
      continue;
    }
    fmt::print("  prompts: {} tokens in {:.2f} ms ({:.2f} ms until the last "
               "Grow), {} driver calls ({} maps, {} creates), {:.0f} MiB "
               "mapped\n",
               r.prompt_tokens, r.prompt_ms, r.prompt_caller_ms,
               r.prompt_driver_calls, r.prompt_maps, r.prompt_creates,
               r.prompt_mapped_mib);
    fmt::print("  decode Step us: p50 {:.2f} p90 {:.2f} p99 {:.2f} p99.9 "
               "{:.2f} max {:.1f} mean {:.2f}; steps > 10 us: {}, > 100 us: "
               "{}, > 1 ms: {} of {}\n",
               r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.max_us, r.mean_us,
               r.over_10us, r.over_100us, r.over_1ms, r.measured_steps);
    fmt::print("  misses: {} after warm-up ({} during it); {} driver calls; "
               "thread wake-ups {:.1f}/s ({:.1f}/s paid by callers)\n",
               r.misses, r.misses_warmup, r.decode_driver_calls,
               r.wakeups_per_s, r.caller_wakeups_per_s);
    fmt::print("  quiet {} ms: {} wake-ups with requests held, {} with none\n",
               flags.quiet_ms, r.quiet_active_wakeups, r.quiet_idle_wakeups);
  }
  // The ratios the targets are stated in, per batch.
  for (const Result& on : results) {
    if (!on.lookahead || !on.error.empty()) continue;
    for (const Result& off : results) {
      if (off.lookahead || off.batch != on.batch || !off.error.empty() ||
          off.prompt_driver_calls == 0) {
        continue;
      }
      fmt::print("batch {}: prompt driver calls on/off {:.3f}x, prompt time "
                 "on/off {:.2f}x\n",
                 on.batch,
                 static_cast<double>(on.prompt_driver_calls) /
                     static_cast<double>(off.prompt_driver_calls),
                 on.prompt_ms / off.prompt_ms);
    }
  }
}

void PrintJson(const Flags& flags, const std::vector<Result>& results,
               const std::string& load_before, const std::string& load_after) {
  std::ostringstream o;
  o << fmt::format(
      "{{\"backend\": \"{}\", \"steps\": {}, \"warmup\": {}, \"compute_us\": "
      "{}, \"max_prompt\": {}, \"seed\": {}, \"load_before\": \"{}\", "
      "\"load_after\": \"{}\", \"runs\": [",
      flags.backend, flags.steps, flags.warmup, flags.compute_us,
      flags.max_prompt, flags.seed, load_before, load_after);
  for (std::size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    if (i > 0) o << ", ";
    std::string error = r.error;
    std::replace(error.begin(), error.end(), '"', '\'');
    o << fmt::format(
        "{{\"batch\": {}, \"lookahead\": {}, \"error\": \"{}\", "
        "\"prompt_ms\": {:.3f}, \"prompt_caller_ms\": {:.3f}, "
        "\"prompt_tokens\": {}, \"prompt_driver_calls\": {}, "
        "\"prompt_maps\": {}, \"prompt_creates\": {}, "
        "\"prompt_mapped_mib\": {:.1f}, \"steps\": {}, \"p50_us\": {:.3f}, "
        "\"p90_us\": {:.3f}, \"p99_us\": {:.3f}, \"p999_us\": {:.3f}, "
        "\"max_us\": {:.3f}, \"mean_us\": {:.3f}, \"over_10us\": {}, "
        "\"over_100us\": {}, \"over_1ms\": {}, \"misses\": {}, "
        "\"misses_warmup\": {}, \"decode_driver_calls\": {}, "
        "\"wakeups_per_s\": {:.2f}, \"caller_wakeups_per_s\": {:.2f}, "
        "\"quiet_active_wakeups\": {}, \"quiet_idle_wakeups\": {}}}",
        r.batch, r.lookahead ? "true" : "false", error, r.prompt_ms,
        r.prompt_caller_ms, r.prompt_tokens, r.prompt_driver_calls,
        r.prompt_maps, r.prompt_creates, r.prompt_mapped_mib,
        r.measured_steps, r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.max_us,
        r.mean_us, r.over_10us, r.over_100us, r.over_1ms, r.misses,
        r.misses_warmup, r.decode_driver_calls, r.wakeups_per_s,
        r.caller_wakeups_per_s, r.quiet_active_wakeups, r.quiet_idle_wakeups);
  }
  o << "]}";
  std::printf("%s\n", o.str().c_str());
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::printf("%s", kHelp);
      return 0;
    }
  }
  Flags flags;
  std::string error;
  if (!ParseFlags(argc, argv, &flags, &error)) {
    std::fprintf(stderr, "peer_bench: %s\n%s", error.c_str(), kHelp);
    return 2;
  }
  auto made = vattn_bench::MakeBenchBackend(flags.backend);
  if (!made.ok()) {
    std::fprintf(stderr, "peer_bench: backend %s unavailable: %s\n",
                 flags.backend.c_str(),
                 std::string(made.status().message()).c_str());
    return flags.backend == "cuda" ? 77 : 1;  // 77: skipped (no device).
  }
  const std::shared_ptr<vattn::Backend> backend = *std::move(made);
  const std::string load_before = LoadAvg();
  std::vector<Result> results;
  for (int batch : flags.batches) {
    for (bool lookahead : flags.lookahead) {
      results.push_back(Run(backend, flags, batch, lookahead));
    }
  }
  const std::string load_after = LoadAvg();
  if (flags.json) {
    PrintJson(flags, results, load_before, load_after);
  } else {
    PrintSummary(flags, results, load_before, load_after);
  }
  for (const Result& r : results) {
    if (!r.error.empty()) return 1;
  }
  return 0;
}
