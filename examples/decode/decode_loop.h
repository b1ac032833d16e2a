// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// A continuous-batching decode loop over a model shape, on vattn memory or
// on a paged baseline, on the CPU (Host backend) or a CUDA device. The
// program examples/batch_decode.cc is a command line around RunDecode; the
// tests call RunDecode directly.
//
// Each request: a slot (AllocSlot with the prompt as hint), a prefill that
// writes the prompt's K/V rows for every layer, then one decode step per
// output token that writes one new K/V row per layer and runs decode
// attention (one query token, every head, the whole context) for every
// layer. The cache is grown through KVCache::Step before each step; finished
// requests are freed and their slots reused. The schedule depends only on
// the requests and max_slots, so two engines run exactly the same steps.
#ifndef VATTN_EXAMPLES_DECODE_DECODE_LOOP_H_
#define VATTN_EXAMPLES_DECODE_DECODE_LOOP_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "attention.h"
#include "shared_prefix.h"
#include "vattn/vattn.h"

namespace vdecode {

struct ModelShape {
  std::string name = "custom";
  int layers = 32;
  int kv_heads = 8;
  int q_heads = 32;
  int head_dim = 128;
  DType dtype = DType::kF16;

  // K and V of every layer for one token.
  std::int64_t BytesPerToken() const {
    return static_cast<std::int64_t>(layers) * 2 * kv_heads * head_dim *
           static_cast<std::int64_t>(DTypeBytes(dtype));
  }
};
// llama3-8b, llama3-70b-tp8 (one GPU's share of 8-way tensor parallelism),
// yi-6b, mistral-7b, tiny (for tests); std::nullopt for another name.
std::optional<ModelShape> ModelPreset(std::string_view name);
std::vector<std::string> ModelPresetNames();

struct Request {
  std::int64_t arrival_step = 0;  // The first step it may be admitted at.
  std::int64_t prompt_tokens = 1;
  std::int64_t output_tokens = 1;
};
// n requests arriving at step 0, lengths uniform in [min, max].
std::vector<Request> RandomRequests(int n, std::int64_t prompt_min,
                                    std::int64_t prompt_max,
                                    std::int64_t output_min,
                                    std::int64_t output_max,
                                    std::uint32_t seed);
// CSV rows "arrival,prompt_tokens,output_tokens" (arrival in decode steps;
// a header line and blank lines are skipped). InvalidArgument naming the
// line on a malformed row.
absl::StatusOr<std::vector<Request>> ParseTraceCsv(std::string_view text);

// The steps the loop will run: which requests are in each step's batch, in
// batch order (a request's first step is its prefill step). Depends only on
// the requests and max_slots: FIFO by arrival, at most max_slots at once.
struct PlannedStep {
  std::int64_t step = 0;
  std::vector<int> active;  // Indices into the request vector.
};
std::vector<PlannedStep> PlanSteps(const std::vector<Request>& requests,
                                   int max_slots);
// The most 16-token blocks the plan holds at once (the paged pool's size
// when no budget is given).
std::int64_t PeakBlocks(const std::vector<Request>& requests,
                        const std::vector<PlannedStep>& plan,
                        int block_tokens);
// The memory budget both engines get by default: `headroom` times the
// plan's peak in 16-token blocks, rounded up to 2 MiB (the granularity of
// the Host backend and of NVIDIA GPUs), and at least one 2 MiB granule per
// slot the loop may hold (max_slots + max_slots / 4 + 1): a vattn slot
// holding a request holds at least one granule.
std::int64_t DefaultBudgetBytes(const std::vector<Request>& requests,
                                int max_slots, const ModelShape& shape,
                                double headroom = 1.25);

enum class Device { kCpu, kCuda };
enum class Engine { kVattn, kPaged };
const char* EngineName(Engine engine);

struct ProgressInfo {
  Engine engine = Engine::kVattn;
  std::int64_t tokens_done = 0;
  std::int64_t tokens_total = 0;
  std::int64_t steps_done = 0;
  std::int64_t steps_total = 0;
  double elapsed_s = 0;  // Time in steps so far.
  int active = 0;
  std::int64_t physical_bytes = 0;
  bool final = false;
};

struct DecodeConfig {
  ModelShape shape;
  Device device = Device::kCpu;
  Engine engine = Engine::kVattn;
  vattn::Layout layout = vattn::Layout::kTokenMajor;
  // Requests decoded at once. The cache (or block table) holds max_slots +
  // max_slots / 4 + 1 slots, so the next step's requests take slots (and
  // the map-ahead thread maps their prompts) while this step runs.
  int max_slots = 16;
  std::int64_t max_tokens = 4096;
  // vattn's map-ahead look-ahead in tokens (0: off) and its pool marks
  // (-1: scaled to max_slots, max(2, max_slots / 16) and max(4, max_slots /
  // 4), so a small batch does not keep a large pool of idle handles).
  std::int64_t map_ahead_tokens = 256;
  int pool_low_water = -1;
  int pool_high_water = -1;
  // vattn's decode-extent cap in tokens (KVCacheOptions.max_extent_tokens);
  // 0: the library's default.
  std::int64_t max_extent_tokens = 0;
  // The memory both engines may use: the paged pool holds this many bytes
  // of blocks (allocated up front, as vLLM does) and vattn gets it as
  // memory_budget_bytes. 0: the paged pool is the plan's peak and vattn
  // has no budget of its own.
  std::int64_t budget_bytes = 0;
  // The backend vattn maps through: a Host backend for Device::kCpu, a CUDA
  // backend for Device::kCuda. Unused by the paged engine.
  std::shared_ptr<vattn::Backend> backend;
  // A system prompt of this many tokens starts every request (its K/V rows
  // are the same in all; requests' prompt_tokens include it; 0: none). With
  // share_prefix, the vattn engine keeps it once and starts requests from
  // it (shared_prefix.h); otherwise every request holds its own copy.
  std::int64_t shared_prefix_tokens = 0;
  bool share_prefix = true;
  int threads = 0;  // CPU kernel threads (0: every core).
  // Attention outputs (request, layer) compared with the float64 reference
  // over the run; 0 checks none. A sample over the tolerance fails the run.
  int check_samples = 0;
  double check_tolerance = 0;  // 0: DefaultTolerance(dtype).
  std::uint32_t seed = 1;
  // Called after steps, at most every progress_interval_s and once at the end.
  std::function<void(const ProgressInfo&)> progress;
  double progress_interval_s = 0.1;
};

double DefaultTolerance(DType dtype);

struct CheckSample {
  std::int64_t step = 0;
  int request = 0;
  int layer = 0;
  std::int64_t context = 0;
  double rel_error = 0;
};

struct RunResult {
  Engine engine = Engine::kVattn;
  std::string device;   // "cpu (N threads)" or the GPU's name.
  std::string backend;  // vattn backend name, or "paged pool".
  std::string layout;
  std::int64_t requests = 0;
  std::int64_t steps = 0;
  std::int64_t generated_tokens = 0;
  std::int64_t prefill_tokens = 0;
  int max_batch = 0;
  double wall_s = 0;          // Sum of step times.
  double tokens_per_s = 0;    // generated_tokens / wall_s.
  double step_us = 0;         // Mean step time.
  double attention_us = 0;    // Mean attention time per step (all layers).
  double fill_us = 0;         // Mean K/V write time per step (prefill + new rows).
  double alloc_us = 0;        // Mean allocator time per step (Step, AllocSlot,
                              // Free; block allocation for paged).
  double alloc_share = 0;     // alloc_us / step_us.
  double step_call_p50_us = 0;  // KVCache::Step (or block allocation) alone.
  double step_call_p99_us = 0;
  double step_call_max_us = 0;
  std::int64_t misses = 0;
  std::int64_t driver_calls = 0;  // create + destroy + map + unmap.
  std::int64_t peak_physical_bytes = 0;
  std::int64_t peak_logical_bytes = 0;
  // Memory, sampled when each step's batch is backed (after Prepare, where
  // the paged pool's blocks in use are counted too). In use: what backs the
  // active requests (vattn: their adopted extents, look-ahead included;
  // paged: their blocks). Reclaimable: vattn memory still mapped that no
  // request relies on (idle slots, surplus); taken back by any Grow that
  // needs it. Pooled: vattn's idle handles; paged: its free blocks.
  std::int64_t peak_in_use_bytes = 0;
  // The same, also sampled while the next step's requests hold their slots
  // (their prompts mapped ahead) and the finished ones are not freed yet.
  std::int64_t peak_in_use_overlap_bytes = 0;
  std::int64_t peak_reclaimable_bytes = 0;
  std::int64_t peak_pooled_bytes = 0;
  std::int64_t budget_bytes = 0;  // 0: none.
  std::vector<CheckSample> checks;
  PrefixSharing sharing;  // With shared_prefix_tokens > 0.
  double max_rel_error = 0;
  double tolerance = 0;
};

// Runs the plan of `requests` to completion. InvalidArgument: bad config or
// a request longer than max_tokens; Unavailable: CUDA asked for without
// kernels or device; ResourceExhausted: memory ran out; Internal: a CUDA
// error, or (FailedPrecondition) a checked output over the tolerance.
absl::StatusOr<RunResult> RunDecode(const DecodeConfig& config,
                                    const std::vector<Request>& requests);

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_DECODE_LOOP_H_
