// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Placement and reclamation as the number of slots and extents grows: what
// the cache spends deciding, beside the driver calls it makes.
//
//   placement_bench [google benchmark flags, e.g. --benchmark_repetitions=5
//                    --benchmark_filter=AllocSlot --benchmark_out=FILE]
//
// Llama-3-8B shape (32 layers, 8 KV heads, dim 128, fp16: 128 KiB per token,
// 16 tokens per 2 MiB granule), token-major, deferred reclamation, no
// map-ahead thread. Memory is never touched, so the Host backend's memfd
// stays sparse and uses no RAM.
//
//  * AllocSlot/slots:<n>/extents:<e>/hint:<t>: every slot is idle and holds
//    <e> extents of 2 MiB (made untimed, one Grow per extent); the time is
//    one AllocSlot(<t>) (a batch of 32 per iteration, freed untimed after,
//    so the index sees the same slots every iteration). Host backend:
//    reusing a slot makes no driver call, so this is all placement.
//    The Host backend's mappings count against vm.max_map_count (65530
//    here); consecutive extents of one memfd merge into one kernel mapping,
//    so 256 x 200 extents fit.
//  * ReclaimGrow/idle:<n>/<backend>: <n> idle slots hold one 2 MiB extent
//    each and fill the budget but for 8 MiB; a fresh slot's Grow to 4096
//    tokens (one 512 MiB extent) takes 252 of them back first. Timed: that
//    Grow. Raw baseline, measured in the same iteration on the same backend:
//    the same driver calls made directly (the Grow's unmaps and destroys of
//    2 MiB handles, creates and maps of 512 MiB, counted from Stats()).
//    ratio_vs_raw = median(Grow) / median(raw). Backends: h200-model (the
//    latency-model wrapper charging LatencyCosts::H200() over Host) and
//    host.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "benchmark/benchmark.h"
#include "fmt/core.h"
#include "vattn/vattn.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::int64_t kMiB = std::int64_t{1} << 20;
constexpr std::int64_t kTokensPerGranule = 16;  // 2 MiB / 128 KiB.

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

bool Ok(benchmark::State& state, const absl::Status& s, const char* what) {
  if (s.ok()) return true;
  state.SkipWithError(fmt::format("{}: {}", what, s.ToString()).c_str());
  return false;
}

std::shared_ptr<vattn::Backend> MakeBackend(const std::string& name) {
  vattn::HostBackendOptions host_opts;
  host_opts.physical_limit_bytes = std::size_t{1} << 44;  // Never touched.
  auto host = vattn::MakeHostBackend(host_opts);
  if (!host.ok()) return nullptr;
  if (name == "host") return *host;
  auto model = vattn::MakeLatencyModelBackend(*host, vattn::LatencyCosts::H200());
  return model.ok() ? *model : nullptr;
}

vattn::KVCacheOptions Llama8B(int slots, std::int64_t max_tokens,
                              std::int64_t budget) {
  vattn::KVCacheOptions o;
  o.num_layers = 32;
  o.num_kv_heads = 8;
  o.head_dim = 128;
  o.dtype = vattn::DType::kFloat16;
  o.layout = vattn::Layout::kTokenMajor;
  o.max_slots = slots;
  o.max_tokens = max_tokens;
  o.memory_budget_bytes = static_cast<std::size_t>(budget);
  o.min_extent_bytes = static_cast<std::size_t>(2 * kMiB);
  o.max_extent_bytes = static_cast<std::size_t>(2 * kMiB);
  o.defer_reclaim = true;
  o.map_ahead_tokens = 0;
  return o;
}

// `slots` idle slots holding `extents` extents of one granule each. With
// `fresh`, one more slot, taken first and left active holding nothing (any
// idle slot holding memory would beat a fresh one for any hint).
absl::StatusOr<std::unique_ptr<vattn::KVCache>> IdleCache(
    std::shared_ptr<vattn::Backend> backend, int slots, int extents,
    std::int64_t max_tokens, std::int64_t budget, int* fresh) {
  VATTN_ASSIGN_OR_RETURN(
      std::unique_ptr<vattn::KVCache> cache,
      vattn::KVCache::Create(
          Llama8B(slots + (fresh != nullptr ? 1 : 0), max_tokens, budget),
          std::move(backend)));
  if (fresh != nullptr) {
    VATTN_ASSIGN_OR_RETURN(*fresh, cache->AllocSlot(0));
  }
  std::vector<int> held;
  for (int i = 0; i < slots; ++i) {
    VATTN_ASSIGN_OR_RETURN(int slot, cache->AllocSlot(0));
    for (int e = 1; e <= extents; ++e) {
      VATTN_RETURN_IF_ERROR(cache->Grow(slot, e * kTokensPerGranule));
    }
    held.push_back(slot);
  }
  for (int slot : held) VATTN_RETURN_IF_ERROR(cache->Free(slot));
  return cache;
}

void BM_AllocSlot(benchmark::State& state, int slots, int extents,
                  std::int64_t hint) {
  const std::int64_t max_tokens =
      std::max<std::int64_t>(hint, extents * kTokensPerGranule);
  const std::int64_t budget =
      (static_cast<std::int64_t>(slots) * extents + 64) * 2 * kMiB +
      hint * (128 << 10) * 64;
  auto cache = IdleCache(MakeBackend("host"), slots, extents, max_tokens,
                         budget, /*fresh=*/nullptr);
  if (!Ok(state, cache.status(), "filling idle slots")) return;
  constexpr int kBatch = 32;
  std::vector<int> got;
  got.reserve(kBatch);
  for (auto _ : state) {
    got.clear();
    const auto t0 = Clock::now();
    for (int i = 0; i < kBatch; ++i) {
      auto slot = (*cache)->AllocSlot(hint);
      if (!slot.ok()) break;
      got.push_back(*slot);
    }
    const auto t1 = Clock::now();
    if (got.size() != kBatch) {
      state.SkipWithError("AllocSlot failed");
      break;
    }
    state.SetIterationTime(Seconds(t0, t1) / kBatch);
    for (int slot : got) {
      if (!Ok(state, (*cache)->Free(slot), "Free")) return;
    }
  }
  const vattn::CacheStats s = (*cache)->Stats();
  state.counters["reuse_hits"] = static_cast<double>(s.reuse_hits);
  state.counters["map_calls"] = static_cast<double>(s.map_calls);
}

// The raw calls of one pressured Grow: unmap and destroy `unmaps` /
// `destroys` 2 MiB handles, create and map `creates` / `maps` 512 MiB ones.
struct RawCalls {
  std::int64_t unmaps = 0, destroys = 0, creates = 0, maps = 0;
};

absl::StatusOr<double> RawOnce(vattn::Backend* b, const RawCalls& calls,
                               std::int64_t big) {
  const std::int64_t small = 2 * kMiB;
  const std::int64_t n_small = std::max(calls.unmaps, calls.destroys);
  const std::int64_t va_bytes = n_small * small + std::max<std::int64_t>(1, calls.maps) * big;
  VATTN_ASSIGN_OR_RETURN(vattn::DevicePtr va,
                         b->Reserve(static_cast<std::size_t>(va_bytes)));
  std::vector<vattn::PhysicalHandle> handles;
  for (std::int64_t i = 0; i < n_small; ++i) {
    VATTN_ASSIGN_OR_RETURN(vattn::PhysicalHandle h,
                           b->Create(static_cast<std::size_t>(small)));
    handles.push_back(h);
    if (i < calls.unmaps) {
      VATTN_RETURN_IF_ERROR(b->Map(va + static_cast<std::uint64_t>(i * small), h));
    }
  }
  const vattn::DevicePtr big_va = va + static_cast<std::uint64_t>(n_small * small);
  std::vector<vattn::PhysicalHandle> made;
  const auto t0 = Clock::now();
  for (std::int64_t i = 0; i < calls.unmaps; ++i) {
    VATTN_RETURN_IF_ERROR(b->Unmap(va + static_cast<std::uint64_t>(i * small),
                                   static_cast<std::size_t>(small)));
  }
  for (std::int64_t i = 0; i < calls.destroys; ++i) {
    VATTN_RETURN_IF_ERROR(b->Destroy(handles[static_cast<std::size_t>(i)]));
  }
  for (std::int64_t i = 0; i < calls.creates; ++i) {
    VATTN_ASSIGN_OR_RETURN(vattn::PhysicalHandle h,
                           b->Create(static_cast<std::size_t>(big)));
    made.push_back(h);
  }
  for (std::int64_t i = 0; i < calls.maps && i < static_cast<std::int64_t>(made.size());
       ++i) {
    VATTN_RETURN_IF_ERROR(b->Map(big_va + static_cast<std::uint64_t>(i * big),
                                 made[static_cast<std::size_t>(i)]));
  }
  const auto t1 = Clock::now();
  // Teardown, untimed.
  for (std::int64_t i = 0; i < calls.maps && i < static_cast<std::int64_t>(made.size());
       ++i) {
    (void)b->Unmap(big_va + static_cast<std::uint64_t>(i * big),
                   static_cast<std::size_t>(big));
  }
  for (vattn::PhysicalHandle h : made) (void)b->Destroy(h);
  for (std::int64_t i = calls.destroys; i < n_small; ++i) {
    (void)b->Destroy(handles[static_cast<std::size_t>(i)]);
  }
  (void)b->Release(va, static_cast<std::size_t>(va_bytes));
  return Seconds(t0, t1);
}

void BM_ReclaimGrow(benchmark::State& state, int idle, std::string backend_name) {
  const std::shared_ptr<vattn::Backend> backend = MakeBackend(backend_name);
  if (backend == nullptr) {
    state.SkipWithError("no backend");
    return;
  }
  constexpr std::int64_t kGrowTokens = 4096;  // 512 MiB.
  const std::int64_t big = kGrowTokens * (128 << 10);
  const std::int64_t budget = (static_cast<std::int64_t>(idle) + 4) * 2 * kMiB;
  std::vector<double> lib, raw;
  RawCalls calls;
  std::int64_t reclaimed = 0;
  for (auto _ : state) {
    int fresh = -1;
    auto cache = IdleCache(backend, idle, 1, kGrowTokens, budget, &fresh);
    if (!Ok(state, cache.status(), "filling idle slots")) return;
    vattn::KVCache& c = **cache;
    auto info = c.GetSlot(fresh);
    if (!Ok(state, info.status(), "GetSlot")) return;
    if (info->mapped_bytes != 0) {
      state.SkipWithError("the fresh slot holds memory: setup is wrong");
      return;
    }
    const vattn::CacheStats before = c.Stats();
    const auto t0 = Clock::now();
    absl::Status s = c.Grow(fresh, kGrowTokens);
    const auto t1 = Clock::now();
    if (!Ok(state, s, "Grow")) return;
    const vattn::CacheStats after = c.Stats();
    calls.unmaps = after.unmap_calls - before.unmap_calls;
    calls.destroys = after.destroy_calls - before.destroy_calls;
    calls.creates = after.create_calls - before.create_calls;
    calls.maps = after.map_calls - before.map_calls;
    reclaimed = after.reclaimed_extents - before.reclaimed_extents;
    lib.push_back(Seconds(t0, t1));
    state.SetIterationTime(Seconds(t0, t1));
    cache->reset();
    absl::StatusOr<double> r = RawOnce(backend.get(), calls, big);
    if (!Ok(state, r.status(), "raw baseline")) return;
    raw.push_back(*r);
  }
  const double lib_p50 = Median(lib), raw_p50 = Median(raw);
  state.counters["lib_p50_ms"] = lib_p50 * 1e3;
  state.counters["raw_p50_ms"] = raw_p50 * 1e3;
  state.counters["ratio_vs_raw"] = raw_p50 > 0 ? lib_p50 / raw_p50 : 0;
  state.counters["reclaimed"] = static_cast<double>(reclaimed);
  state.counters["unmaps"] = static_cast<double>(calls.unmaps);
  state.counters["destroys"] = static_cast<double>(calls.destroys);
  state.counters["creates"] = static_cast<double>(calls.creates);
  state.counters["maps"] = static_cast<double>(calls.maps);
}

}  // namespace

int main(int argc, char** argv) {
  struct AllocCase {
    int slots, extents;
    std::int64_t hint;
  };
  for (const AllocCase& c : {AllocCase{256, 1, 16}, AllocCase{4096, 1, 16},
                             AllocCase{256, 200, 8000}}) {
    benchmark::RegisterBenchmark(
        fmt::format("AllocSlot/slots:{}/extents:{}/hint:{}", c.slots,
                    c.extents, c.hint)
            .c_str(),
        BM_AllocSlot, c.slots, c.extents, c.hint)
        ->UseManualTime()
        ->MinTime(0.5)
        ->Unit(benchmark::kMicrosecond);
  }
  for (const char* backend : {"h200-model", "host"}) {
    for (int idle : {256, 4096}) {
      benchmark::RegisterBenchmark(
          fmt::format("ReclaimGrow/idle:{}/{}", idle, backend).c_str(),
          BM_ReclaimGrow, idle, std::string(backend))
          ->UseManualTime()
          ->Iterations(idle > 256 ? 5 : 15)
          ->Unit(benchmark::kMillisecond);
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
