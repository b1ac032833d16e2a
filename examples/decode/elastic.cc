// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "elastic.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <random>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vattn/arbiter_telemetry.h"

namespace vdecode {

const char* MemoryModeName(MemoryMode mode) {
  return mode == MemoryMode::kArbiter ? "arbiter" : "static split";
}

std::int64_t ElasticResult::Completed() const {
  std::int64_t n = 0;
  for (const ElasticModelResult& m : models) n += m.completed;
  return n;
}

std::int64_t ElasticResult::CompletedInBound() const {
  std::int64_t n = 0;
  for (const ElasticModelResult& m : models) n += m.completed_in_bound;
  return n;
}

std::vector<ElasticRequest> ElasticWorkload(const ElasticConfig& config) {
  std::vector<ElasticRequest> out;
  const int n = static_cast<int>(config.models.size());
  if (n == 0 || config.burst_s <= 0 || config.duration_s <= 0) return out;
  for (int m = 0; m < n; ++m) {
    const ElasticModel& model = config.models[static_cast<std::size_t>(m)];
    std::mt19937_64 rng(std::uint64_t{config.seed} * 1000003u +
                        static_cast<std::uint64_t>(m));
    std::uniform_int_distribution<std::int64_t> prompt(model.prompt_min,
                                                       model.prompt_max);
    std::uniform_int_distribution<std::int64_t> output(model.output_min,
                                                       model.output_max);
    // Piecewise-constant rate, one piece per burst window; the exponential
    // gaps restart at each window's start (memoryless, so this is exact).
    for (int w = 0; w * config.burst_s < config.duration_s; ++w) {
      const double start = w * config.burst_s;
      const double end = std::min(config.duration_s, start + config.burst_s);
      const double rate = w % n == m ? model.burst_rate : model.quiet_rate;
      if (rate <= 0) continue;
      std::exponential_distribution<double> gap(rate);
      for (double t = start + gap(rng); t < end; t += gap(rng)) {
        out.push_back({m, t * 1e3, prompt(rng), output(rng)});
      }
    }
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const ElasticRequest& a, const ElasticRequest& b) {
                     return a.arrival_ms < b.arrival_ms;
                   });
  return out;
}

namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

vattn::DType ToVattn(DType t) {
  switch (t) {
    case DType::kF16: return vattn::DType::kFloat16;
    case DType::kBF16: return vattn::DType::kBFloat16;
    case DType::kF32: return vattn::DType::kFloat32;
  }
  return vattn::DType::kFloat16;
}

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const std::size_t lo = static_cast<std::size_t>(std::floor(pos));
  const std::size_t hi = std::min(v.size() - 1, lo + 1);
  const double frac = pos - static_cast<double>(lo);
  return v[lo] * (1 - frac) + v[hi] * frac;
}

struct Waiting {
  int request = 0;
  std::int64_t prompt = 0;  // Tokens to prefill (grows on preemption).
  std::int64_t left = 0;    // Tokens still to produce.
  bool had_first = false;   // Preempted after its first token.
};

struct Running {
  int request = 0;
  int slot = 0;
  std::int64_t length = 0;
  std::int64_t left = 0;  // Tokens still to produce.
  std::int64_t admitted_tick = 0;
};

struct ModelState {
  std::unique_ptr<vattn::KVCache> cache;
  std::deque<Waiting> queue;
  std::vector<Running> running;  // In admission order.
  std::vector<double> ttft_ms;   // Per admitted request (first admission).
  ElasticModelResult result;
};

absl::Status Validate(const ElasticConfig& c) {
  if (c.models.empty()) return absl::InvalidArgumentError("no model given");
  if (c.backend == nullptr) return absl::InvalidArgumentError("backend is null");
  if (!(c.step_ms > 0) || !(c.duration_s > 0) || !(c.burst_s > 0) ||
      !(c.ttft_bound_ms > 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "step_ms (%g), duration_s (%g), burst_s (%g) and ttft_bound_ms (%g) "
        "must be positive",
        c.step_ms, c.duration_s, c.burst_s, c.ttft_bound_ms));
  }
  if (c.budget_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("budget_bytes must be positive, got ", c.budget_bytes));
  }
  for (std::size_t i = 0; i < c.models.size(); ++i) {
    const ElasticModel& m = c.models[i];
    if (m.prompt_min < 1 || m.prompt_max < m.prompt_min || m.output_min < 1 ||
        m.output_max < m.output_min ||
        m.prompt_max + m.output_max > m.max_tokens || m.max_slots < 1 ||
        !(m.burst_rate >= 0) || !(m.quiet_rate >= 0)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "model %d (%s): want 1 <= prompt %d:%d, 1 <= output %d:%d, "
          "prompt_max + output_max <= max_tokens %d, max_slots %d >= 1, "
          "rates %g and %g >= 0",
          i, m.shape.name, m.prompt_min, m.prompt_max, m.output_min,
          m.output_max, m.max_tokens, m.max_slots, m.burst_rate,
          m.quiet_rate));
    }
  }
  return absl::OkStatus();
}

vattn::KVCacheOptions CacheOptions(const ElasticConfig& c,
                                   const ElasticModel& m) {
  vattn::KVCacheOptions o;
  o.num_layers = m.shape.layers;
  o.num_kv_heads = m.shape.kv_heads;
  o.head_dim = m.shape.head_dim;
  o.dtype = ToVattn(m.shape.dtype);
  o.max_slots = m.max_slots;
  o.max_tokens = m.max_tokens;
  o.map_ahead_tokens = c.map_ahead_tokens;
  return o;
}

bool IsOutOfMemory(const absl::Status& s) {
  return absl::IsResourceExhausted(s);
}

}  // namespace

absl::StatusOr<ElasticResult> RunElastic(const ElasticConfig& config) {
  VATTN_RETURN_IF_ERROR(Validate(config));
  const std::vector<ElasticRequest> requests = ElasticWorkload(config);
  const int n = static_cast<int>(config.models.size());
  const std::int64_t granule =
      static_cast<std::int64_t>(config.backend->granularity());

  ElasticResult out;
  out.mode = config.mode;
  out.budget_bytes = config.budget_bytes;
  out.ttft_bound_ms = config.ttft_bound_ms;
  out.burst_s = config.burst_s;

  // Declared before the caches: they are destroyed first (each holds a
  // reference anyway).
  std::shared_ptr<vattn::MemoryArbiter> arbiter;
  std::vector<ModelState> models(static_cast<std::size_t>(n));
  if (config.mode == MemoryMode::kStaticSplit) {
    const std::int64_t share = config.budget_bytes / n / granule * granule;
    if (share <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "budget_bytes ", config.budget_bytes, " is below one granule (",
          granule, ") per model"));
    }
    for (int m = 0; m < n; ++m) {
      vattn::KVCacheOptions o =
          CacheOptions(config, config.models[static_cast<std::size_t>(m)]);
      o.memory_budget_bytes = static_cast<std::size_t>(share);
      VATTN_ASSIGN_OR_RETURN(models[static_cast<std::size_t>(m)].cache,
                             vattn::KVCache::Create(o, config.backend));
    }
  } else {
    VATTN_ASSIGN_OR_RETURN(
        arbiter, vattn::MemoryArbiter::Create(
                     config.backend, static_cast<std::size_t>(config.budget_bytes)));
    for (int m = 0; m < n; ++m) {
      const ElasticModel& model = config.models[static_cast<std::size_t>(m)];
      vattn::KVCacheOptions o = CacheOptions(config, model);
      o.arbiter = arbiter;
      o.arbiter_name = absl::StrCat(m, ":", model.shape.name);
      VATTN_ASSIGN_OR_RETURN(models[static_cast<std::size_t>(m)].cache,
                             vattn::KVCache::Create(o, config.backend));
    }
  }
  for (int m = 0; m < n; ++m) {
    models[static_cast<std::size_t>(m)].result.name =
        config.models[static_cast<std::size_t>(m)].shape.name;
  }

  const auto wall_start = Clock::now();
  std::vector<double> ttft_of(requests.size(), 0);
  std::size_t next_arrival = 0;
  double t_ms = 0;
  std::int64_t tick = 0;
  const double end_ms = config.duration_s * 1e3;
  while (t_ms < end_ms) {
    while (next_arrival < requests.size() &&
           requests[next_arrival].arrival_ms <= t_ms) {
      const ElasticRequest& r = requests[next_arrival];
      ModelState& ms = models[static_cast<std::size_t>(r.model)];
      ms.queue.push_back(
          {static_cast<int>(next_arrival), r.prompt_tokens, r.output_tokens, false});
      ++next_arrival;
    }
    const auto alloc_start = Clock::now();
    std::vector<int> admitted_now;   // Requests whose first token is this tick.
    std::vector<int> completed_now;  // Requests that made their last token.
    for (int k = 0; k < n; ++k) {
      const int m = static_cast<int>((tick + k) % n);
      ModelState& ms = models[static_cast<std::size_t>(m)];
      const ElasticModel& model = config.models[static_cast<std::size_t>(m)];
      vattn::KVCache& cache = *ms.cache;
      // 2. Admission, first come first served.
      while (!ms.queue.empty() &&
             static_cast<int>(ms.running.size()) < model.max_slots) {
        const Waiting w = ms.queue.front();
        VATTN_ASSIGN_OR_RETURN(const int slot, cache.AllocSlot(w.prompt + 1));
        const absl::Status grown = cache.Grow(slot, w.prompt + 1);
        if (!grown.ok()) {
          VATTN_RETURN_IF_ERROR(cache.Free(slot, vattn::kNoFence));
          if (IsOutOfMemory(grown)) break;  // Waits for memory.
          return grown;
        }
        ms.queue.pop_front();
        if (!w.had_first) admitted_now.push_back(w.request);
        ms.running.push_back({w.request, slot, w.prompt + 1, w.left - 1, tick});
        ++ms.result.generated_tokens;
      }
      // 3. One decode step for the requests admitted before this tick.
      std::vector<vattn::StepRequest> batch;
      std::vector<std::size_t> index;
      for (std::size_t i = 0; i < ms.running.size(); ++i) {
        const Running& r = ms.running[i];
        if (r.left > 0 && r.admitted_tick < tick) {
          batch.push_back({r.slot, r.length + 1});
          index.push_back(i);
        }
      }
      while (!batch.empty()) {
        const absl::StatusOr<vattn::StepResult> s = cache.Step(batch);
        if (s.ok()) break;
        if (!IsOutOfMemory(s.status())) return s.status();
        // Preempt the most recently admitted request that is in the batch.
        const std::size_t victim = index.back();
        Running r = ms.running[victim];
        VATTN_RETURN_IF_ERROR(cache.Free(r.slot, vattn::kNoFence));
        ms.queue.push_front({r.request, r.length, r.left, true});
        ms.running.erase(ms.running.begin() + static_cast<std::ptrdiff_t>(victim));
        batch.pop_back();
        index.pop_back();
        ++ms.result.preemptions;
      }
      for (std::size_t j = 0; j < index.size(); ++j) {
        Running& r = ms.running[index[j]];
        ++r.length;
        --r.left;
        ++ms.result.generated_tokens;
      }
      // 1. (for the next tick) Free what is done.
      for (std::size_t i = 0; i < ms.running.size();) {
        if (ms.running[i].left <= 0) {
          VATTN_RETURN_IF_ERROR(cache.Free(ms.running[i].slot, vattn::kNoFence));
          completed_now.push_back(ms.running[i].request);
          ms.running.erase(ms.running.begin() + static_cast<std::ptrdiff_t>(i));
        } else {
          ++i;
        }
      }
    }
    const double alloc_ms = Ms(Clock::now() - alloc_start);
    out.alloc_ms += alloc_ms;
    t_ms += config.step_ms + alloc_ms;
    ++tick;
    for (const int id : admitted_now) {
      const ElasticRequest& req = requests[static_cast<std::size_t>(id)];
      ModelState& ms = models[static_cast<std::size_t>(req.model)];
      ms.ttft_ms.push_back(t_ms - req.arrival_ms);
      ttft_of[static_cast<std::size_t>(id)] = t_ms - req.arrival_ms;
      ++ms.result.admitted;
    }
    for (const int id : completed_now) {
      const ElasticRequest& req = requests[static_cast<std::size_t>(id)];
      ElasticModelResult& r = models[static_cast<std::size_t>(req.model)].result;
      ++r.completed;
      if (ttft_of[static_cast<std::size_t>(id)] <= config.ttft_bound_ms) {
        ++r.completed_in_bound;
      }
    }
    ElasticSample sample;
    sample.t_ms = t_ms;
    for (ModelState& ms : models) {
      const vattn::CacheStats st = ms.cache->Stats();
      sample.physical_bytes.push_back(st.physical_bytes);
      sample.running.push_back(static_cast<int>(ms.running.size()));
      sample.waiting.push_back(static_cast<int>(ms.queue.size()));
      ms.result.peak_active =
          std::max<std::int64_t>(ms.result.peak_active, st.active_slots);
    }
    out.timeline.push_back(std::move(sample));
  }
  out.ticks = tick;
  out.wall_s = std::chrono::duration<double>(Clock::now() - wall_start).count();

  for (int m = 0; m < n; ++m) {
    ModelState& ms = models[static_cast<std::size_t>(m)];
    ElasticModelResult& r = ms.result;
    r.ttft_p50_ms = Percentile(ms.ttft_ms, 0.50);
    r.ttft_p99_ms = Percentile(ms.ttft_ms, 0.99);
    r.ttft_max_ms = ms.ttft_ms.empty()
                        ? 0
                        : *std::max_element(ms.ttft_ms.begin(), ms.ttft_ms.end());
    // Every request of the workload arrives before duration_s; the last
    // tick may end just before a few of them: they count as waiting.
    r.arrived = std::count_if(requests.begin(), requests.end(),
                              [m](const ElasticRequest& q) { return q.model == m; });
    r.waiting_at_end = static_cast<std::int64_t>(ms.queue.size());
    for (std::size_t i = next_arrival; i < requests.size(); ++i) {
      if (requests[i].model == m) ++r.waiting_at_end;
    }
    const vattn::CacheStats st = ms.cache->Stats();
    r.peak_physical_bytes = st.peak_physical_bytes;
    r.driver_calls =
        st.create_calls + st.destroy_calls + st.map_calls + st.unmap_calls;
    out.models.push_back(r);
  }
  if (arbiter != nullptr) {
    const vattn::ArbiterStats st = arbiter->Stats();
    for (int m = 0; m < n; ++m) {
      const std::string name =
          absl::StrCat(m, ":", config.models[static_cast<std::size_t>(m)].shape.name);
      for (const vattn::ArbiterCacheStats& c : st.caches) {
        if (c.name == name) {
          out.models[static_cast<std::size_t>(m)].reclaimed_by_others_bytes =
              c.reclaimed_from_bytes;
        }
      }
    }
    out.telemetry_json = vattn::TelemetryJson(*arbiter);
  }
  return out;
}

}  // namespace vdecode
