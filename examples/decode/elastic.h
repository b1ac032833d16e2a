// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Several models sharing one memory budget under bursty traffic (issue 14):
// each model has its own KV cache on one backend; bursts of requests
// alternate between the models. The memory is either shared through a
// vattn::MemoryArbiter (each cache draws from one budget; idle memory of one
// model serves the other) or split statically (each cache gets an equal
// share of the budget as its own memory_budget_bytes, as engines split GPU
// memory today). examples/batch_decode.cc (--models=2) and
// benchmarks/elastic_bench.cc are command lines around RunElastic.
//
// The loop models the GPU's time: one tick is one decode step of every
// model (config.step_ms of modelled compute) plus the allocator's own time
// on the caller's thread, measured (on the latency-model backend that
// includes the H200's driver costs: reclaiming another model's memory costs
// its unmaps and destroys, then creates and maps). No attention runs and no
// KV is written, so the Host backend's memory stays sparse and a budget of
// many GiB costs little RSS.
//
// Per tick, for each model (the models take turns at going first):
//   1. requests that have produced all their tokens are freed (no fence:
//      nothing reads them);
//   2. waiting requests are admitted first-come-first-served while a slot
//      is free: AllocSlot(prompt) and Grow(prompt + 1) (the prefill and the
//      first token); a Grow refused for memory (ResourceExhausted) frees
//      the slot and stops admission for this tick: the request waits for
//      memory, at the head of the queue;
//   3. one Step for every running request (one more token each); refused
//      for memory, the most recently admitted request is preempted (freed
//      and put back at the head of the queue with its generated tokens
//      folded into its prompt, vLLM's recompute policy) and Step retried.
// A request's TTFT is the end of the tick that admitted it (its prefill ran
// there and made the first token) minus its arrival: it includes the time
// waiting for memory or for a slot. A preempted request keeps its first
// TTFT.
#ifndef VATTN_EXAMPLES_DECODE_ELASTIC_H_
#define VATTN_EXAMPLES_DECODE_ELASTIC_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "decode_loop.h"
#include "vattn/vattn.h"

namespace vdecode {

enum class MemoryMode {
  kArbiter,      // One MemoryArbiter over the whole budget.
  kStaticSplit,  // Each of the N caches gets budget / N (rounded down to
                 // the granularity) as its own memory_budget_bytes.
};
const char* MemoryModeName(MemoryMode mode);

struct ElasticModel {
  ModelShape shape;
  int max_slots = 64;
  std::int64_t max_tokens = 4096;
  std::int64_t prompt_min = 256, prompt_max = 1024;
  std::int64_t output_min = 64, output_max = 256;
  // Poisson arrival rates, requests per second of modelled time: during the
  // model's own bursts, and between them.
  double burst_rate = 10;
  double quiet_rate = 0.5;
};

struct ElasticConfig {
  std::vector<ElasticModel> models;
  MemoryMode mode = MemoryMode::kArbiter;
  std::int64_t budget_bytes = std::int64_t{4} << 30;
  // The backend every cache (and the arbiter) maps through. Shared; the
  // caller keeps it alive.
  std::shared_ptr<vattn::Backend> backend;
  double step_ms = 20;          // Modelled compute of one tick.
  double duration_s = 60;       // Arrivals stop here; the run stops too.
  double burst_s = 10;          // Bursts alternate: model 0, 1, ..., 0, ...
  double ttft_bound_ms = 2000;  // The TTFT bound a served request meets.
  std::int64_t map_ahead_tokens = 0;  // 0: the map-ahead thread is off.
  std::uint32_t seed = 1;
};

// A request of the workload (the same for every mode, given the config's
// seed): arrival time and lengths, and the model it goes to.
struct ElasticRequest {
  int model = 0;
  double arrival_ms = 0;
  std::int64_t prompt_tokens = 1;
  std::int64_t output_tokens = 1;
};
std::vector<ElasticRequest> ElasticWorkload(const ElasticConfig& config);

struct ElasticModelResult {
  std::string name;
  std::int64_t arrived = 0;
  std::int64_t admitted = 0;            // Had its first token.
  std::int64_t completed = 0;           // Produced all its tokens.
  std::int64_t completed_in_bound = 0;  // ... with TTFT <= the bound.
  std::int64_t waiting_at_end = 0;      // Never admitted.
  std::int64_t generated_tokens = 0;
  std::int64_t preemptions = 0;
  double ttft_p50_ms = 0, ttft_p99_ms = 0, ttft_max_ms = 0;  // Admitted ones.
  std::int64_t peak_physical_bytes = 0;
  std::int64_t peak_active = 0;
  // Memory of this cache that the arbiter handed to another (0 in the
  // static split): bytes this cache lost to reclamation for another cache.
  std::int64_t reclaimed_by_others_bytes = 0;
  std::int64_t driver_calls = 0;
};

// One sample per tick of every cache's physical bytes, running and waiting
// requests.
struct ElasticSample {
  double t_ms = 0;
  std::vector<std::int64_t> physical_bytes;
  std::vector<int> running;
  std::vector<int> waiting;
};

struct ElasticResult {
  MemoryMode mode = MemoryMode::kArbiter;
  std::int64_t budget_bytes = 0;
  double ttft_bound_ms = 0;
  double burst_s = 0;
  std::vector<ElasticModelResult> models;
  std::vector<ElasticSample> timeline;
  std::int64_t ticks = 0;
  double alloc_ms = 0;     // Allocator time in all (part of the clock).
  double wall_s = 0;       // Real time of the run.
  // The arbiter's telemetry at the end of the run (JSON); empty for the
  // static split.
  std::string telemetry_json;

  std::int64_t Completed() const;
  std::int64_t CompletedInBound() const;
};

// Runs the workload in the config's mode. InvalidArgument: no model, a bad
// rate or length, a null backend, a budget too small to split; otherwise
// the first error of a cache or arbiter call that is not the expected
// ResourceExhausted of a full budget.
absl::StatusOr<ElasticResult> RunElastic(const ElasticConfig& config);

// A hand-written SVG: one panel per run, each cache's physical bytes over
// time (a line per model), the budget (and, for the static split, each
// model's share) and the bursts shaded by model. No dependency.
std::string ElasticSvg(const std::vector<ElasticResult>& runs);

// The per-model summary table of one or more runs (plain text).
std::string ElasticTable(const std::vector<ElasticResult>& runs);

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_ELASTIC_H_
