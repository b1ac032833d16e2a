// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The map path measured against the floor: raw backend calls (the driver's
// own cost) beside the library's paths that do the same work, on the same
// backend, in the same run.
//
//   map_bench [--backends=host,latency,cuda] [--iters=N] [--policy_slots=N]
//             [--policy_tokens=N] [--policy_iters=N] [--summary=false]
//             [google benchmark flags, e.g. --benchmark_filter=Raw
//              --benchmark_out=FILE --benchmark_out_format=json]
//
// Three groups of benchmarks, per backend:
//
//  * Raw/{Create,Map,Unmap,Destroy}/<backend>/<MiB>: one backend call on a
//    handle of 2, 8, 32, 128 or 256 MiB, timed alone (manual time around the
//    call; setup and teardown, e.g. the Unmap after a timed Map, are outside
//    the timed region). Map is map + access (cuMemMap + cuMemSetAccess on
//    CUDA). This is the floor.
//  * Lib/<path>/<backend>/<MiB>: the library doing the same work through
//    KVCache (Llama-3-8B shape, token-major, one extent of <MiB>):
//      GrowPooled   Grow of a fresh slot; the handle comes from a pool filled
//                   at Create (prealloc_handles), so the work is one Map.
//                   Raw baseline: Map.
//      GrowCreate   Grow of a fresh slot in a cache with an empty pool: one
//                   Create + one Map. Raw baseline: Create + Map.
//      Reuse        AllocSlot(hint) + Grow on a slot freed with its memory
//                   still mapped (deferred reclamation): zero backend calls
//                   expected. Raw baseline: Map (what an allocator without
//                   deferral pays at least).
//      Reclaim      The budget is full of idle slots (4 slots of one extent
//                   each, made anew and untimed before every iteration); a
//                   slot reused by AllocSlot grows by one extent, so the Grow
//                   must take one idle extent back (Unmap) and map it into the
//                   growing slot (Map). Raw baseline: Unmap + Map of one
//                   handle.
//    The raw baseline of each Lib benchmark is measured INSIDE the same
//    benchmark function, interleaved iteration by iteration with the library
//    call (raw call, then library call, every iteration), so both see the
//    same machine load and the same backend state. ratio_vs_raw is the
//    library's median over the raw median; overhead_us their difference.
//    Driver (backend) calls per operation are read from KVCache::Stats().
//  * Policy/<backend>/max_extent:<MiB>: bytes per second of KV memory made
//    available per extent-size policy. <policy_slots> slots decode-grow from
//    0 to <policy_tokens> tokens, one token per Grow, round-robin (extents
//    double from 2 MiB up to max_extent; max_extent 2 MiB is fixed pages).
//    "cold": every handle is created on demand (Create + Map); "warm": the
//    same growth again after the slots were freed without deferral, so every
//    handle comes from the pool (Map only). Reported: GB/s of mapped memory
//    made available, backend calls per 1000 tokens, waste at the end.
//
// Backends: host (mmap + memfd on this CPU), latency (the latency-model
// wrapper over host charging LatencyCosts::H200(): a MODEL of an H200's
// driver costs, not a GPU), cuda (device 0; skipped with the reason where no
// driver or device exists). Memory is never touched, so the Host backend's
// memfd stays sparse and uses no RAM.
//
// After Google Benchmark's own output, a summary table (one row per Lib and
// Policy benchmark, with the ratio column) is printed on stdout.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_split.h"
#include "benchmark/benchmark.h"
#include "fmt/core.h"
#include "vattn/vattn.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::size_t kMiB = std::size_t{1} << 20;
const int kSizesMiB[] = {2, 8, 32, 128, 256};

struct Flags {
  std::vector<std::string> backends = {"host", "latency"};
  int iters = 500;
  int policy_slots = 8;
  std::int64_t policy_tokens = 3000;
  int policy_iters = 5;
  bool summary = true;
};
Flags g_flags;

// ---- Backends ---------------------------------------------------------------
// One backend per name for the whole run (a CUDA context is slow to make).
struct BackendEntry {
  std::shared_ptr<vattn::Backend> backend;
  std::string why;  // Why it is unavailable.
};
std::map<std::string, BackendEntry> g_backends;

BackendEntry MakeBackendEntry(const std::string& name) {
  BackendEntry e;
  if (name == "cuda") {
    auto b = vattn::MakeCudaBackend(0);
    if (!b.ok()) {
      e.why = std::string(b.status().message());
    } else {
      e.backend = *b;
    }
    return e;
  }
  if (name != "host" && name != "latency") {
    e.why = "unknown backend '" + name + "' (host, latency, cuda)";
    return e;
  }
  // Memory is never touched, so the memfd stays sparse: allow more handles
  // than this machine has RAM.
  vattn::HostBackendOptions host_opts;
  host_opts.physical_limit_bytes = std::size_t{1} << 40;
  auto host = vattn::MakeHostBackend(host_opts);
  if (!host.ok()) {
    e.why = std::string(host.status().message());
    return e;
  }
  if (name == "host") {
    e.backend = *host;
    return e;
  }
  auto latency =
      vattn::MakeLatencyModelBackend(*host, vattn::LatencyCosts::H200());
  if (!latency.ok()) {
    e.why = std::string(latency.status().message());
  } else {
    e.backend = *latency;
  }
  return e;
}

// The backend for `name`, or nullptr after SkipWithError with the reason.
vattn::Backend* GetBackend(benchmark::State& state, const std::string& name) {
  auto it = g_backends.find(name);
  if (it == g_backends.end()) {
    it = g_backends.emplace(name, MakeBackendEntry(name)).first;
  }
  if (it->second.backend == nullptr) {
    state.SkipWithError(("backend unavailable: " + it->second.why).c_str());
    return nullptr;
  }
  return it->second.backend.get();
}

std::shared_ptr<vattn::Backend> SharedBackend(const std::string& name) {
  return g_backends.at(name).backend;
}

// ---- Helpers ----------------------------------------------------------------
double Micros(Clock::time_point t0, Clock::time_point t1) {
  return std::chrono::duration<double, std::micro>(t1 - t0).count();
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double Mean(const std::vector<double>& v) {
  if (v.empty()) return 0;
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

// Reports a failed call and stops the benchmark. True when `s` is OK.
bool Ok(benchmark::State& state, const absl::Status& s, const char* what) {
  if (s.ok()) return true;
  state.SkipWithError(fmt::format("{}: {}", what, s.ToString()).c_str());
  return false;
}

// Backend calls a cache made between two snapshots.
struct CallDelta {
  std::int64_t create = 0, map = 0, unmap = 0, destroy = 0, reclaimed = 0,
               reuse = 0;
  void Add(const vattn::CacheStats& a, const vattn::CacheStats& b) {
    create += b.create_calls - a.create_calls;
    map += b.map_calls - a.map_calls;
    unmap += b.unmap_calls - a.unmap_calls;
    destroy += b.destroy_calls - a.destroy_calls;
    reclaimed += b.reclaimed_extents - a.reclaimed_extents;
    reuse += b.reuse_hits - a.reuse_hits;
  }
  std::int64_t total() const { return create + map + unmap + destroy; }
};

// One line of the summary table.
struct SummaryRow {
  std::string group;  // "lib" or "policy".
  std::string backend;
  std::string what;
  int mib = 0;
  double raw_p50_us = 0;
  double lib_p50_us = 0;
  double ratio = 0;
  double calls_per_op = 0;
  std::string calls;  // Breakdown, e.g. "create 0 map 1".
  // Policy rows.
  double cold_gbps = 0, warm_gbps = 0, cold_calls_per_1k = 0,
         warm_calls_per_1k = 0, waste_mib_per_slot = 0, extents_per_slot = 0;
};
std::vector<SummaryRow> g_summary;

// Llama-3-8B (32 layers, 8 KV heads, dim 128, fp16), token-major: 128 KiB
// per token, so one extent of S MiB backs S * 8 tokens.
vattn::KVCacheOptions Llama8BOptions() {
  vattn::KVCacheOptions o;
  o.num_layers = 32;
  o.num_kv_heads = 8;
  o.head_dim = 128;
  o.dtype = vattn::DType::kFloat16;
  o.layout = vattn::Layout::kTokenMajor;
  o.map_ahead_tokens = 0;  // Everything on the caller's thread.
  return o;
}
constexpr std::int64_t kLlama8BTokenBytes = 32 * 2 * 8 * 128 * 2;

std::int64_t TokensFor(std::size_t bytes) {
  return static_cast<std::int64_t>(bytes) / kLlama8BTokenBytes;
}

void ReportLatency(benchmark::State& state, const std::vector<double>& us) {
  state.counters["p50_us"] = Median(us);
  state.counters["mean_us"] = Mean(us);
}

// ---- Raw backend calls ------------------------------------------------------
enum class RawOp { kCreate, kMap, kUnmap, kDestroy };

void BM_Raw(benchmark::State& state, std::string backend_name, RawOp op,
            int mib) {
  vattn::Backend* b = GetBackend(state, backend_name);
  if (b == nullptr) {
    for (auto _ : state) {
    }
    return;
  }
  const std::size_t bytes = static_cast<std::size_t>(mib) * kMiB;
  vattn::DevicePtr va = 0;
  vattn::PhysicalHandle mapped_handle = vattn::kInvalidHandle;
  if (op == RawOp::kMap || op == RawOp::kUnmap) {
    auto r = b->Reserve(bytes);
    if (!Ok(state, r.status(), "Reserve")) return;
    va = *r;
    auto h = b->Create(bytes);
    if (!Ok(state, h.status(), "Create")) return;
    mapped_handle = *h;
  }
  std::vector<double> us;
  us.reserve(static_cast<std::size_t>(g_flags.iters));
  for (auto _ : state) {
    double t = 0;
    absl::Status s;
    switch (op) {
      case RawOp::kCreate: {
        const auto t0 = Clock::now();
        auto h = b->Create(bytes);
        t = Micros(t0, Clock::now());
        s = h.status();
        if (h.ok()) s = b->Destroy(*h);
        break;
      }
      case RawOp::kMap: {
        const auto t0 = Clock::now();
        s = b->Map(va, mapped_handle);
        t = Micros(t0, Clock::now());
        if (s.ok()) s = b->Unmap(va, bytes);
        break;
      }
      case RawOp::kUnmap: {
        s = b->Map(va, mapped_handle);
        if (!s.ok()) break;
        const auto t0 = Clock::now();
        s = b->Unmap(va, bytes);
        t = Micros(t0, Clock::now());
        break;
      }
      case RawOp::kDestroy: {
        auto h = b->Create(bytes);
        s = h.status();
        if (!h.ok()) break;
        const auto t0 = Clock::now();
        s = b->Destroy(*h);
        t = Micros(t0, Clock::now());
        break;
      }
    }
    if (!Ok(state, s, "raw call")) break;
    us.push_back(t);
    state.SetIterationTime(t / 1e6);
  }
  if (mapped_handle != vattn::kInvalidHandle) (void)b->Destroy(mapped_handle);
  if (va != 0) (void)b->Release(va, bytes);
  ReportLatency(state, us);
  state.counters["MiB"] = mib;
}

// ---- Library paths ----------------------------------------------------------
enum class LibPath { kGrowPooled, kGrowCreate, kReuse, kReclaim };

const char* LibPathName(LibPath p) {
  switch (p) {
    case LibPath::kGrowPooled:
      return "GrowPooled";
    case LibPath::kGrowCreate:
      return "GrowCreate";
    case LibPath::kReuse:
      return "Reuse";
    case LibPath::kReclaim:
      return "Reclaim";
  }
  return "?";
}

const char* LibBaselineName(LibPath p) {
  switch (p) {
    case LibPath::kGrowPooled:
    case LibPath::kReuse:
      return "map";
    case LibPath::kGrowCreate:
      return "create+map";
    case LibPath::kReclaim:
      return "unmap+map";
  }
  return "?";
}

// The raw baseline, kept ready between iterations: a reservation of two
// extents and one handle (mapped at va[cur] for the unmap+map baseline).
struct RawBaseline {
  vattn::Backend* b = nullptr;
  std::size_t bytes = 0;
  vattn::DevicePtr va = 0;
  vattn::PhysicalHandle h = vattn::kInvalidHandle;
  int cur = 0;
  bool mapped = false;

  absl::Status Init(vattn::Backend* backend, std::size_t extent_bytes,
                    LibPath path) {
    b = backend;
    bytes = extent_bytes;
    auto r = b->Reserve(2 * bytes);
    if (!r.ok()) return r.status();
    va = *r;
    if (path == LibPath::kGrowCreate) return absl::OkStatus();
    auto handle = b->Create(bytes);
    if (!handle.ok()) return handle.status();
    h = *handle;
    if (path == LibPath::kReclaim) {
      VATTN_RETURN_IF_ERROR(b->Map(va, h));
      mapped = true;
    }
    return absl::OkStatus();
  }
  vattn::DevicePtr At(int i) const {
    return va + static_cast<vattn::DevicePtr>(i) * bytes;
  }
  // Times the raw call(s) of `path`; teardown is outside the timed region.
  absl::Status Once(LibPath path, double* us) {
    switch (path) {
      case LibPath::kGrowPooled:
      case LibPath::kReuse: {
        const auto t0 = Clock::now();
        absl::Status s = b->Map(va, h);
        *us = Micros(t0, Clock::now());
        VATTN_RETURN_IF_ERROR(s);
        return b->Unmap(va, bytes);
      }
      case LibPath::kGrowCreate: {
        const auto t0 = Clock::now();
        auto handle = b->Create(bytes);
        absl::Status s = handle.status();
        if (s.ok()) s = b->Map(va, *handle);
        *us = Micros(t0, Clock::now());
        VATTN_RETURN_IF_ERROR(s);
        VATTN_RETURN_IF_ERROR(b->Unmap(va, bytes));
        return b->Destroy(*handle);
      }
      case LibPath::kReclaim: {
        // Move the handle from one address to the other: what reclamation
        // does with an idle slot's extent.
        const auto t0 = Clock::now();
        absl::Status s = b->Unmap(At(cur), bytes);
        if (s.ok()) s = b->Map(At(1 - cur), h);
        *us = Micros(t0, Clock::now());
        VATTN_RETURN_IF_ERROR(s);
        cur = 1 - cur;
        return absl::OkStatus();
      }
    }
    return absl::OkStatus();
  }
  ~RawBaseline() {
    if (b == nullptr) return;
    if (mapped) (void)b->Unmap(At(cur), bytes);
    if (h != vattn::kInvalidHandle) (void)b->Destroy(h);
    if (va != 0) (void)b->Release(va, 2 * bytes);
  }
};

// Idle slots that fill the budget in the Reclaim benchmark.
constexpr int kReclaimIdleSlots = 4;

void BM_Lib(benchmark::State& state, std::string backend_name, LibPath path,
            int mib) {
  vattn::Backend* b = GetBackend(state, backend_name);
  if (b == nullptr) {
    for (auto _ : state) {
    }
    return;
  }
  const std::shared_ptr<vattn::Backend> backend = SharedBackend(backend_name);
  const std::size_t bytes = static_cast<std::size_t>(mib) * kMiB;
  const std::int64_t tokens = TokensFor(bytes);

  vattn::KVCacheOptions opts = Llama8BOptions();
  opts.max_slots = 4;
  opts.max_tokens = tokens;
  opts.max_extent_bytes = bytes;
  switch (path) {
    case LibPath::kGrowPooled:
      opts.prealloc_handles = 1;
      opts.prealloc_handle_bytes = bytes;
      opts.defer_reclaim = false;  // Free puts the handle back in the pool.
      break;
    case LibPath::kGrowCreate:
      break;  // A new cache (empty pool) per iteration, made untimed.
    case LibPath::kReuse:
      opts.defer_reclaim = true;
      break;
    case LibPath::kReclaim:
      // Every extent is exactly `bytes`; the budget holds kReclaimIdleSlots
      // of them; a slot may grow to hold all of them.
      opts.max_slots = kReclaimIdleSlots;
      opts.max_tokens = tokens * kReclaimIdleSlots;
      opts.min_extent_bytes = bytes;
      opts.memory_budget_bytes = bytes * kReclaimIdleSlots;
      opts.defer_reclaim = true;
      break;
  }

  RawBaseline raw;
  if (!Ok(state, raw.Init(b, bytes, path), "raw baseline setup")) return;

  std::unique_ptr<vattn::KVCache> cache;
  auto make_cache = [&]() -> absl::Status {
    cache.reset();
    auto c = vattn::KVCache::Create(opts, backend);
    if (!c.ok()) return c.status();
    cache = std::move(*c);
    return absl::OkStatus();
  };
  // Reclaim: a new cache whose budget is full of idle slots, each holding
  // one extent (made untimed before every iteration, so every iteration
  // starts from the same state).
  auto fill_idle = [&]() -> absl::Status {
    VATTN_RETURN_IF_ERROR(make_cache());
    std::vector<int> slots;
    for (int i = 0; i < kReclaimIdleSlots; ++i) {
      VATTN_ASSIGN_OR_RETURN(int slot, cache->AllocSlot(0));
      VATTN_RETURN_IF_ERROR(cache->Grow(slot, tokens));
      slots.push_back(slot);
    }
    for (int slot : slots) VATTN_RETURN_IF_ERROR(cache->Free(slot));
    return absl::OkStatus();
  };
  if (path == LibPath::kGrowPooled || path == LibPath::kReuse) {
    if (!Ok(state, make_cache(), "KVCache::Create")) return;
  }
  if (path == LibPath::kReuse) {
    auto slot = cache->AllocSlot(tokens);
    if (!Ok(state, slot.status(), "AllocSlot")) return;
    if (!Ok(state, cache->Grow(*slot, tokens), "Grow")) return;
    if (!Ok(state, cache->Free(*slot), "Free")) return;
  }

  std::vector<double> raw_us, lib_us;
  raw_us.reserve(static_cast<std::size_t>(g_flags.iters));
  lib_us.reserve(static_cast<std::size_t>(g_flags.iters));
  CallDelta calls;
  std::int64_t unexpected = 0;  // Iterations whose calls were not the plan.
  for (auto _ : state) {
    double r_us = 0;
    if (!Ok(state, raw.Once(path, &r_us), "raw baseline")) break;
    raw_us.push_back(r_us);

    if (path == LibPath::kGrowCreate &&
        !Ok(state, make_cache(), "KVCache::Create")) {
      break;
    }
    if (path == LibPath::kReclaim &&
        !Ok(state, fill_idle(), "filling the budget with idle slots")) {
      break;
    }
    double l_us = 0;
    int slot = -1;
    vattn::CacheStats before, after;
    absl::Status s;
    if (path == LibPath::kReuse) {
      before = cache->Stats();
      const auto t0 = Clock::now();
      auto got = cache->AllocSlot(tokens);
      s = got.status();
      if (got.ok()) {
        slot = *got;
        s = cache->Grow(slot, tokens);
      }
      l_us = Micros(t0, Clock::now());
      after = cache->Stats();
    } else {
      auto got = cache->AllocSlot(path == LibPath::kReclaim ? tokens : 0);
      if (!Ok(state, got.status(), "AllocSlot")) break;
      slot = *got;
      std::int64_t target = tokens;
      if (path == LibPath::kReclaim) {
        auto info = cache->GetSlot(slot);
        if (!Ok(state, info.status(), "GetSlot")) break;
        // One more extent of exactly `bytes`: the Grow's minimum equals the
        // extent size, so the reclaimed handle is reused as it is.
        target = info->backed_tokens + tokens;
      }
      before = cache->Stats();
      const auto t0 = Clock::now();
      s = cache->Grow(slot, target);
      l_us = Micros(t0, Clock::now());
      after = cache->Stats();
    }
    if (!Ok(state, s, "library path")) break;
    CallDelta one;
    one.Add(before, after);
    calls.Add(before, after);
    switch (path) {
      case LibPath::kGrowPooled:
        unexpected += (one.create != 0 || one.map != 1 || one.total() != 1);
        break;
      case LibPath::kGrowCreate:
        unexpected += (one.create != 1 || one.map != 1 || one.total() != 2);
        break;
      case LibPath::kReuse:
        unexpected += (one.total() != 0 || one.reuse != 1);
        break;
      case LibPath::kReclaim:
        unexpected += (one.unmap != 1 || one.map != 1 || one.total() != 2 ||
                       one.reclaimed != 1);
        break;
    }
    lib_us.push_back(l_us);
    state.SetIterationTime(l_us / 1e6);
    // Teardown, untimed.
    if (path == LibPath::kGrowCreate || path == LibPath::kReclaim) {
      cache.reset();
    } else if (!Ok(state, cache->Free(slot), "Free")) {
      break;
    }
  }
  cache.reset();
  const double n = static_cast<double>(std::max<std::size_t>(1, lib_us.size()));
  const double raw_p50 = Median(raw_us);
  const double lib_p50 = Median(lib_us);
  state.counters["MiB"] = mib;
  state.counters["lib_p50_us"] = lib_p50;
  state.counters["raw_p50_us"] = raw_p50;
  state.counters["ratio_vs_raw"] = raw_p50 > 0 ? lib_p50 / raw_p50 : 0;
  state.counters["overhead_us"] = lib_p50 - raw_p50;
  state.counters["creates_per_op"] = static_cast<double>(calls.create) / n;
  state.counters["maps_per_op"] = static_cast<double>(calls.map) / n;
  state.counters["unmaps_per_op"] = static_cast<double>(calls.unmap) / n;
  state.counters["destroys_per_op"] = static_cast<double>(calls.destroy) / n;
  state.counters["driver_calls_per_op"] =
      static_cast<double>(calls.total()) / n;
  state.counters["unexpected_iters"] = static_cast<double>(unexpected);

  SummaryRow row;
  row.group = "lib";
  row.backend = backend_name;
  row.what = fmt::format("{} (vs {})", LibPathName(path),
                         LibBaselineName(path));
  row.mib = mib;
  row.raw_p50_us = raw_p50;
  row.lib_p50_us = lib_p50;
  row.ratio = raw_p50 > 0 ? lib_p50 / raw_p50 : 0;
  row.calls_per_op = static_cast<double>(calls.total()) / n;
  row.calls = fmt::format("c{:.0f} m{:.0f} u{:.0f} d{:.0f}{}",
                          static_cast<double>(calls.create) / n,
                          static_cast<double>(calls.map) / n,
                          static_cast<double>(calls.unmap) / n,
                          static_cast<double>(calls.destroy) / n,
                          unexpected > 0
                              ? fmt::format(" ({} odd)", unexpected)
                              : std::string());
  g_summary.push_back(row);
}

// ---- Bytes per second per extent-size policy -------------------------------
void BM_Policy(benchmark::State& state, std::string backend_name,
               int max_extent_mib) {
  vattn::Backend* b = GetBackend(state, backend_name);
  if (b == nullptr) {
    for (auto _ : state) {
    }
    return;
  }
  const std::shared_ptr<vattn::Backend> backend = SharedBackend(backend_name);
  vattn::KVCacheOptions opts = Llama8BOptions();
  opts.max_slots = g_flags.policy_slots;
  opts.max_tokens = g_flags.policy_tokens;
  opts.min_extent_bytes = 0;  // One granule (2 MiB).
  opts.max_extent_bytes = static_cast<std::size_t>(max_extent_mib) * kMiB;
  opts.defer_reclaim = false;  // Free returns every handle to the pool.
  const int nslots = g_flags.policy_slots;
  const std::int64_t ntok = g_flags.policy_tokens;
  const double tokens_total =
      static_cast<double>(nslots) * static_cast<double>(ntok);

  std::vector<double> cold_gbps, warm_gbps;
  CallDelta cold_calls, warm_calls;
  double waste_mib = 0, extents = 0;
  int runs = 0;
  for (auto _ : state) {
    auto c = vattn::KVCache::Create(opts, backend);
    if (!Ok(state, c.status(), "KVCache::Create")) break;
    vattn::KVCache& cache = **c;
    bool ok = true;
    double cold_s = 0;
    for (int pass = 0; pass < 2 && ok; ++pass) {
      std::vector<int> slots;
      for (int i = 0; i < nslots && ok; ++i) {
        auto slot = cache.AllocSlot(0);
        ok = Ok(state, slot.status(), "AllocSlot");
        if (ok) slots.push_back(*slot);
      }
      if (!ok) break;
      const vattn::CacheStats before = cache.Stats();
      const auto t0 = Clock::now();
      for (std::int64_t t = 1; t <= ntok && ok; ++t) {
        for (int slot : slots) {
          absl::Status s = cache.Grow(slot, t);
          if (!s.ok()) {
            ok = Ok(state, s, "Grow");
            break;
          }
        }
      }
      const double secs = Micros(t0, Clock::now()) / 1e6;
      const vattn::CacheStats after = cache.Stats();
      if (!ok) break;
      const double gbps =
          static_cast<double>(after.mapped_bytes - before.mapped_bytes) /
          secs / 1e9;
      if (pass == 0) {
        cold_s = secs;
        cold_gbps.push_back(gbps);
        cold_calls.Add(before, after);
        waste_mib += static_cast<double>(after.mapped_bytes -
                                         after.logical_bytes) /
                     static_cast<double>(kMiB) / nslots;
        extents += static_cast<double>(after.extents_mapped -
                                       before.extents_mapped) /
                   nslots;
      } else {
        warm_gbps.push_back(gbps);
        warm_calls.Add(before, after);
      }
      for (int slot : slots) {
        if (!Ok(state, cache.Free(slot), "Free")) {
          ok = false;
          break;
        }
      }
    }
    if (!ok) break;
    ++runs;
    state.SetIterationTime(cold_s);
  }
  const double r = std::max(1, runs);
  const double per_1k = 1000.0 / tokens_total / r;
  state.counters["cold_GBps"] = Median(cold_gbps);
  state.counters["warm_GBps"] = Median(warm_gbps);
  state.counters["cold_calls_per_1k_tok"] =
      static_cast<double>(cold_calls.total()) * per_1k;
  state.counters["warm_calls_per_1k_tok"] =
      static_cast<double>(warm_calls.total()) * per_1k;
  state.counters["extents_per_slot"] = extents / r;
  state.counters["waste_MiB_per_slot"] = waste_mib / r;

  SummaryRow row;
  row.group = "policy";
  row.backend = backend_name;
  row.what = max_extent_mib == 2 ? "fixed 2 MiB pages"
                                 : fmt::format("extents 2..{} MiB",
                                               max_extent_mib);
  row.mib = max_extent_mib;
  row.cold_gbps = Median(cold_gbps);
  row.warm_gbps = Median(warm_gbps);
  row.cold_calls_per_1k = static_cast<double>(cold_calls.total()) * per_1k;
  row.warm_calls_per_1k = static_cast<double>(warm_calls.total()) * per_1k;
  row.waste_mib_per_slot = waste_mib / r;
  row.extents_per_slot = extents / r;
  g_summary.push_back(row);
}

void PrintSummary() {
  bool header = false;
  for (const SummaryRow& r : g_summary) {
    if (r.group != "lib") continue;
    if (!header) {
      std::printf(
          "\nLibrary path vs raw backend calls (medians, us; raw measured "
          "interleaved in the same benchmark)\n");
      std::printf("%-8s %-26s %5s %10s %10s %7s %9s  %s\n", "backend",
                  "path (baseline)", "MiB", "raw_us", "lib_us", "ratio",
                  "calls/op", "create/map/unmap/destroy per op");
      header = true;
    }
    std::printf("%-8s %-26s %5d %10.2f %10.2f %7.3f %9.2f  %s\n",
                r.backend.c_str(), r.what.c_str(), r.mib, r.raw_p50_us,
                r.lib_p50_us, r.ratio, r.calls_per_op, r.calls.c_str());
  }
  header = false;
  for (const SummaryRow& r : g_summary) {
    if (r.group != "policy") continue;
    if (!header) {
      std::printf(
          "\nKV memory made available per extent policy (%d slots x %lld "
          "tokens, Llama-3-8B token-major; cold = Create+Map, warm = pooled "
          "handles, Map only)\n",
          g_flags.policy_slots, static_cast<long long>(g_flags.policy_tokens));
      std::printf("%-8s %-20s %10s %10s %14s %14s %9s %11s\n", "backend",
                  "policy", "cold_GB/s", "warm_GB/s", "cold_calls/1k",
                  "warm_calls/1k", "extents", "waste_MiB");
      header = true;
    }
    std::printf("%-8s %-20s %10.2f %10.2f %14.2f %14.2f %9.1f %11.1f\n",
                r.backend.c_str(), r.what.c_str(), r.cold_gbps, r.warm_gbps,
                r.cold_calls_per_1k, r.warm_calls_per_1k, r.extents_per_slot,
                r.waste_mib_per_slot);
  }
}

bool ParseFlag(const char* arg, const char* name, std::string* value) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *value = arg + n + 1;
  return true;
}

// Comma-separated flag values, empty items dropped.
std::vector<std::string> SplitCommas(const std::string& v) {
  return absl::StrSplit(v, ',', absl::SkipEmpty());
}

void PrintHelp() {
  std::printf(
      "map_bench: the map path against the floor (raw backend calls) in the "
      "same run\n"
      "\n"
      "  --backends=LIST     comma list of host, latency, cuda (default "
      "host,latency)\n"
      "                      host: mmap + memfd on this CPU; latency: "
      "LatencyCosts::H200() charged\n"
      "                      over host (a model of H200 driver costs, not a "
      "GPU); cuda: device 0\n"
      "                      (skipped with the reason where unavailable)\n"
      "  --iters=N           iterations of every Raw and Lib benchmark "
      "(default %d)\n"
      "  --policy_slots=N    slots grown in the Policy benchmarks (default "
      "%d)\n"
      "  --policy_tokens=N   tokens each slot grows to, one Grow per token "
      "(default %lld)\n"
      "  --policy_iters=N    repetitions of each Policy benchmark (default "
      "%d)\n"
      "  --summary=false     do not print the summary tables after the run\n"
      "  --help              this text\n"
      "  plus Google Benchmark's flags: --benchmark_filter=REGEX,\n"
      "  --benchmark_out=FILE --benchmark_out_format=json, "
      "--benchmark_format=json|console|csv, ...\n"
      "\n"
      "Benchmarks: Raw/{Create,Map,Unmap,Destroy}/<backend>/<MiB>, "
      "Lib/{GrowPooled,GrowCreate,Reuse,Reclaim}/<backend>/<MiB>\n"
      "(each with ratio_vs_raw = library median / raw median, raw measured "
      "interleaved in the\n"
      "same benchmark), Policy/<backend>/max_extent:<MiB> (GB/s made "
      "available, calls per 1000 tokens).\n",
      g_flags.iters, g_flags.policy_slots,
      static_cast<long long>(g_flags.policy_tokens), g_flags.policy_iters);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> rest;
  rest.push_back(argv[0]);
  for (int i = 1; i < argc; ++i) {
    std::string v;
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      PrintHelp();
      return 0;
    } else if (ParseFlag(argv[i], "--backends", &v)) {
      g_flags.backends = SplitCommas(v);
    } else if (ParseFlag(argv[i], "--iters", &v)) {
      g_flags.iters = std::max(1, std::stoi(v));
    } else if (ParseFlag(argv[i], "--policy_slots", &v)) {
      g_flags.policy_slots = std::max(1, std::stoi(v));
    } else if (ParseFlag(argv[i], "--policy_tokens", &v)) {
      g_flags.policy_tokens = std::max<std::int64_t>(1, std::stoll(v));
    } else if (ParseFlag(argv[i], "--policy_iters", &v)) {
      g_flags.policy_iters = std::max(1, std::stoi(v));
    } else if (ParseFlag(argv[i], "--summary", &v)) {
      g_flags.summary = !(v == "false" || v == "0" || v == "no");
    } else {
      rest.push_back(argv[i]);
    }
  }
  const std::pair<RawOp, const char*> raw_ops[] = {
      {RawOp::kCreate, "Create"},
      {RawOp::kMap, "Map"},
      {RawOp::kUnmap, "Unmap"},
      {RawOp::kDestroy, "Destroy"}};
  const LibPath lib_paths[] = {LibPath::kGrowPooled, LibPath::kGrowCreate,
                               LibPath::kReuse, LibPath::kReclaim};
  for (const std::string& backend : g_flags.backends) {
    for (const auto& [op, name] : raw_ops) {
      for (int mib : kSizesMiB) {
        benchmark::RegisterBenchmark(
            fmt::format("Raw/{}/{}/{}", name, backend, mib).c_str(), BM_Raw,
            backend, op, mib)
            ->Iterations(g_flags.iters)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
    }
    for (LibPath path : lib_paths) {
      for (int mib : kSizesMiB) {
        benchmark::RegisterBenchmark(
            fmt::format("Lib/{}/{}/{}", LibPathName(path), backend, mib)
                .c_str(),
            BM_Lib, backend, path, mib)
            ->Iterations(g_flags.iters)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
    }
    for (int max_extent_mib : {2, 8, 32, 128}) {
      benchmark::RegisterBenchmark(
          fmt::format("Policy/{}/max_extent:{}", backend, max_extent_mib)
              .c_str(),
          BM_Policy, backend, max_extent_mib)
          ->Iterations(g_flags.policy_iters)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::fflush(stdout);
  if (g_flags.summary) PrintSummary();
  g_backends.clear();
  return 0;
}
