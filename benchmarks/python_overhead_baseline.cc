// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The C++ side of benchmarks/python_overhead.py: the calls that the Python
// package wraps, timed from C++ on the same cache shape, so the script can
// quote Python's cost per call as a ratio against this same-run baseline.
//
//   python_overhead_baseline [google benchmark flags, e.g.
//                             --benchmark_format=json --benchmark_repetitions=5]
//
// Cases (Host backend, map-ahead off, everything already backed so no call
// maps): Grow of a slot to its current length (a no-op), Step over 1, 32 and
// 256 slots at their backed length (bookkeeping only), and K(layer) (the view
// a DLPack export is made from). Shape: 4 layers, 8 KV heads, dim 128, fp16,
// 256 slots, each backed to 128 tokens (untouched: the memfd stays sparse).

#include <cstdint>
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "vattn/vattn.h"

namespace {

constexpr int kSlots = 256;
constexpr std::int64_t kBacked = 128;

struct Fixture {
  std::shared_ptr<vattn::Backend> backend;
  std::unique_ptr<vattn::KVCache> cache;
  std::vector<int> slots;
};

Fixture& Get() {
  static Fixture* f = [] {
    auto* fx = new Fixture;
    vattn::HostBackendOptions host;
    host.physical_limit_bytes = std::size_t{1} << 40;
    fx->backend = *vattn::MakeHostBackend(host);
    vattn::KVCacheOptions o;
    o.num_layers = 4;
    o.num_kv_heads = 8;
    o.head_dim = 128;
    o.max_slots = kSlots;
    o.max_tokens = 4096;
    fx->cache = *vattn::KVCache::Create(o, fx->backend);
    for (int i = 0; i < kSlots; ++i) {
      const int s = *fx->cache->AllocSlot(kBacked);
      if (!fx->cache->Grow(s, kBacked).ok()) std::abort();
      fx->slots.push_back(s);
    }
    return fx;
  }();
  return *f;
}

void BM_GrowNoop(benchmark::State& state) {
  Fixture& f = Get();
  for (auto _ : state) {
    absl::Status s = f.cache->Grow(f.slots[0], kBacked);
    benchmark::DoNotOptimize(s);
  }
}
BENCHMARK(BM_GrowNoop);

void BM_Step(benchmark::State& state) {
  Fixture& f = Get();
  const auto batch = static_cast<std::size_t>(state.range(0));
  std::vector<vattn::StepRequest> requests(batch);
  for (std::size_t i = 0; i < batch; ++i) requests[i] = {f.slots[i], kBacked};
  for (auto _ : state) {
    auto r = f.cache->Step(requests);
    benchmark::DoNotOptimize(r);
  }
}
BENCHMARK(BM_Step)->Arg(1)->Arg(32)->Arg(256);

void BM_ViewK(benchmark::State& state) {
  Fixture& f = Get();
  for (auto _ : state) {
    vattn::TensorView v = f.cache->K(1);
    benchmark::DoNotOptimize(v);
  }
}
BENCHMARK(BM_ViewK);

}  // namespace

BENCHMARK_MAIN();
