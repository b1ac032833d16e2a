// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Step's critical path: how long the caller spends in KVCache::Step per
// decode step, with the map-ahead thread on and off, over a continuous-
// batching decode workload (Llama-3-8B shape, token-major, fp16).
//
// Each step: Step(batch) [timed], admit new requests with AllocSlot(prompt)
// (so the thread can map their prefill extents during the step), then spin
// for --compute_us to stand in for the GPU's step, during which the thread
// maps ahead. Requests finish after their output length and are freed.
//
//   step_bench [--backends=latency,host,cuda] [--steps=N] [--compute_us=N]
//              [--warmup=N] [google benchmark flags, e.g.
//              --benchmark_format=json --benchmark_out=FILE]
//
// Reported per run: p50/p99/max of Step time (us), misses per 1000 steps
// (slots Step mapped itself), waits per 1000 steps (steps that waited for
// the thread to finish a slot it was mapping), extents mapped on the
// caller's thread vs the background thread, and the thread's wake-ups per
// second (all, and those Step paid a futex call for).

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_split.h"
#include "benchmark/benchmark.h"
#include "fmt/core.h"
#include "vattn/vattn.h"
#include "bench_backend.h"

namespace {

struct Flags {
  std::vector<std::string> backends = {"latency", "host"};
  int steps = 3000;
  int warmup = 300;
  int compute_us = 1000;
};
Flags g_flags;

void SpinFor(std::chrono::microseconds d) {
  const auto end = std::chrono::steady_clock::now() + d;
  while (std::chrono::steady_clock::now() < end) {
  }
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t i = std::min(
      v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

void BM_Step(benchmark::State& state, std::string backend_name, int batch,
             bool lookahead) {
  auto made = vattn_bench::MakeBenchBackend(backend_name);
  if (!made.ok()) {
    state.SkipWithError(
        ("backend unavailable: " + std::string(made.status().message())).c_str());
    for (auto _ : state) {
    }
    return;
  }
  const std::shared_ptr<vattn::Backend> backend = *std::move(made);
  vattn::KVCacheOptions opts;  // Llama-3-8B: 32 layers, 8 KV heads, dim 128.
  opts.max_slots = batch + batch / 4 + 1;
  opts.max_tokens = 4096;
  opts.map_ahead_tokens = lookahead ? 256 : 0;
  opts.pool_low_water = lookahead ? 8 : 0;
  opts.pool_high_water = lookahead ? 32 : 0;
  for (auto _ : state) {
    auto cache_or = vattn::KVCache::Create(opts, backend);
    if (!cache_or.ok()) {
      state.SkipWithError(std::string(cache_or.status().message()).c_str());
      return;
    }
    vattn::KVCache& cache = **cache_or;
    std::mt19937_64 rng(42);
    std::uniform_int_distribution<std::int64_t> prompt_len(1, 1024);
    std::uniform_int_distribution<std::int64_t> output_len(64, 512);
    struct Req {
      int slot;
      std::int64_t tokens;
      std::int64_t end;
    };
    std::vector<Req> reqs;
    auto admit = [&]() {
      while (static_cast<int>(reqs.size()) < batch) {
        const std::int64_t p = prompt_len(rng);
        auto slot = cache.AllocSlot(p);
        if (!slot.ok()) {
          state.SkipWithError(std::string(slot.status().message()).c_str());
          return false;
        }
        reqs.push_back({*slot, p, p + output_len(rng)});
      }
      return true;
    };
    if (!admit()) return;
    std::vector<vattn::StepRequest> step_batch;
    std::vector<double> times_us;
    times_us.reserve(static_cast<std::size_t>(g_flags.steps));
    std::int64_t misses = 0;
    std::int64_t waits = 0;
    double total_us = 0;
    const vattn::CacheStats before = cache.Stats();
    vattn::CacheStats at_warmup = before;
    auto warm_t = std::chrono::steady_clock::now();
    for (int step = 0; step < g_flags.steps; ++step) {
      if (step == g_flags.warmup) {
        at_warmup = cache.Stats();
        warm_t = std::chrono::steady_clock::now();
      }
      step_batch.clear();
      for (const Req& r : reqs) step_batch.push_back({r.slot, r.tokens});
      const auto t0 = std::chrono::steady_clock::now();
      auto result = cache.Step(step_batch);
      const auto t1 = std::chrono::steady_clock::now();
      if (!result.ok()) {
        state.SkipWithError(std::string(result.status().message()).c_str());
        return;
      }
      const double us =
          std::chrono::duration<double, std::micro>(t1 - t0).count();
      if (step >= g_flags.warmup) {
        times_us.push_back(us);
        misses += result->misses;
        total_us += us;
        // The thread was mid-way through mapping a slot this step needed.
        if (result->misses == 0 && result->map_nanos > 0) ++waits;
      }
      // Finished requests leave; new ones arrive and are announced now, so
      // the thread maps their prompts during the step.
      for (std::size_t i = 0; i < reqs.size();) {
        if (++reqs[i].tokens > reqs[i].end) {
          (void)cache.Free(reqs[i].slot);
          reqs[i] = reqs.back();
          reqs.pop_back();
        } else {
          ++i;
        }
      }
      if (!admit()) return;
      SpinFor(std::chrono::microseconds(g_flags.compute_us));
    }
    const vattn::CacheStats after = cache.Stats();
    const double seconds = std::chrono::duration<double>(
                               std::chrono::steady_clock::now() - warm_t)
                               .count();
    const double measured = static_cast<double>(times_us.size());
    state.SetIterationTime(total_us / 1e6);
    state.counters["p50_us"] = Percentile(times_us, 0.50);
    state.counters["p99_us"] = Percentile(times_us, 0.99);
    state.counters["max_us"] = Percentile(times_us, 1.0);
    state.counters["mean_us"] = measured > 0 ? total_us / measured : 0;
    state.counters["misses_per_1k"] =
        measured > 0 ? 1000.0 * static_cast<double>(misses) / measured : 0;
    state.counters["waits_per_1k"] =
        measured > 0 ? 1000.0 * static_cast<double>(waits) / measured : 0;
    state.counters["fg_extents"] = static_cast<double>(
        (after.extents_mapped - after.background_extents) -
        (at_warmup.extents_mapped - at_warmup.background_extents));
    state.counters["bg_extents"] = static_cast<double>(
        after.background_extents - at_warmup.background_extents);
    state.counters["creates"] =
        static_cast<double>(after.create_calls - at_warmup.create_calls);
    state.counters["bg_creates"] = static_cast<double>(
        after.background_creates - at_warmup.background_creates);
    state.counters["steps"] = measured;
    // The map-ahead thread's wake-ups per second, and those Step paid for.
    state.counters["wakeups_per_s"] =
        static_cast<double>(after.background_wakeups -
                            at_warmup.background_wakeups) /
        seconds;
    state.counters["caller_wakeups_per_s"] =
        static_cast<double>(after.background_caller_wakeups -
                            at_warmup.background_caller_wakeups) /
        seconds;
  }
}

// Step's fast path alone, per request: every slot backed to max_tokens (so
// no map, no miss, no wake-up), Step called back to back on the host
// backend. items_per_second is requests per second; its inverse is Step's
// per-request cost.
void BM_StepFastPath(benchmark::State& state, int batch, bool lookahead) {
  vattn::HostBackendOptions host_opts;
  host_opts.physical_limit_bytes = std::size_t{1} << 40;
  auto backend = vattn::MakeHostBackend(host_opts);
  if (!backend.ok()) {
    state.SkipWithError(std::string(backend.status().message()).c_str());
    return;
  }
  vattn::KVCacheOptions opts;
  opts.max_slots = batch;
  opts.max_tokens = 2048;
  opts.map_ahead_tokens = lookahead ? 256 : 0;
  auto cache_or = vattn::KVCache::Create(opts, *backend);
  if (!cache_or.ok()) {
    state.SkipWithError(std::string(cache_or.status().message()).c_str());
    return;
  }
  vattn::KVCache& cache = **cache_or;
  std::vector<vattn::StepRequest> reqs;
  for (int i = 0; i < batch; ++i) {
    auto slot = cache.AllocSlot(opts.max_tokens);
    if (!slot.ok()) {
      state.SkipWithError(std::string(slot.status().message()).c_str());
      return;
    }
    reqs.push_back({*slot, 1});
  }
  (void)cache.WaitForBackgroundIdle();
  std::int64_t tokens = 1;
  for (auto _ : state) {
    for (vattn::StepRequest& r : reqs) r.tokens = tokens;
    auto result = cache.Step(reqs);
    benchmark::DoNotOptimize(result);
    if (++tokens > opts.max_tokens) {
      state.PauseTiming();
      // Lengths only grow: start the requests over.
      for (vattn::StepRequest& r : reqs) {
        (void)cache.Free(r.slot);
        r.slot = *cache.AllocSlot(opts.max_tokens);
      }
      tokens = 1;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations() * batch);
}

bool ParseFlag(const char* arg, const char* name, std::string* value) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *value = arg + n + 1;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> rest;
  rest.push_back(argv[0]);
  for (int i = 1; i < argc; ++i) {
    std::string v;
    if (std::strcmp(argv[i], "--help") == 0) {
      std::printf(
          "step_bench: KVCache::Step critical-path time over a decode "
          "workload\n"
          "  --backends=LIST   comma list of latency (H200 costs over Host), "
          "host, cuda (default latency,host)\n"
          "  --steps=N         decode steps per run (default 3000)\n"
          "  --warmup=N        steps left out of the figures (default 300)\n"
          "  --compute_us=N    simulated GPU time per step (default 1000)\n"
          "  plus Google Benchmark's flags (--benchmark_filter, "
          "--benchmark_out=FILE, --benchmark_format=json, ...)\n");
      return 0;
    } else if (ParseFlag(argv[i], "--backends", &v)) {
      g_flags.backends = absl::StrSplit(v, ',', absl::SkipEmpty());
    } else if (ParseFlag(argv[i], "--steps", &v)) {
      g_flags.steps = std::stoi(v);
    } else if (ParseFlag(argv[i], "--warmup", &v)) {
      g_flags.warmup = std::stoi(v);
    } else if (ParseFlag(argv[i], "--compute_us", &v)) {
      g_flags.compute_us = std::stoi(v);
    } else {
      rest.push_back(argv[i]);
    }
  }
  for (const std::string& backend : g_flags.backends) {
    for (int batch : {1, 32, 256, 512}) {
      for (bool lookahead : {true, false}) {
        const std::string name =
            fmt::format("Step/{}/batch:{}/lookahead:{}", backend, batch,
                        lookahead ? "on" : "off");
        benchmark::RegisterBenchmark(name.c_str(), BM_Step, backend, batch,
                                     lookahead)
            ->Iterations(1)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
    }
  }
  for (int batch : {256, 512}) {
    for (bool lookahead : {true, false}) {
      const std::string name = fmt::format("StepFastPath/batch:{}/lookahead:{}",
                                           batch, lookahead ? "on" : "off");
      benchmark::RegisterBenchmark(name.c_str(), BM_StepFastPath, batch,
                                   lookahead);
    }
  }
  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
