// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Capacity and waste: how many requests fit in a given KV memory, and how
// much of it holds no KV, for vattn (token-major and layer-major), a paged
// allocator (blocks of 16 and 32 tokens) and static reservation of
// max_tokens per request. Deterministic (seeded; the seed is printed) and
// runs in seconds. Not a Google Benchmark program: it times nothing.
//
//   capacity [--models=all|LIST] [--max_context=LIST] [--memory_gib=G]
//            [--mixes=uniform,longtail,production,chat] [--allocators=LIST]
//            [--trace=FILE] [--requests=N]
//            [--seed=S] [--step_ms=MS] [--json=FILE] [--help]
//
// The workload. A list of requests (prompt P, output O tokens, arrival) is
// served by one decode loop: every step each active request writes one more
// token; a request arrives, is admitted first-come-first-served when its
// prompt fits (a waiting request blocks the ones behind it), decodes O
// tokens and leaves. When a decode step finds no memory, the most recently
// admitted request is preempted (vLLM's recompute policy: it goes back to
// the head of the queue with its generated tokens folded into its prompt).
// The uniform and longtail mixes queue every request at step 0 (an offline
// batch that saturates the memory); production and chat arrive continuously
// (Poisson, at 1.1x the rate the memory can serve, so slots are freed and
// reused while a queue waits); a trace gives arrivals in seconds, turned
// into steps with --step_ms.
//
// The allocators, each simulated with its real policy:
//  * vattn token-major / layer-major: the REAL library (KVCache over the Host
//    backend with memory_budget_bytes = the memory size, default extent
//    policy, deferred reclamation, no map-ahead thread) driven with
//    AllocSlot / Grow / Free. Nothing is ever written, so the Host backend's
//    memfd stays sparse (the program prints its RSS to show it). Grow is
//    called at the steps where it has work to do (a request crosses its
//    backed length), which gives the library exactly the calls of a
//    token-by-token run; decode steps in between are bookkeeping only.
//  * paged/16, paged/32: an exact model of a block allocator over one
//    preallocated tensor of the memory size (vLLM): a request holds
//    ceil(len / block) blocks.
//  * static: every admitted request reserves max_context tokens.
//
// Reported per (model, context, mix, allocator): the largest batch (peak
// concurrent requests), the mean batch and waste while requests were waiting
// (the memory-bound part of the run; the whole run if nothing ever waited),
// waste = bytes held for active requests minus their KV bytes (p50 and max
// over time, time-weighted), driver calls per 1000 generated tokens and
// preemptions. For vattn, memory of freed slots that stays mapped (deferred
// reclamation) and pooled handles are NOT counted as waste: any Grow takes
// them back when it needs them. Driver calls for paged and static are 0 at
// run time: vLLM (and static reservation) allocate one big tensor up front,
// and a block allocation is a free-list pop in user space; the paged rows
// also give block allocations per 1000 tokens, which are not driver calls.
//
// Output: a table on stdout; with --json=FILE, the results as JSON and a
// picture (FILE with its extension replaced by .svg): grouped bars of the
// batch (mean while requests wait) and waste across the mixes, per allocator, one row per model and
// context.

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <queue>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_split.h"
#include "fmt/core.h"
#include "vattn/vattn.h"

namespace {

constexpr std::int64_t kMiB = std::int64_t{1} << 20;
constexpr std::int64_t kGiB = std::int64_t{1} << 30;
constexpr std::int64_t kGranule = 2 * kMiB;  // Host backend and NVIDIA GPUs.

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "capacity: %s\n", msg.c_str());
  std::exit(1);
}

// ---- Models -----------------------------------------------------------------
struct Model {
  std::string name;
  std::string label;
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int dtype_bytes = 2;  // fp16.
  std::int64_t BytesPerToken() const {
    return std::int64_t{2} * layers * kv_heads * head_dim * dtype_bytes;
  }
};

const std::vector<Model>& AllModels() {
  static const std::vector<Model> models = {
      {"llama3-8b", "Llama-3-8B", 32, 8, 128, 2},
      {"llama3-70b-tp8", "Llama-3-70B TP8 (per GPU)", 80, 1, 128, 2},
      {"yi-6b", "Yi-6B", 32, 4, 128, 2},
      {"mistral-7b", "Mistral-7B", 32, 8, 128, 2},
  };
  return models;
}

// ---- Requests ---------------------------------------------------------------
struct Request {
  std::int64_t arrival_step = 0;
  std::int64_t prompt = 0;
  std::int64_t output = 0;
};

// mt19937_64's output sequence is fixed by the standard; the distributions
// are written here (the standard library's are implementation-defined), so
// a seed gives the same requests everywhere.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : gen_(seed) {}
  double Uniform01() {  // [0, 1)
    return static_cast<double>(gen_() >> 11) * (1.0 / 9007199254740992.0);
  }
  std::int64_t UniformInt(std::int64_t lo, std::int64_t hi) {  // [lo, hi]
    const std::uint64_t span = static_cast<std::uint64_t>(hi - lo + 1);
    return lo + static_cast<std::int64_t>(gen_() % span);
  }
  double Normal() {  // Box-Muller.
    const double u1 = 1.0 - Uniform01();
    const double u2 = Uniform01();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }

 private:
  std::mt19937_64 gen_;
};

// ShareGPT-like long tail: log-normal prompt and output lengths.
constexpr double kPromptMedian = 200;
constexpr double kOutputMedian = 250;
constexpr double kPromptSigma = 1.0;
constexpr double kOutputSigma = 1.0;

// Mixes with served-traffic statistics, arriving continuously (Poisson):
// log-normal lengths given by a median and a sigma.
struct ArrivalMix {
  const char* name;
  double prompt_median;
  double prompt_sigma;
  double output_median;
  double output_sigma;
};
// production: prompts with a median of 1.5k tokens and a p99 of ~7.4k
// (sigma = ln(7400 / 1500) / 2.326 = 0.686), outputs with a median of 13
// (short completions, code-assistant-like traffic).
// chat: prompts with a median of ~1k, outputs with a median of ~130.
constexpr ArrivalMix kArrivalMixes[] = {
    {"production", 1500, 0.686, 13, 1.0},
    {"chat", 1000, 1.0, 130, 0.8},
};
const ArrivalMix* FindArrivalMix(const std::string& name) {
  for (const ArrivalMix& m : kArrivalMixes) {
    if (name == m.name) return &m;
  }
  return nullptr;
}
// Arrival rate of the continuous mixes, as a multiple of what the memory can
// serve (requests that fit at their mean length, over their mean output):
// above 1, so a queue forms and the run measures the memory-bound regime.
constexpr double kArrivalLoad = 1.1;

Request Clip(std::int64_t p, std::int64_t o, std::int64_t ctx) {
  Request r;
  r.prompt = std::clamp<std::int64_t>(p, 1, ctx - 1);
  r.output = std::clamp<std::int64_t>(o, 1, ctx - r.prompt);
  return r;
}

// `requests_per_step`: the arrival rate of a continuous mix (ignored by the
// others, which queue every request at step 0).
std::vector<Request> MakeSynthetic(const std::string& mix, std::int64_t ctx,
                                   std::size_t n, std::uint64_t seed,
                                   double requests_per_step = 0) {
  Rng rng(seed);
  std::vector<Request> out;
  out.reserve(n);
  const ArrivalMix* arrival = FindArrivalMix(mix);
  double clock = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (arrival != nullptr) {
      const double p = std::exp(std::log(arrival->prompt_median) +
                                arrival->prompt_sigma * rng.Normal());
      const double o = std::exp(std::log(arrival->output_median) +
                                arrival->output_sigma * rng.Normal());
      Request r = Clip(std::llround(p), std::llround(o), ctx);
      if (requests_per_step > 0) {
        clock += -std::log(1.0 - rng.Uniform01()) / requests_per_step;
      }
      r.arrival_step = static_cast<std::int64_t>(clock);
      out.push_back(r);
    } else if (mix == "uniform") {
      const std::int64_t p = rng.UniformInt(1, ctx / 2);
      const std::int64_t o = rng.UniformInt(1, ctx / 2);
      out.push_back(Clip(p, o, ctx));
    } else {
      const double p = std::exp(std::log(kPromptMedian) +
                                kPromptSigma * rng.Normal());
      const double o = std::exp(std::log(kOutputMedian) +
                                kOutputSigma * rng.Normal());
      out.push_back(Clip(std::llround(p), std::llround(o), ctx));
    }
  }
  return out;
}

struct TraceRow {
  double arrival_s = 0;
  std::int64_t prompt = 0;
  std::int64_t output = 0;
};

std::vector<TraceRow> ReadTrace(const std::string& path) {
  std::ifstream in(path);
  if (!in) Die("cannot open trace file " + path);
  std::vector<TraceRow> rows;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    if (lineno == 1 && line.find("arrival") != std::string::npos) continue;
    std::replace(line.begin(), line.end(), ',', ' ');
    std::istringstream fields(line);
    TraceRow r;
    if (!(fields >> r.arrival_s >> r.prompt >> r.output) || r.prompt < 0 ||
        r.output < 0 || r.arrival_s < 0) {
      Die(fmt::format("{}:{}: expected 'arrival,prompt_tokens,output_tokens' "
                      "(seconds, tokens, tokens), got '{}'",
                      path, lineno, line));
    }
    rows.push_back(r);
  }
  if (rows.empty()) Die("trace " + path + " has no requests");
  std::stable_sort(rows.begin(), rows.end(),
                   [](const TraceRow& a, const TraceRow& b) {
                     return a.arrival_s < b.arrival_s;
                   });
  return rows;
}

std::vector<Request> FromTrace(const std::vector<TraceRow>& rows,
                               std::int64_t ctx, double step_ms) {
  std::vector<Request> out;
  out.reserve(rows.size());
  for (const TraceRow& t : rows) {
    Request r = Clip(t.prompt, t.output, ctx);
    r.arrival_step = static_cast<std::int64_t>(t.arrival_s * 1000.0 / step_ms);
    out.push_back(r);
  }
  return out;
}

// ---- Allocators -------------------------------------------------------------
class Allocator {
 public:
  virtual ~Allocator() = default;
  // Admits a request whose prompt has `prompt` tokens; false when it does
  // not fit now. *id names it in later calls.
  virtual bool Admit(std::int64_t prompt, int* id) = 0;
  // Tokens the request may grow to without asking for memory.
  virtual std::int64_t Backed(int id) const = 0;
  // Backs `tokens` tokens; false when the memory is full.
  virtual bool Extend(int id, std::int64_t tokens) = 0;
  virtual void Release(int id) = 0;
  // Bytes held for active requests (not available to another request).
  virtual std::int64_t HeldBytes() const = 0;
  // The part of HeldBytes that active requests hold beyond the extents that
  // back them (vattn's surplus: reclaimable, but held while it lasts).
  virtual std::int64_t SurplusBytes() const { return 0; }
  virtual std::int64_t DriverCalls() const { return 0; }
  // User-space allocation operations (paged: block allocations).
  virtual std::int64_t BlockOps() const { return 0; }
  // Requests refused because every slot was taken (vattn's max_slots).
  virtual std::int64_t SlotLimited() const { return 0; }
  virtual std::string Notes() const { return ""; }
};

class PagedAllocator final : public Allocator {
 public:
  PagedAllocator(std::int64_t memory, std::int64_t bpt, std::int64_t block)
      : block_(block),
        block_bytes_(bpt * block),
        free_(memory / (bpt * block)) {}
  bool Admit(std::int64_t prompt, int* id) override {
    const std::int64_t need = Blocks(prompt);
    if (need > free_) return false;
    free_ -= need;
    ops_ += need;
    int slot;
    if (!free_ids_.empty()) {
      slot = free_ids_.back();
      free_ids_.pop_back();
      blocks_[static_cast<std::size_t>(slot)] = need;
    } else {
      slot = static_cast<int>(blocks_.size());
      blocks_.push_back(need);
    }
    held_ += need * block_bytes_;
    *id = slot;
    return true;
  }
  std::int64_t Backed(int id) const override {
    return blocks_[static_cast<std::size_t>(id)] * block_;
  }
  bool Extend(int id, std::int64_t tokens) override {
    std::int64_t& have = blocks_[static_cast<std::size_t>(id)];
    const std::int64_t need = Blocks(tokens) - have;
    if (need <= 0) return true;
    if (need > free_) return false;
    free_ -= need;
    ops_ += need;
    have += need;
    held_ += need * block_bytes_;
    return true;
  }
  void Release(int id) override {
    std::int64_t& have = blocks_[static_cast<std::size_t>(id)];
    free_ += have;
    held_ -= have * block_bytes_;
    have = 0;
    free_ids_.push_back(id);
  }
  std::int64_t HeldBytes() const override { return held_; }
  std::int64_t BlockOps() const override { return ops_; }

 private:
  std::int64_t Blocks(std::int64_t tokens) const {
    return (tokens + block_ - 1) / block_;
  }
  const std::int64_t block_;
  const std::int64_t block_bytes_;
  std::int64_t free_;
  std::int64_t held_ = 0;
  std::int64_t ops_ = 0;
  std::vector<std::int64_t> blocks_;
  std::vector<int> free_ids_;
};

class StaticAllocator final : public Allocator {
 public:
  StaticAllocator(std::int64_t memory, std::int64_t bpt, std::int64_t ctx)
      : ctx_(ctx), slot_bytes_(ctx * bpt), free_(memory / (ctx * bpt)) {}
  bool Admit(std::int64_t /*prompt*/, int* id) override {
    if (free_ == 0) return false;
    --free_;
    held_ += slot_bytes_;
    *id = next_id_++;
    return true;
  }
  std::int64_t Backed(int /*id*/) const override { return ctx_; }
  bool Extend(int /*id*/, std::int64_t /*tokens*/) override { return true; }
  void Release(int /*id*/) override {
    ++free_;
    held_ -= slot_bytes_;
  }
  std::int64_t HeldBytes() const override { return held_; }

 private:
  const std::int64_t ctx_;
  const std::int64_t slot_bytes_;
  std::int64_t free_;
  std::int64_t held_ = 0;
  int next_id_ = 0;
};

// The real library on the Host backend. Slot ids are the cache's slots.
class VattnAllocator final : public Allocator {
 public:
  VattnAllocator(const Model& m, vattn::Layout layout, std::int64_t memory,
                 std::int64_t ctx, std::int64_t max_requests,
                 bool defer_reclaim, std::int64_t max_extent_mib) {
    vattn::HostBackendOptions host_opts;
    host_opts.physical_limit_bytes = std::size_t{1} << 44;  // Never touched.
    auto backend = vattn::MakeHostBackend(host_opts);
    if (!backend.ok()) Die("MakeHostBackend: " + backend.status().ToString());
    vattn::KVCacheOptions o;
    o.num_layers = m.layers;
    o.num_kv_heads = m.kv_heads;
    o.head_dim = m.head_dim;
    o.dtype = vattn::DType::kFloat16;
    o.layout = layout;
    o.max_tokens = ctx;
    o.memory_budget_bytes = static_cast<std::size_t>(memory);
    o.map_ahead_tokens = 0;
    o.defer_reclaim = defer_reclaim;
    if (max_extent_mib > 0) {
      o.max_extent_bytes = static_cast<std::size_t>(max_extent_mib) * kMiB;
    }
    // Enough slots for every request that could be resident at once (each
    // holds at least one granule per tensor), within the address space the
    // backend reserves.
    const int regions = layout == vattn::Layout::kTokenMajor ? 1 : 2 * m.layers;
    const std::int64_t per_region =
        layout == vattn::Layout::kTokenMajor ? m.BytesPerToken()
                                             : m.BytesPerToken() / regions;
    const std::int64_t slot_virtual =
        (ctx * per_region + kGranule - 1) / kGranule * kGranule * regions;
    const std::int64_t by_va =
        static_cast<std::int64_t>(host_opts.max_reservation_bytes) /
        slot_virtual;
    const std::int64_t by_memory = memory / (kGranule * regions);
    max_slots_ = static_cast<int>(std::max<std::int64_t>(
        1, std::min({max_requests, by_va, by_memory, std::int64_t{1} << 20})));
    o.max_slots = max_slots_;
    auto cache = vattn::KVCache::Create(o, *backend);
    if (!cache.ok()) Die("KVCache::Create: " + cache.status().ToString());
    cache_ = std::move(*cache);
    base_ = cache_->Stats();
    active_.assign(static_cast<std::size_t>(max_slots_), false);
    backed_.assign(static_cast<std::size_t>(max_slots_), 0);
  }
  bool Admit(std::int64_t prompt, int* id) override {
    auto slot = cache_->AllocSlot(prompt);
    if (!slot.ok()) {
      if (slot.status().code() == absl::StatusCode::kResourceExhausted) {
        ++slot_limited_;
        return false;
      }
      Die("AllocSlot: " + slot.status().ToString());
    }
    absl::Status s = cache_->Grow(*slot, prompt);
    if (!s.ok()) {
      if (s.code() != absl::StatusCode::kResourceExhausted) {
        Die("Grow: " + s.ToString());
      }
      absl::Status f = cache_->Free(*slot);
      if (!f.ok()) Die("Free: " + f.ToString());
      return false;
    }
    *id = *slot;
    active_[static_cast<std::size_t>(*slot)] = true;
    Refresh(*slot);
    return true;
  }
  std::int64_t Backed(int id) const override {
    return backed_[static_cast<std::size_t>(id)];
  }
  bool Extend(int id, std::int64_t tokens) override {
    absl::Status s = cache_->Grow(id, tokens);
    if (!s.ok()) {
      if (s.code() == absl::StatusCode::kResourceExhausted) return false;
      Die("Grow: " + s.ToString());
    }
    Refresh(id);
    return true;
  }
  void Release(int id) override {
    absl::Status s = cache_->Free(id);
    if (!s.ok()) Die("Free: " + s.ToString());
    active_[static_cast<std::size_t>(id)] = false;
  }
  // Read from the cache each time: a Grow of one request may reclaim
  // another's surplus, which changes what that one holds.
  std::int64_t HeldBytes() const override {
    std::int64_t held = 0;
    for (int i = 0; i < max_slots_; ++i) {
      if (active_[static_cast<std::size_t>(i)]) held += Info(i).mapped_bytes;
    }
    return held;
  }
  std::int64_t SurplusBytes() const override {
    std::int64_t surplus = 0;
    for (int i = 0; i < max_slots_; ++i) {
      if (!active_[static_cast<std::size_t>(i)]) continue;
      const vattn::SlotInfo info = Info(i);
      surplus += info.mapped_bytes - info.adopted_bytes;
    }
    return surplus;
  }
  std::int64_t DriverCalls() const override {
    const vattn::CacheStats s = cache_->Stats();
    return (s.create_calls - base_.create_calls) +
           (s.map_calls - base_.map_calls) +
           (s.unmap_calls - base_.unmap_calls) +
           (s.destroy_calls - base_.destroy_calls);
  }
  std::int64_t SlotLimited() const override { return slot_limited_; }
  std::string Notes() const override {
    const vattn::CacheStats s = cache_->Stats();
    return fmt::format(
        "max_slots {}, creates {}, maps {}, unmaps {}, destroys {}, "
        "reclaimed extents {}, reuse hits {}, peak physical {:.2f} GiB",
        max_slots_, s.create_calls, s.map_calls, s.unmap_calls,
        s.destroy_calls, s.reclaimed_extents, s.reuse_hits,
        static_cast<double>(s.peak_physical_bytes) / kGiB);
  }
  vattn::CacheStats Stats() const { return cache_->Stats(); }

 private:
  vattn::SlotInfo Info(int slot) const {
    auto info = cache_->GetSlot(slot);
    if (!info.ok()) Die("GetSlot: " + info.status().ToString());
    return *info;
  }
  // Reclamation takes only extents past the ones backing a request, so a
  // request's backed tokens change only through its own calls.
  void Refresh(int slot) {
    backed_[static_cast<std::size_t>(slot)] = Info(slot).backed_tokens;
  }
  std::unique_ptr<vattn::KVCache> cache_;
  vattn::CacheStats base_;
  int max_slots_ = 0;
  std::vector<bool> active_;
  std::vector<std::int64_t> backed_;
  std::int64_t slot_limited_ = 0;
};

// ---- Simulation -------------------------------------------------------------
struct SimResult {
  std::int64_t peak_batch = 0;
  double mean_batch = 0;  // Over the window.
  double waste_p50 = 0;   // Bytes, over the window.
  double waste_max = 0;
  double surplus_p50 = 0;  // The surplus part of the waste, over the window.
  double driver_calls_per_1k = 0;
  double block_ops_per_1k = 0;
  std::int64_t generated = 0;
  std::int64_t completed = 0;
  std::int64_t preemptions = 0;
  std::int64_t rejected = 0;  // Could never fit, even alone.
  std::int64_t slot_limited = 0;
  std::int64_t steps = 0;
  bool saturated_window = false;
  double seconds = 0;
  std::string notes;
};

struct Sample {
  double value;
  double weight;
};

double WeightedMedian(std::vector<Sample> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end(),
            [](const Sample& a, const Sample& b) { return a.value < b.value; });
  double total = 0;
  for (const Sample& s : v) total += s.weight;
  double acc = 0;
  for (const Sample& s : v) {
    acc += s.weight;
    if (acc >= total / 2) return s.value;
  }
  return v.back().value;
}

SimResult Simulate(Allocator& alloc, const std::vector<Request>& requests,
                   std::int64_t bpt) {
  const auto wall0 = std::chrono::steady_clock::now();
  struct Live {
    std::int64_t prompt = 0;
    std::int64_t output = 0;
    std::int64_t admitted = 0;  // Step of admission.
    int id = -1;
    std::uint64_t seq = 0;  // Admission order; 0 = not active.
  };
  std::vector<Live> live(requests.size());
  for (std::size_t i = 0; i < requests.size(); ++i) {
    live[i].prompt = requests[i].prompt;
    live[i].output = requests[i].output;
  }
  std::deque<std::size_t> waiting;
  std::map<std::uint64_t, std::size_t> active;  // By admission order.
  using Event = std::pair<std::int64_t, std::uint64_t>;  // (step, seq)
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events;
  std::uint64_t next_seq = 1;
  std::size_t next_arrival = 0;
  std::int64_t sum_len0 = 0;  // Sum over active of (prompt - admitted).
  SimResult res;
  std::vector<Sample> waste_all, waste_sat, surplus_all, surplus_sat;
  double batch_all = 0, batch_sat = 0, w_all = 0, w_sat = 0;
  double waste_max_all = 0, waste_max_sat = 0;

  auto schedule = [&](std::size_t r) {
    const Live& l = live[r];
    const std::int64_t backed = alloc.Backed(l.id);
    const std::int64_t k = std::min(l.output, backed - l.prompt + 1);
    events.push({l.admitted + std::max<std::int64_t>(1, k), l.seq});
  };
  auto deactivate = [&](std::size_t r) {
    Live& l = live[r];
    alloc.Release(l.id);
    active.erase(l.seq);
    sum_len0 -= l.prompt - l.admitted;
    l.seq = 0;
  };
  auto preempt = [&](std::size_t r, std::int64_t t) {
    Live& l = live[r];
    const std::int64_t decoded =
        std::clamp<std::int64_t>(t - l.admitted - 1, 0, l.output - 1);
    deactivate(r);
    res.generated += decoded;
    l.prompt += decoded;
    l.output -= decoded;
    ++res.preemptions;
    waiting.push_front(r);
  };

  std::int64_t t = 0;
  for (;;) {
    while (next_arrival < requests.size() &&
           requests[next_arrival].arrival_step <= t) {
      waiting.push_back(next_arrival++);
    }
    // Decode step t: requests whose length crosses what they hold, or that
    // finish.
    while (!events.empty() && events.top().first <= t) {
      const std::uint64_t seq = events.top().second;
      events.pop();
      auto it = active.find(seq);
      if (it == active.end()) continue;  // Preempted meanwhile.
      const std::size_t r = it->second;
      Live& l = live[r];
      const std::int64_t len = l.prompt + (t - l.admitted);
      bool still = true;
      if (len > alloc.Backed(l.id)) {
        while (!alloc.Extend(l.id, len)) {
          const std::size_t victim = active.rbegin()->second;
          preempt(victim, t);
          if (victim == r) {
            still = false;
            break;
          }
        }
      }
      if (!still) continue;
      if (t - l.admitted >= l.output) {
        res.generated += l.output;
        ++res.completed;
        deactivate(r);
      } else {
        schedule(r);
      }
    }
    // Admission, first come first served.
    while (!waiting.empty()) {
      const std::size_t r = waiting.front();
      Live& l = live[r];
      int id = -1;
      if (alloc.Admit(l.prompt, &id)) {
        waiting.pop_front();
        l.id = id;
        l.admitted = t;
        l.seq = next_seq++;
        active.emplace(l.seq, r);
        sum_len0 += l.prompt - l.admitted;
        schedule(r);
      } else if (active.empty()) {
        waiting.pop_front();  // It cannot fit even alone.
        ++res.rejected;
      } else {
        break;
      }
    }
    const std::int64_t n = static_cast<std::int64_t>(active.size());
    res.peak_batch = std::max(res.peak_batch, n);
    std::int64_t t_next = -1;
    if (!events.empty()) t_next = events.top().first;
    if (next_arrival < requests.size()) {
      const std::int64_t a = requests[next_arrival].arrival_step;
      t_next = t_next < 0 ? a : std::min(t_next, a);
    }
    if (t_next < 0) break;  // Nothing active, nothing to come.
    t_next = std::max(t_next, t + 1);
    // Waste over [t, t_next): held is constant, the KV grows by n tokens a
    // step.
    const double dt = static_cast<double>(t_next - t);
    const double logical =
        static_cast<double>(bpt) * static_cast<double>(sum_len0 + n * t);
    const double waste0 = static_cast<double>(alloc.HeldBytes()) - logical;
    const double avg = waste0 - static_cast<double>(bpt) *
                                    static_cast<double>(n) * (dt - 1) / 2;
    const double surplus = static_cast<double>(alloc.SurplusBytes());
    waste_all.push_back({avg, dt});
    surplus_all.push_back({surplus, dt});
    batch_all += static_cast<double>(n) * dt;
    w_all += dt;
    waste_max_all = std::max(waste_max_all, waste0);
    if (!waiting.empty()) {
      waste_sat.push_back({avg, dt});
      surplus_sat.push_back({surplus, dt});
      batch_sat += static_cast<double>(n) * dt;
      w_sat += dt;
      waste_max_sat = std::max(waste_max_sat, waste0);
    }
    t = t_next;
  }
  res.steps = t;
  res.saturated_window = w_sat > 0;
  if (res.saturated_window) {
    res.mean_batch = batch_sat / w_sat;
    res.waste_p50 = WeightedMedian(std::move(waste_sat));
    res.surplus_p50 = WeightedMedian(std::move(surplus_sat));
    res.waste_max = waste_max_sat;
  } else {
    res.mean_batch = w_all > 0 ? batch_all / w_all : 0;
    res.waste_p50 = WeightedMedian(std::move(waste_all));
    res.surplus_p50 = WeightedMedian(std::move(surplus_all));
    res.waste_max = waste_max_all;
  }
  const double gen = static_cast<double>(std::max<std::int64_t>(1, res.generated));
  res.driver_calls_per_1k = 1000.0 * static_cast<double>(alloc.DriverCalls()) / gen;
  res.block_ops_per_1k = 1000.0 * static_cast<double>(alloc.BlockOps()) / gen;
  res.slot_limited = alloc.SlotLimited();
  res.notes = alloc.Notes();
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                              wall0)
                    .count();
  return res;
}

// ---- Flags, output ----------------------------------------------------------
struct Flags {
  std::vector<std::string> models;  // Empty: all.
  std::vector<std::int64_t> contexts = {8192, 32768, 131072};
  double memory_gib = 40;
  std::vector<std::string> mixes = {"uniform", "longtail"};
  std::vector<std::string> allocators;  // Empty: all.
  std::string trace;
  std::int64_t requests = 0;  // 0: automatic.
  std::uint64_t seed = 20240501;
  double step_ms = 20;
  std::string json;
  bool vattn_defer = true;             // KVCacheOptions.defer_reclaim.
  std::int64_t vattn_max_extent_mib = 0;  // 0: the library's default.
};

const char* kAllocators[] = {"vattn-token-major", "vattn-layer-major",
                             "paged-16", "paged-32", "static"};

struct Row {
  std::string model;
  std::string model_label;
  std::int64_t context = 0;
  std::string mix;
  std::string allocator;
  std::int64_t requests = 0;
  std::int64_t bytes_per_token = 0;
  SimResult r;
};

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += fmt::format("\\u{:04x}", static_cast<int>(c));
    } else {
      out += c;
    }
  }
  return out;
}

void WriteJson(const std::string& path, const Flags& f,
               const std::vector<Row>& rows) {
  std::ofstream out(path);
  if (!out) Die("cannot write " + path);
  out << "{\n";
  out << fmt::format("  \"seed\": {},\n  \"memory_gib\": {},\n", f.seed,
                     f.memory_gib);
  out << fmt::format(
      "  \"vattn_defer_reclaim\": {},\n  \"vattn_max_extent_mib\": {},\n",
      f.vattn_defer ? "true" : "false", f.vattn_max_extent_mib);
  out << fmt::format("  \"step_ms\": {},\n  \"trace\": \"{}\",\n", f.step_ms,
                     JsonEscape(f.trace));
  out << "  \"waste_definition\": \"bytes held for active requests minus "
         "their KV bytes; time-weighted over the window\",\n";
  out << "  \"results\": [\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& w = rows[i];
    const SimResult& r = w.r;
    out << fmt::format(
        "    {{\"model\": \"{}\", \"context\": {}, \"mix\": \"{}\", "
        "\"allocator\": \"{}\", \"requests\": {}, \"bytes_per_token\": {}, "
        "\"peak_batch\": {}, \"mean_batch\": {:.2f}, \"waste_p50_bytes\": "
        "{:.0f}, \"waste_max_bytes\": {:.0f}, \"surplus_p50_bytes\": {:.0f}, "
        "\"driver_calls_per_1k_tokens\": "
        "{:.4f}, \"block_ops_per_1k_tokens\": {:.4f}, \"generated_tokens\": "
        "{}, \"completed\": {}, \"preemptions\": {}, \"rejected\": {}, "
        "\"slot_limited\": {}, \"steps\": {}, \"window\": \"{}\", "
        "\"seconds\": {:.3f}, \"notes\": \"{}\"}}{}\n",
        w.model, w.context, w.mix, w.allocator, w.requests, w.bytes_per_token,
        r.peak_batch, r.mean_batch, r.waste_p50, r.waste_max, r.surplus_p50,
        r.driver_calls_per_1k, r.block_ops_per_1k, r.generated, r.completed,
        r.preemptions, r.rejected, r.slot_limited, r.steps,
        r.saturated_window ? "saturated" : "whole run", r.seconds,
        JsonEscape(r.notes), i + 1 < rows.size() ? "," : "");
  }
  out << "  ]\n}\n";
}

std::string ContextLabel(std::int64_t ctx) {
  if (ctx % 1024 == 0) return fmt::format("{}k", ctx / 1024);
  return fmt::format("{}", ctx);
}

// Grouped bars: one row per (model, context), two panels (mean batch while
// requests wait, waste p50 as % of memory), a group per mix, a bar per allocator.
void WriteSvg(const std::string& path, const Flags& f,
              const std::vector<Row>& rows) {
  const char* colors[] = {"#1b9e77", "#66a61e", "#d95f02", "#e6ab02",
                          "#7570b3"};
  std::vector<std::pair<std::string, std::int64_t>> panels;  // (model, ctx)
  std::vector<std::string> mixes;
  for (const Row& r : rows) {
    const auto key = std::make_pair(r.model, r.context);
    if (std::find(panels.begin(), panels.end(), key) == panels.end()) {
      panels.push_back(key);
    }
    if (std::find(mixes.begin(), mixes.end(), r.mix) == mixes.end()) {
      mixes.push_back(r.mix);
    }
  }
  const int n_alloc = 5;
  const double pw = 440, ph = 190, left = 60, top = 70, gap_x = 40,
               gap_y = 60;
  const double width = left + 2 * pw + gap_x + 20;
  const double height = top + static_cast<double>(panels.size()) * (ph + gap_y);
  std::ofstream out(path);
  if (!out) Die("cannot write " + path);
  out << fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" "
      "height=\"{:.0f}\" viewBox=\"0 0 {:.0f} {:.0f}\" "
      "font-family=\"DejaVu Sans, Arial, sans-serif\">\n",
      width, height, width, height);
  out << fmt::format(
      "<rect width=\"{:.0f}\" height=\"{:.0f}\" fill=\"white\"/>\n", width,
      height);
  out << fmt::format(
      "<text x=\"{:.0f}\" y=\"22\" font-size=\"16\" font-weight=\"bold\">"
      "KV capacity in {} GiB: batch and waste while requests wait "
      "(mean batch; p50 waste), seed {}</text>\n",
      left, f.memory_gib, f.seed);
  for (int a = 0; a < n_alloc; ++a) {
    const double x = left + a * 150.0;
    out << fmt::format(
        "<rect x=\"{:.0f}\" y=\"34\" width=\"12\" height=\"12\" "
        "fill=\"{}\"/><text x=\"{:.0f}\" y=\"45\" font-size=\"12\">{}</text>\n",
        x, colors[a], x + 16, kAllocators[a]);
  }
  auto find = [&](const std::string& model, std::int64_t ctx,
                  const std::string& mix, const char* alloc) -> const Row* {
    for (const Row& r : rows) {
      if (r.model == model && r.context == ctx && r.mix == mix &&
          r.allocator == alloc) {
        return &r;
      }
    }
    return nullptr;
  };
  const double memory = f.memory_gib * static_cast<double>(kGiB);
  for (std::size_t p = 0; p < panels.size(); ++p) {
    const auto& [model, ctx] = panels[p];
    const double y0 = top + static_cast<double>(p) * (ph + gap_y);
    std::string label = model;
    for (const Model& m : AllModels()) {
      if (m.name == model) label = m.label;
    }
    for (int k = 0; k < 2; ++k) {  // 0: batch, 1: waste %.
      const double x0 = left + k * (pw + gap_x);
      double vmax = 0;
      for (const std::string& mix : mixes) {
        for (const char* a : kAllocators) {
          const Row* r = find(model, ctx, mix, a);
          if (r == nullptr) continue;
          const double v = k == 0 ? r->r.mean_batch
                                  : 100.0 * r->r.waste_p50 / memory;
          vmax = std::max(vmax, v);
        }
      }
      if (vmax <= 0) vmax = 1;
      vmax *= 1.15;
      out << fmt::format(
          "<text x=\"{:.0f}\" y=\"{:.0f}\" font-size=\"12\" "
          "font-weight=\"bold\">{}, context {}: {}</text>\n",
          x0, y0 + 14, label, ContextLabel(ctx),
          k == 0 ? "mean batch under load" : "waste p50 (% of memory)");
      const double plot_top = y0 + 24, plot_h = ph - 44;
      const double base = plot_top + plot_h;
      for (int g = 0; g <= 4; ++g) {
        const double gy = base - plot_h * g / 4.0;
        out << fmt::format(
            "<line x1=\"{:.0f}\" y1=\"{:.1f}\" x2=\"{:.0f}\" y2=\"{:.1f}\" "
            "stroke=\"#ddd\"/><text x=\"{:.0f}\" y=\"{:.1f}\" "
            "font-size=\"10\" text-anchor=\"end\" fill=\"#555\">{:.{}f}"
            "</text>\n",
            x0, gy, x0 + pw, gy, x0 - 4, gy + 3, vmax / 1.15 * 1.15 * g / 4.0,
            k == 0 && vmax > 20 ? 0 : 1);
      }
      out << fmt::format(
          "<line x1=\"{:.0f}\" y1=\"{:.1f}\" x2=\"{:.0f}\" y2=\"{:.1f}\" "
          "stroke=\"#333\"/>\n",
          x0, base, x0 + pw, base);
      const double group_w = pw / static_cast<double>(mixes.size());
      const double bar_w = (group_w - 24) / n_alloc;
      for (std::size_t g = 0; g < mixes.size(); ++g) {
        const double gx = x0 + static_cast<double>(g) * group_w + 12;
        for (int a = 0; a < n_alloc; ++a) {
          const Row* r = find(model, ctx, mixes[g], kAllocators[a]);
          if (r == nullptr) continue;
          const double v = k == 0 ? r->r.mean_batch
                                  : 100.0 * r->r.waste_p50 / memory;
          const double h = plot_h * v / vmax;
          const double bx = gx + a * bar_w;
          out << fmt::format(
              "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" "
              "height=\"{:.1f}\" fill=\"{}\"><title>{} {} {}: {:.2f}</title>"
              "</rect>\n",
              bx + 1, base - h, bar_w - 2, h, colors[a], kAllocators[a],
              mixes[g], k == 0 ? "mean batch" : "waste %", v);
          out << fmt::format(
              "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"9\" "
              "text-anchor=\"middle\">{}</text>\n",
              bx + bar_w / 2, base - h - 3,
              k == 0 ? fmt::format("{:.0f}", v)
                     : (v >= 10 ? fmt::format("{:.0f}", v)
                                : fmt::format("{:.1f}", v)));
        }
        out << fmt::format(
            "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"12\" "
            "text-anchor=\"middle\">{}</text>\n",
            gx + (group_w - 24) / 2, base + 15, mixes[g]);
      }
    }
  }
  out << "</svg>\n";
}

// Comma-separated flag values, empty items dropped.
std::vector<std::string> SplitCommas(const std::string& v) {
  return absl::StrSplit(v, ',', absl::SkipEmpty());
}

bool ParseFlag(const char* arg, const char* name, std::string* value) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *value = arg + n + 1;
  return true;
}

void PrintHelp() {
  std::printf(
      "capacity: how many requests fit in a given KV memory, and the waste, "
      "per allocator\n"
      "(vattn token-major and layer-major driving the real library on the "
      "Host backend;\n"
      "paged blocks of 16 and 32 tokens and static max_tokens reservation "
      "modelled exactly)\n"
      "\n"
      "  --models=LIST       all (default) or a comma list of:");
  for (const Model& m : AllModels()) std::printf(" %s", m.name.c_str());
  std::printf(
      "\n"
      "  --max_context=LIST  context lengths (max tokens per request), comma "
      "list\n"
      "                      (default 8192,32768,131072)\n"
      "  --memory_gib=G      KV memory per GPU, GiB (default 40)\n"
      "  --mixes=LIST        request-length mixes: uniform (prompt and "
      "output each uniform in\n"
      "                      [1, context/2]), longtail (log-normal, "
      "ShareGPT-like: prompt\n"
      "                      median 200, output median 250, sigma 1.0, "
      "clipped to the context)\n"
      "                      production (Poisson arrivals at 1.1x what the "
      "memory serves;\n"
      "                      log-normal prompt median 1500, p99 ~7.4k, output "
      "median 13),\n"
      "                      chat (the same arrivals; prompt median 1000, "
      "output median 130)\n"
      "                      (default uniform,longtail)\n"
      "  --allocators=LIST   all (default) or a comma list of: "
      "vattn-token-major,\n"
      "                      vattn-layer-major, paged-16, paged-32, static\n"
      "  --trace=FILE        add the mix 'trace' from a CSV with a header: "
      "arrival,prompt_tokens,output_tokens\n"
      "                      (arrival in seconds; prompt+output clipped to "
      "the context)\n"
      "  --step_ms=MS        decode step time that turns trace arrivals into "
      "steps (default 20)\n"
      "  --requests=N        synthetic requests per run (default 0: "
      "automatic, about 4x what\n"
      "                      fits, 200..20000)\n"
      "  --seed=S            RNG seed (default 20240501; printed)\n"
      "  --vattn_defer_reclaim=BOOL  vattn's KVCacheOptions.defer_reclaim "
      "(default true)\n"
      "  --vattn_max_extent_mib=N    vattn's KVCacheOptions.max_extent_bytes "
      "in MiB (default 0:\n"
      "                      the library's default, 8 MiB)\n"
      "  --json=FILE         write the results as JSON, and a picture (SVG) "
      "beside it\n"
      "                      (FILE with .svg for its extension)\n"
      "  --help              this text\n"
      "\n"
      "Synthetic requests are all queued at step 0; admission is FCFS when "
      "the prompt fits;\n"
      "a decode step that finds no memory preempts the newest request "
      "(recompute).\n"
      "Batch and waste are measured while requests wait (the memory-bound "
      "part of the run).\n"
      "Waste = bytes held for active requests - their KV bytes. Paged and "
      "static make no\n"
      "driver calls at run time (one tensor allocated up front, as vLLM "
      "does).\n");
}

long RssKiB() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    std::string v;
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      PrintHelp();
      return 0;
    } else if (ParseFlag(argv[i], "--models", &v)) {
      if (v != "all") f.models = SplitCommas(v);
    } else if (ParseFlag(argv[i], "--max_context", &v)) {
      f.contexts.clear();
      for (const std::string& c : SplitCommas(v)) {
        f.contexts.push_back(std::stoll(c));
      }
    } else if (ParseFlag(argv[i], "--memory_gib", &v)) {
      f.memory_gib = std::stod(v);
    } else if (ParseFlag(argv[i], "--mixes", &v)) {
      f.mixes = SplitCommas(v);
    } else if (ParseFlag(argv[i], "--allocators", &v)) {
      if (v != "all") f.allocators = SplitCommas(v);
    } else if (ParseFlag(argv[i], "--trace", &v)) {
      f.trace = v;
    } else if (ParseFlag(argv[i], "--requests", &v)) {
      f.requests = std::stoll(v);
    } else if (ParseFlag(argv[i], "--seed", &v)) {
      f.seed = std::stoull(v);
    } else if (ParseFlag(argv[i], "--step_ms", &v)) {
      f.step_ms = std::stod(v);
    } else if (ParseFlag(argv[i], "--vattn_defer_reclaim", &v)) {
      f.vattn_defer = !(v == "false" || v == "0" || v == "no");
    } else if (ParseFlag(argv[i], "--vattn_max_extent_mib", &v)) {
      f.vattn_max_extent_mib = std::stoll(v);
    } else if (ParseFlag(argv[i], "--json", &v)) {
      f.json = v;
    } else {
      Die(fmt::format("unknown flag '{}' (see --help)", argv[i]));
    }
  }
  std::vector<Model> models;
  for (const Model& m : AllModels()) {
    if (f.models.empty() ||
        std::find(f.models.begin(), f.models.end(), m.name) != f.models.end()) {
      models.push_back(m);
    }
  }
  if (models.empty()) Die("no model matches --models (see --help)");
  for (const std::string& mix : f.mixes) {
    if (mix != "uniform" && mix != "longtail" &&
        FindArrivalMix(mix) == nullptr) {
      Die("unknown mix '" + mix +
          "' (uniform, longtail, production, chat; --trace adds trace)");
    }
  }
  for (const std::string& a : f.allocators) {
    if (std::find(std::begin(kAllocators), std::end(kAllocators), a) ==
        std::end(kAllocators)) {
      Die("unknown allocator '" + a +
          "' (vattn-token-major, vattn-layer-major, paged-16, paged-32, "
          "static)");
    }
  }
  for (std::int64_t c : f.contexts) {
    if (c < 2) Die("--max_context values must be >= 2");
  }
  if (f.memory_gib <= 0) Die("--memory_gib must be positive");
  const std::int64_t memory =
      static_cast<std::int64_t>(f.memory_gib * static_cast<double>(kGiB)) /
      kGranule * kGranule;
  std::vector<std::string> mixes = f.mixes;
  std::vector<TraceRow> trace;
  if (!f.trace.empty()) {
    trace = ReadTrace(f.trace);
    mixes.push_back("trace");
  }

  std::printf(
      "capacity: seed %llu, KV memory %.1f GiB, step %.0f ms, vattn "
      "defer_reclaim %s, max_extent %s%s%s\n",
      static_cast<unsigned long long>(f.seed), f.memory_gib, f.step_ms,
      f.vattn_defer ? "on" : "off",
      f.vattn_max_extent_mib > 0
          ? fmt::format("{} MiB", f.vattn_max_extent_mib).c_str()
          : "default",
      f.trace.empty() ? "" : ", trace ", f.trace.c_str());
  const long rss0 = RssKiB();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Row> rows;
  for (const Model& m : models) {
    const std::int64_t bpt = m.BytesPerToken();
    for (std::int64_t ctx : f.contexts) {
      std::printf(
          "\n%s (%d layers, %d KV heads, dim %d, fp16: %lld KiB/token), "
          "context %lld\n",
          m.label.c_str(), m.layers, m.kv_heads, m.head_dim,
          static_cast<long long>(bpt / 1024), static_cast<long long>(ctx));
      std::printf("%-9s %-18s %6s %6s %7s %9s %9s %9s %11s %7s  %s\n", "mix",
                  "allocator", "reqs", "peak", "mean", "waste50", "wasteMax",
                  "waste50%", "calls/1ktok", "preempt", "notes");
      for (std::size_t mi = 0; mi < mixes.size(); ++mi) {
        const std::string& mix = mixes[mi];
        std::vector<Request> reqs;
        if (mix == "trace") {
          reqs = FromTrace(trace, ctx, f.step_ms);
        } else {
          // Same stream for every model: seed mixed with the context and mix.
          const std::uint64_t seed = f.seed * 1000003u +
                                     static_cast<std::uint64_t>(ctx) * 31u +
                                     mi;
          const std::vector<Request> probe =
              MakeSynthetic(mix, ctx, 1000, seed);
          double mean_len = 0;
          double mean_output = 0;
          for (const Request& r : probe) {
            mean_len += static_cast<double>(r.prompt + r.output);
            mean_output += static_cast<double>(r.output);
          }
          mean_len /= static_cast<double>(probe.size());
          mean_output /= static_cast<double>(probe.size());
          const double fit = static_cast<double>(memory) /
                             (static_cast<double>(bpt) * mean_len);
          const bool continuous = FindArrivalMix(mix) != nullptr;
          std::size_t n = static_cast<std::size_t>(f.requests);
          if (n == 0) {
            // Continuous mixes run long enough for many generations of
            // requests to pass through the memory (slots are reused).
            n = static_cast<std::size_t>(std::clamp(
                (continuous ? 30.0 : 4.0) * fit, continuous ? 2000.0 : 200.0,
                20000.0));
          }
          // The rate the memory can serve: `fit` requests resident, each
          // for about mean_output steps.
          const double rate =
              continuous ? kArrivalLoad * fit / std::max(1.0, mean_output) : 0;
          reqs = MakeSynthetic(mix, ctx, n, seed, rate);
        }
        for (const char* name : kAllocators) {
          std::unique_ptr<Allocator> alloc;
          const std::string a = name;
          if (!f.allocators.empty() &&
              std::find(f.allocators.begin(), f.allocators.end(), a) ==
                  f.allocators.end()) {
            continue;
          }
          if (a == "vattn-token-major") {
            alloc = std::make_unique<VattnAllocator>(
                m, vattn::Layout::kTokenMajor, memory, ctx,
                static_cast<std::int64_t>(reqs.size()), f.vattn_defer,
                f.vattn_max_extent_mib);
          } else if (a == "vattn-layer-major") {
            alloc = std::make_unique<VattnAllocator>(
                m, vattn::Layout::kLayerMajor, memory, ctx,
                static_cast<std::int64_t>(reqs.size()), f.vattn_defer,
                f.vattn_max_extent_mib);
          } else if (a == "paged-16") {
            alloc = std::make_unique<PagedAllocator>(memory, bpt, 16);
          } else if (a == "paged-32") {
            alloc = std::make_unique<PagedAllocator>(memory, bpt, 32);
          } else {
            alloc = std::make_unique<StaticAllocator>(memory, bpt, ctx);
          }
          Row row;
          row.model = m.name;
          row.model_label = m.label;
          row.context = ctx;
          row.mix = mix;
          row.allocator = a;
          row.requests = static_cast<std::int64_t>(reqs.size());
          row.bytes_per_token = bpt;
          row.r = Simulate(*alloc, reqs, bpt);
          alloc.reset();
          const SimResult& r = row.r;
          std::string notes;
          if (a.rfind("paged", 0) == 0) {
            notes = fmt::format("{:.1f} block allocs/1ktok (user space)",
                                r.block_ops_per_1k);
          } else if (a.rfind("vattn", 0) == 0) {
            notes = fmt::format("surplus p50 {:.2f}G", r.surplus_p50 / kGiB);
          }
          if (!r.saturated_window) notes += " [never saturated: whole run]";
          if (r.slot_limited > 0) {
            notes += fmt::format(" [slot-limited {}x]", r.slot_limited);
          }
          if (r.rejected > 0) notes += fmt::format(" [{} rejected]", r.rejected);
          std::printf(
              "%-9s %-18s %6lld %6lld %7.1f %8.2fG %8.2fG %8.1f%% %11.2f %7lld "
              " %s\n",
              mix.c_str(), a.c_str(), static_cast<long long>(row.requests),
              static_cast<long long>(r.peak_batch), r.mean_batch,
              r.waste_p50 / kGiB, r.waste_max / kGiB,
              100.0 * r.waste_p50 / static_cast<double>(memory),
              r.driver_calls_per_1k, static_cast<long long>(r.preemptions),
              notes.c_str());
          rows.push_back(std::move(row));
        }
      }
    }
  }
  const double secs = std::chrono::duration<double>(
                          std::chrono::steady_clock::now() - t0)
                          .count();
  const long rss1 = RssKiB();
  std::printf(
      "\n%zu runs in %.1f s; RSS %ld -> %ld KiB (the Host backend's memory is "
      "never touched)\n",
      rows.size(), secs, rss0, rss1);
  if (!f.json.empty()) {
    WriteJson(f.json, f, rows);
    std::string svg = f.json;
    const std::size_t dot = svg.find_last_of('.');
    const std::size_t slash = svg.find_last_of('/');
    if (dot != std::string::npos &&
        (slash == std::string::npos || dot > slash)) {
      svg.resize(dot);
    }
    svg += ".svg";
    WriteSvg(svg, f, rows);
    std::printf("wrote %s and %s\n", f.json.c_str(), svg.c_str());
  }
  return 0;
}
