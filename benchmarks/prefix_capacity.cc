// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Prefix sharing (issue 13): memory, batch and driver calls of three
// allocators on workloads that repeat prefixes, in the same run:
//  * vattn, no sharing: the REAL library (KVCache on the latency-model
//    backend over the Host backend, H200 costs) where every request holds
//    its own copy of what it shares (a private prefill of the prefix, a
//    fork re-prefilled);
//  * vattn, sharing: the same library and backend through KeepPrefix,
//    AllocSlotWithPrefix, DropPrefix and Fork (whole extents aliased, the
//    partly shared tail copied at share time);
//  * paged/16: an exact accounting model of a block allocator with 16-token
//    blocks shared by reference count (vLLM's prefix caching and fork): a
//    request that writes into a block someone else also references first
//    copies it (copy-on-write of a partly filled last block).
// Nothing is written but what the library copies itself, so the Host
// backend's memfds stay sparse. Deterministic (seeded; the seed is printed)
// apart from the times.
//
//   prefix_capacity [--model=llama3-8b|yi-6b|mistral-7b|llama3-70b-tp8]
//       [--memory_gib=G] [--workloads=system,chat,fork] [--requests=N]
//       [--prefix=TOKENS] [--turns=T] [--samples=K] [--max_extent_tokens=T]
//       [--repeats=R] [--seed=S] [--costs=h200|zero] [--help]
//
// The workloads (requests decode token by token to their full length; a
// Grow is made where a request crosses its backed tokens, as a decode loop
// would make it):
//  * system: N requests behind one --prefix-token system prompt (default
//    2048), each with its own message (16..256 tokens) and output
//    (64..512). The first request prefills the prompt as its own extent
//    (Grow to the boundary first: the hint issue 13 describes) and keeps it
//    (KeepPrefix); the others start with AllocSlotWithPrefix.
//  * chat: N/4 conversations of --turns turns (default 4); each turn's
//    request is the whole history plus a new message (16..256), decoded
//    64..512 tokens. At the end of a turn the history (prompt and output) is
//    kept as a prefix, the request freed, the next turn's request started
//    with AllocSlotWithPrefix and the prefix dropped (its extents live on in
//    the new slot). Without sharing the next turn prefills the history again.
//  * fork: N/--samples prompts (256..2048 tokens), each prefilled once (with
//    the split hint at the prompt's end, so its whole granules are one
//    extent and its partly filled last granule another) and forked into
//    --samples sequences (parallel sampling, n = 4) that decode 64..512
//    tokens each.
//
// Reported per workload and allocator:
//  * memory with every request of the workload at its full length: bytes
//    held for requests and kept prefixes (vattn: physical bytes less pooled
//    handles, freed slots unmapped at once; paged: blocks referenced x block
//    bytes), and the ratio to paged's;
//  * batch: requests (sequences) at full length that fit --memory_gib
//    (vattn: memory_budget_bytes; paged: a pool of that many bytes of
//    blocks), the workload's requests generated until the first that does
//    not fit;
//  * per shared request (AllocSlotWithPrefix or Fork alone): driver calls
//    (create, map, unmap, destroy from CacheStats) and copies (CacheStats'
//    copy-on-write bytes / granule; a paged block copy is a kernel launch,
//    no driver call), and its time (median and max over the shares, and the
//    median's range over --repeats runs) on the latency model; for vattn
//    without sharing the same columns for the calls that replace the share
//    (AllocSlot + Grow of the shared tokens);
//  * prefill tokens: tokens a model would have to compute into the cache.
// Target (issue 13): vattn with sharing within 1.05x of paged's memory and
// batch, at <= 3 driver calls per shared request.

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "fmt/core.h"
#include "vattn/vattn.h"

namespace {

constexpr std::int64_t kMiB = std::int64_t{1} << 20;
constexpr std::int64_t kGiB = std::int64_t{1} << 30;
constexpr std::int64_t kGranule = 2 * kMiB;  // Host backend and NVIDIA GPUs.
constexpr std::int64_t kBlockTokens = 16;    // The paged baseline's blocks.

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "prefix_capacity: %s\n", msg.c_str());
  std::exit(1);
}

struct Model {
  const char* name;
  int layers;
  int kv_heads;
  int head_dim;
  std::int64_t BytesPerToken() const {
    return std::int64_t{2} * layers * kv_heads * head_dim * 2;  // fp16
  }
};
constexpr Model kModels[] = {
    {"llama3-8b", 32, 8, 128},
    {"mistral-7b", 32, 8, 128},
    {"yi-6b", 32, 4, 128},
    {"llama3-70b-tp8", 80, 1, 128},
};

// ---- The allocators ------------------------------------------------------------

// What a share (AllocSlotWithPrefix, Fork, or what replaces it) cost.
struct ShareCost {
  std::int64_t creates = 0, maps = 0, unmaps = 0, destroys = 0, set_access = 0,
               copies = 0;
  double seconds = 0;
  // Every backend call that reaches the driver (on CUDA: cuMemCreate,
  // cuMemMap with its cuMemSetAccess, cuMemUnmap, cuMemRelease, a later
  // cuMemSetAccess turning a mapping read-only, a device copy).
  std::int64_t DriverCalls() const {
    return creates + maps + unmaps + destroys + set_access + copies;
  }
};

// One allocator behind the workloads. Request ids are the allocator's own.
// A call that runs out of memory returns false (or -1) and changes nothing
// the workload relies on.
class Allocator {
 public:
  virtual ~Allocator() = default;
  // A new request with `prompt` tokens prefilled. boundary > 0: tokens
  // [0, boundary) will be kept as a prefix (vattn maps them as their own
  // extent first so they can be shared whole).
  virtual int Start(std::int64_t prompt, std::int64_t boundary) = 0;
  // Decodes the request up to `tokens`, token by token.
  virtual bool Extend(int id, std::int64_t tokens) = 0;
  virtual void Keep(int id, std::int64_t tokens, std::uint64_t prefix) = 0;
  // A request of `tokens` tokens whose first ones are the prefix's.
  virtual int StartWithPrefix(std::uint64_t prefix, std::int64_t tokens) = 0;
  virtual int Fork(int id) = 0;
  virtual void Drop(std::uint64_t prefix) = 0;
  virtual void Finish(int id) = 0;
  virtual std::int64_t HeldBytes() const = 0;
  virtual std::string Notes() const { return ""; }
  // Copies per share when they do not happen at share time (paged copies a
  // block at the first write into it); < 0: counted per share.
  virtual double CopiesPerShare() const { return -1; }

  const std::vector<ShareCost>& shares() const { return shares_; }
  std::int64_t prefill_tokens() const { return prefill_tokens_; }

 protected:
  std::vector<ShareCost> shares_;
  std::int64_t prefill_tokens_ = 0;
};

// ---- paged/16 with reference counts -----------------------------------------
class PagedAllocator final : public Allocator {
 public:
  PagedAllocator(std::int64_t bytes_per_token, std::int64_t memory)
      : block_bytes_(bytes_per_token * kBlockTokens),
        capacity_(memory > 0 ? memory / block_bytes_ : (std::int64_t{1} << 40)) {}

  int Start(std::int64_t prompt, std::int64_t /*boundary*/) override {
    const int id = NewSeq();
    if (!Write(seqs_[static_cast<std::size_t>(id)], prompt)) {
      Finish(id);
      return -1;
    }
    prefill_tokens_ += prompt;
    return id;
  }
  bool Extend(int id, std::int64_t tokens) override {
    return Write(seqs_[static_cast<std::size_t>(id)], tokens);
  }
  void Keep(int id, std::int64_t tokens, std::uint64_t prefix) override {
    const Seq& s = seqs_[static_cast<std::size_t>(id)];
    Seq p;
    p.len = tokens;
    p.blocks.assign(s.blocks.begin(), s.blocks.begin() + Blocks(tokens));
    for (std::int64_t b : p.blocks) ++ref_[static_cast<std::size_t>(b)];
    prefixes_[prefix] = std::move(p);
  }
  int StartWithPrefix(std::uint64_t prefix, std::int64_t tokens) override {
    const auto it = prefixes_.find(prefix);
    if (it == prefixes_.end()) Die("paged: unknown prefix");
    ShareCost cost;
    const std::int64_t copies0 = copies_;
    const int id = NewSeq();
    Seq& s = seqs_[static_cast<std::size_t>(id)];
    const std::int64_t shared = std::min(tokens, it->second.len);
    s.blocks.assign(it->second.blocks.begin(),
                    it->second.blocks.begin() + Blocks(shared));
    for (std::int64_t b : s.blocks) ++ref_[static_cast<std::size_t>(b)];
    s.len = shared;
    if (!Write(s, tokens)) {
      Finish(id);
      return -1;
    }
    prefill_tokens_ += tokens - shared;
    cost.copies = copies_ - copies0;
    shares_.push_back(cost);
    return id;
  }
  int Fork(int id) override {
    const int child = NewSeq();
    Seq& c = seqs_[static_cast<std::size_t>(child)];
    c = seqs_[static_cast<std::size_t>(id)];
    for (std::int64_t b : c.blocks) ++ref_[static_cast<std::size_t>(b)];
    shares_.push_back(ShareCost{});  // Copies come at the first write.
    return child;
  }
  void Drop(std::uint64_t prefix) override {
    const auto it = prefixes_.find(prefix);
    if (it == prefixes_.end()) Die("paged: unknown prefix");
    for (std::int64_t b : it->second.blocks) Unref(b);
    prefixes_.erase(it);
  }
  void Finish(int id) override {
    Seq& s = seqs_[static_cast<std::size_t>(id)];
    for (std::int64_t b : s.blocks) Unref(b);
    s = Seq{};
    free_ids_.push_back(id);
  }
  std::int64_t HeldBytes() const override { return used_ * block_bytes_; }
  double CopiesPerShare() const override {
    return shares_.empty() ? 0
                           : static_cast<double>(copies_) / static_cast<double>(shares_.size());
  }
  std::string Notes() const override {
    return fmt::format("{} block copies (copy-on-write)", copies_);
  }

 private:
  struct Seq {
    std::vector<std::int64_t> blocks;
    std::int64_t len = 0;
  };
  static std::int64_t Blocks(std::int64_t tokens) {
    return (tokens + kBlockTokens - 1) / kBlockTokens;
  }
  int NewSeq() {
    if (!free_ids_.empty()) {
      const int id = free_ids_.back();
      free_ids_.pop_back();
      return id;
    }
    seqs_.emplace_back();
    return static_cast<int>(seqs_.size() - 1);
  }
  std::int64_t NewBlock() {
    if (used_ >= capacity_) return -1;
    ++used_;
    std::int64_t b;
    if (!free_blocks_.empty()) {
      b = free_blocks_.back();
      free_blocks_.pop_back();
    } else {
      b = static_cast<std::int64_t>(ref_.size());
      ref_.push_back(0);
    }
    ref_[static_cast<std::size_t>(b)] = 1;
    return b;
  }
  void Unref(std::int64_t b) {
    if (--ref_[static_cast<std::size_t>(b)] == 0) {
      --used_;
      free_blocks_.push_back(b);
    }
  }
  // Appends tokens up to `tokens`: the first write into a partly filled
  // block that another sequence or prefix references copies it.
  bool Write(Seq& s, std::int64_t tokens) {
    if (tokens <= s.len) return true;
    if (s.len % kBlockTokens != 0) {
      std::int64_t& last = s.blocks.back();
      if (ref_[static_cast<std::size_t>(last)] > 1) {
        const std::int64_t fresh = NewBlock();
        if (fresh < 0) return false;
        Unref(last);
        last = fresh;
        ++copies_;
      }
    }
    while (static_cast<std::int64_t>(s.blocks.size()) < Blocks(tokens)) {
      const std::int64_t b = NewBlock();
      if (b < 0) return false;
      s.blocks.push_back(b);
    }
    s.len = tokens;
    return true;
  }

  const std::int64_t block_bytes_;
  const std::int64_t capacity_;  // Blocks.
  std::int64_t used_ = 0;
  std::int64_t copies_ = 0;
  std::vector<int> ref_;
  std::vector<std::int64_t> free_blocks_;
  std::vector<Seq> seqs_;
  std::vector<int> free_ids_;
  std::map<std::uint64_t, Seq> prefixes_;
};

// ---- vattn (the real library), with or without sharing -------------------------
class VattnAllocator final : public Allocator {
 public:
  VattnAllocator(const Model& m, std::int64_t memory, std::int64_t max_tokens,
                 std::int64_t max_extent_tokens, bool share,
                 const vattn::LatencyCosts& costs)
      : share_(share) {
    vattn::HostBackendOptions host_opts;
    host_opts.physical_limit_bytes = std::size_t{1} << 44;  // Never touched.
    absl::StatusOr<std::shared_ptr<vattn::Backend>> host =
        vattn::MakeHostBackend(host_opts);
    if (!host.ok()) Die("MakeHostBackend: " + host.status().ToString());
    absl::StatusOr<std::shared_ptr<vattn::Backend>> backend =
        vattn::MakeLatencyModelBackend(*host, costs);
    if (!backend.ok()) Die("MakeLatencyModelBackend: " + backend.status().ToString());
    vattn::KVCacheOptions o;
    o.num_layers = m.layers;
    o.num_kv_heads = m.kv_heads;
    o.head_dim = m.head_dim;
    o.dtype = vattn::DType::kFloat16;
    o.max_tokens = max_tokens;
    o.memory_budget_bytes = static_cast<std::size_t>(memory);
    o.map_ahead_tokens = 0;
    o.defer_reclaim = false;  // A freed request's memory is not held.
    if (max_extent_tokens > 0) o.max_extent_tokens = max_extent_tokens;
    // A request holds at least one granule; enough slots for every one that
    // fits, within the address space the Host backend reserves.
    const std::int64_t slot_virtual =
        (max_tokens * m.BytesPerToken() + kGranule - 1) / kGranule * kGranule;
    const std::int64_t by_va =
        static_cast<std::int64_t>(host_opts.max_reservation_bytes) / slot_virtual;
    const std::int64_t by_memory = memory > 0 ? memory / kGranule : 4096;
    o.max_slots = static_cast<int>(std::clamp<std::int64_t>(
        std::min(by_va, by_memory), 1, std::int64_t{1} << 16));
    absl::StatusOr<std::unique_ptr<vattn::KVCache>> cache =
        vattn::KVCache::Create(o, *backend);
    if (!cache.ok()) Die("KVCache::Create: " + cache.status().ToString());
    cache_ = std::move(*cache);
  }

  int Start(std::int64_t prompt, std::int64_t boundary) override {
    // With sharing, the prefix boundary is mapped as its own extent, so
    // the prefix is shared whole (AllocSlot's split hint).
    absl::StatusOr<int> slot =
        share_ ? cache_->AllocSlot(prompt, boundary) : cache_->AllocSlot(prompt);
    if (!slot.ok()) return Refused("AllocSlot", slot.status());
    if (!GrowOrFree(*slot, prompt)) return -1;
    prefill_tokens_ += prompt;
    return *slot;
  }
  bool Extend(int id, std::int64_t tokens) override {
    std::int64_t backed = Info(id).backed_tokens;
    while (backed < tokens) {
      const absl::Status s = cache_->Grow(id, backed + 1);
      if (!s.ok()) {
        if (s.code() == absl::StatusCode::kResourceExhausted) return false;
        Die("Grow: " + s.ToString());
      }
      backed = Info(id).backed_tokens;
    }
    if (Info(id).length < tokens) {
      const absl::Status s = cache_->Grow(id, tokens);
      if (!s.ok()) Die("Grow: " + s.ToString());
    }
    return true;
  }
  void Keep(int id, std::int64_t tokens, std::uint64_t prefix) override {
    kept_[prefix] = tokens;  // Without sharing only its length: nothing held.
    if (!share_) return;
    const absl::Status s = cache_->KeepPrefix(id, tokens, prefix);
    if (!s.ok()) Die("KeepPrefix: " + s.ToString());
  }
  int StartWithPrefix(std::uint64_t prefix, std::int64_t tokens) override {
    const vattn::CacheStats before = cache_->Stats();
    const auto t0 = std::chrono::steady_clock::now();
    int slot = -1;
    if (share_) {
      absl::StatusOr<int> got = cache_->AllocSlotWithPrefix(prefix, tokens, tokens);
      if (!got.ok()) return Refused("AllocSlotWithPrefix", got.status());
      slot = *got;
    } else {
      // A private copy: the request prefills the shared tokens itself.
      absl::StatusOr<int> got = cache_->AllocSlot(tokens);
      if (!got.ok()) return Refused("AllocSlot", got.status());
      slot = *got;
      if (!GrowOrFree(slot, tokens)) return -1;
    }
    Record(before, std::chrono::steady_clock::now() - t0);
    // Only the tokens past the prefix are computed when it is shared.
    const auto kept = kept_.find(prefix);
    const std::int64_t shared =
        share_ && kept != kept_.end() ? std::min(tokens, kept->second) : 0;
    prefill_tokens_ += tokens - shared;
    return slot;
  }
  int Fork(int id) override {
    const vattn::CacheStats before = cache_->Stats();
    const auto t0 = std::chrono::steady_clock::now();
    int child = -1;
    if (share_) {
      absl::StatusOr<int> got = cache_->Fork(id);
      if (!got.ok()) return Refused("Fork", got.status());
      child = *got;
    } else {
      const std::int64_t len = Info(id).length;
      absl::StatusOr<int> got = cache_->AllocSlot(len);
      if (!got.ok()) return Refused("AllocSlot", got.status());
      child = *got;
      if (!GrowOrFree(child, len)) return -1;
      prefill_tokens_ += len;
    }
    Record(before, std::chrono::steady_clock::now() - t0);
    return child;
  }
  void Drop(std::uint64_t prefix) override {
    kept_.erase(prefix);
    if (!share_) return;
    const absl::Status s = cache_->DropPrefix(prefix);
    if (!s.ok()) Die("DropPrefix: " + s.ToString());
  }
  void Finish(int id) override {
    const absl::Status s = cache_->Free(id, vattn::kNoFence);
    if (!s.ok()) Die("Free: " + s.ToString());
  }
  std::int64_t HeldBytes() const override {
    const vattn::CacheStats s = cache_->Stats();
    return s.physical_bytes - s.pooled_bytes;
  }
  std::string Notes() const override {
    const vattn::CacheStats s = cache_->Stats();
    return fmt::format(
        "shared {:.1f} MiB (saved {:.1f} MiB), prefix hits {}, forks {}, "
        "copy-on-write {:.1f} MiB in {} copies, set-access {}, creates {}, maps {}, "
        "unmaps {}, destroys {}, peak physical {:.2f} GiB",
        static_cast<double>(s.shared_bytes) / kMiB,
        static_cast<double>(s.shared_saved_bytes) / kMiB, s.prefix_hits, s.forks,
        static_cast<double>(s.cow_copied_bytes) / kMiB, s.copy_calls, s.set_access_calls,
        s.create_calls, s.map_calls, s.unmap_calls, s.destroy_calls,
        static_cast<double>(s.peak_physical_bytes) / kGiB);
  }

 private:
  int Refused(const char* call, const absl::Status& s) {
    if (s.code() == absl::StatusCode::kResourceExhausted) return -1;
    Die(std::string(call) + ": " + s.ToString());
  }
  bool GrowOrFree(int slot, std::int64_t tokens) {
    const absl::Status s = cache_->Grow(slot, tokens);
    if (s.ok()) return true;
    if (s.code() != absl::StatusCode::kResourceExhausted) Die("Grow: " + s.ToString());
    Finish(slot);
    return false;
  }
  vattn::SlotInfo Info(int slot) const {
    absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(slot);
    if (!info.ok()) Die("GetSlot: " + info.status().ToString());
    return *info;
  }
  void Record(const vattn::CacheStats& b, std::chrono::steady_clock::duration d) {
    const vattn::CacheStats a = cache_->Stats();
    ShareCost c;
    c.creates = a.create_calls - b.create_calls;
    c.maps = a.map_calls - b.map_calls;
    c.unmaps = a.unmap_calls - b.unmap_calls;
    c.destroys = a.destroy_calls - b.destroy_calls;
    c.set_access = a.set_access_calls - b.set_access_calls;
    c.copies = a.copy_calls - b.copy_calls;  // Copy-on-write of the tail.
    c.seconds = std::chrono::duration<double>(d).count();
    shares_.push_back(c);
  }

  const bool share_;
  std::unique_ptr<vattn::KVCache> cache_;
  std::map<std::uint64_t, std::int64_t> kept_;  // Prefix lengths.
};

// ---- Workloads -------------------------------------------------------------------
struct Params {
  std::int64_t prefix = 2048;
  int requests = 64;
  int turns = 4;
  int samples = 4;
  std::int64_t max_tokens = 8192;
  std::uint64_t seed = 1;
};

// The fixed mt19937_64 sequence with an explicit mapping (the standard
// distributions are implementation-defined).
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : gen_(seed) {}
  std::int64_t Uniform(std::int64_t lo, std::int64_t hi) {
    return lo + static_cast<std::int64_t>(gen_() % static_cast<std::uint64_t>(hi - lo + 1));
  }

 private:
  std::mt19937_64 gen_;
};

// Each workload runs `limit` requests (sequences), or until one does not
// fit when limit < 0. Returns the requests at full length at the end.
int RunSystem(Allocator& a, const Params& p, int limit) {
  Rng rng(p.seed);
  const std::uint64_t kPrefixId = 1;
  int done = 0;
  for (int i = 0; limit < 0 || i < limit; ++i) {
    const std::int64_t msg = rng.Uniform(16, 256);
    const std::int64_t out = rng.Uniform(64, 512);
    const std::int64_t prompt = p.prefix + msg;
    int id;
    if (i == 0) {
      id = a.Start(prompt, p.prefix);
      if (id < 0) break;
      a.Keep(id, p.prefix, kPrefixId);
    } else {
      id = a.StartWithPrefix(kPrefixId, prompt);
      if (id < 0) break;
    }
    if (!a.Extend(id, prompt + out)) {
      a.Finish(id);
      break;
    }
    ++done;
  }
  return done;
}

int RunChat(Allocator& a, const Params& p, int limit) {
  Rng rng(p.seed + 1);
  int done = 0;
  std::uint64_t next_prefix = 100;
  for (int c = 0; limit < 0 || c < limit; ++c) {
    std::int64_t prompt = rng.Uniform(64, 512);
    std::int64_t out = rng.Uniform(64, 512);
    int id = a.Start(prompt, 0);
    if (id < 0) break;
    bool ok = a.Extend(id, prompt + out);
    for (int t = 1; ok && t < p.turns; ++t) {
      const std::int64_t history = prompt + out;
      const std::int64_t msg = rng.Uniform(16, 256);
      out = rng.Uniform(64, 512);
      prompt = history + msg;
      if (prompt + out > p.max_tokens) {
        out = std::max<std::int64_t>(1, p.max_tokens - prompt);
      }
      const std::uint64_t pid = next_prefix++;
      a.Keep(id, history, pid);
      a.Finish(id);
      id = a.StartWithPrefix(pid, prompt);
      a.Drop(pid);
      if (id < 0) {
        ok = false;
        break;
      }
      ok = a.Extend(id, prompt + out);
    }
    if (!ok) {
      if (id >= 0) a.Finish(id);
      break;
    }
    ++done;
  }
  return done;
}

int RunFork(Allocator& a, const Params& p, int limit) {
  Rng rng(p.seed + 2);
  int done = 0;
  while (limit < 0 || done + p.samples <= limit) {
    const std::int64_t prompt = rng.Uniform(256, 2048);
    std::vector<std::int64_t> outs;
    for (int k = 0; k < p.samples; ++k) outs.push_back(rng.Uniform(64, 512));
    // The engine knows it will fork: the prompt's whole granules as one
    // extent (the split hint at the prompt's end), so a fork aliases them and
    // copies only the partly filled last granule.
    const int parent = a.Start(prompt, prompt);
    if (parent < 0) return done;
    std::vector<int> ids = {parent};
    bool ok = true;
    for (int k = 1; ok && k < p.samples; ++k) {
      const int child = a.Fork(parent);
      ok = child >= 0;
      if (ok) ids.push_back(child);
    }
    // Each sequence decodes its own output; the ones that reach their full
    // length count, the first that does not fit ends the run.
    for (std::size_t k = 0; k < ids.size(); ++k) {
      if (ok && !a.Extend(ids[k], prompt + outs[k])) ok = false;
      if (ok) {
        ++done;
      } else {
        a.Finish(ids[k]);
      }
    }
    if (!ok) return done;
  }
  return done;
}

using Workload = int (*)(Allocator&, const Params&, int);
struct WorkloadDef {
  const char* name;
  Workload run;
  const char* what;
};
constexpr WorkloadDef kWorkloads[] = {
    {"system", RunSystem, "requests behind one system prompt"},
    {"chat", RunChat, "multi-turn chats, the history kept as a prefix"},
    {"fork", RunFork, "parallel sampling: prompts forked n ways"},
};

// ---- Reporting ----------------------------------------------------------------
double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

struct Row {
  std::string allocator;
  int requests = 0;
  std::int64_t held = 0;
  int batch = 0;
  double creates = 0, maps = 0, unmaps = 0, destroys = 0, set_access = 0, copies = 0,
         calls = 0;
  std::int64_t max_calls = 0;
  std::vector<double> share_p50_us;  // One per repeat.
  double share_max_us = 0;
  std::int64_t prefill = 0;
  std::string notes;
};

void Summarize(const Allocator& a, Row* row) {
  const std::vector<ShareCost>& s = a.shares();
  std::vector<double> times;
  double n = static_cast<double>(std::max<std::size_t>(s.size(), 1));
  row->creates = row->maps = row->unmaps = row->destroys = row->set_access = 0;
  row->copies = row->calls = 0;
  row->max_calls = 0;
  for (const ShareCost& c : s) {
    row->creates += static_cast<double>(c.creates) / n;
    row->maps += static_cast<double>(c.maps) / n;
    row->unmaps += static_cast<double>(c.unmaps) / n;
    row->destroys += static_cast<double>(c.destroys) / n;
    row->set_access += static_cast<double>(c.set_access) / n;
    row->copies += static_cast<double>(c.copies) / n;
    row->calls += static_cast<double>(c.DriverCalls()) / n;
    row->max_calls = std::max(row->max_calls, c.DriverCalls());
    times.push_back(c.seconds * 1e6);
    row->share_max_us = std::max(row->share_max_us, c.seconds * 1e6);
  }
  if (a.CopiesPerShare() >= 0) row->copies = a.CopiesPerShare();
  row->share_p50_us.push_back(Median(times));
}

std::vector<std::string> SplitList(const std::string& v) {
  return absl::StrSplit(v, ',', absl::SkipEmpty());
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_name = "llama3-8b";
  double memory_gib = 16;
  std::string workloads = "system,chat,fork";
  Params p;
  std::int64_t max_extent_tokens = 0;
  int repeats = 3;
  std::string costs_name = "h200";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::size_t eq = arg.find('=');
    const std::string key = arg.substr(0, eq);
    const std::string val = eq == std::string::npos ? "" : arg.substr(eq + 1);
    auto num = [&](auto* out) {
      std::int64_t x;
      if (!absl::SimpleAtoi(val, &x) || x < 0) Die("bad value for " + key + ": '" + val + "'");
      *out = static_cast<std::remove_pointer_t<decltype(out)>>(x);
    };
    if (key == "--help" || key == "-h") {
      std::printf(
          "prefix_capacity [--model=llama3-8b|mistral-7b|yi-6b|llama3-70b-tp8]\n"
          "  [--memory_gib=G (16)] [--workloads=system,chat,fork] [--requests=N (64)]\n"
          "  [--prefix=TOKENS (2048)] [--turns=T (4)] [--samples=K (4)]\n"
          "  [--max_extent_tokens=T (library default)] [--repeats=R (3)] [--seed=S (1)]\n"
          "  [--costs=h200|zero]\n"
          "Memory, batch under a budget and driver calls per shared request for\n"
          "vattn without sharing, vattn with sharing and paged/16 with refcounts.\n");
      return 0;
    } else if (key == "--model") {
      model_name = val;
    } else if (key == "--memory_gib") {
      if (!absl::SimpleAtod(val, &memory_gib) || memory_gib <= 0) Die("bad --memory_gib");
    } else if (key == "--workloads") {
      workloads = val;
    } else if (key == "--requests") {
      num(&p.requests);
    } else if (key == "--prefix") {
      num(&p.prefix);
    } else if (key == "--turns") {
      num(&p.turns);
    } else if (key == "--samples") {
      num(&p.samples);
    } else if (key == "--max_extent_tokens") {
      num(&max_extent_tokens);
    } else if (key == "--repeats") {
      num(&repeats);
    } else if (key == "--seed") {
      num(&p.seed);
    } else if (key == "--costs") {
      costs_name = val;
    } else {
      Die("unknown flag " + arg + " (--help lists them)");
    }
  }
  const Model* model = nullptr;
  for (const Model& m : kModels) {
    if (model_name == m.name) model = &m;
  }
  if (model == nullptr) Die("unknown --model " + model_name);
  if (p.requests < 4 || p.turns < 1 || p.samples < 1 || repeats < 1 || p.prefix < 1) {
    Die("need --requests >= 4, --turns, --samples, --repeats, --prefix >= 1");
  }
  if (costs_name != "h200" && costs_name != "zero") Die("--costs is h200 or zero");
  const vattn::LatencyCosts costs =
      costs_name == "h200" ? vattn::LatencyCosts::H200() : vattn::LatencyCosts::Zero();
  const std::int64_t memory = static_cast<std::int64_t>(memory_gib * static_cast<double>(kGiB));
  const std::int64_t bpt = model->BytesPerToken();

  // One file descriptor per live handle on the Host backend.
  rlimit nofile{};
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);
  }

  fmt::print("prefix_capacity: {} ({} KiB of K/V per token, {} tokens per 2 MiB granule), "
             "budget {:.1f} GiB, seed {}, {} repeat(s), latency model {}\n",
             model->name, bpt / 1024, kGranule / bpt, memory_gib, p.seed, repeats, costs_name);
  fmt::print("  system: {} requests behind a {}-token prompt; chat: {} conversations x {} "
             "turns; fork: {} prompts x {} samples\n",
             p.requests, p.prefix, p.requests / 4, p.turns, p.requests / p.samples, p.samples);

  bool all_met = true;
  for (const std::string& wname : SplitList(workloads)) {
    const WorkloadDef* w = nullptr;
    for (const WorkloadDef& d : kWorkloads) {
      if (wname == d.name) w = &d;
    }
    if (w == nullptr) Die("unknown workload " + wname);
    const int n = wname == "chat" ? p.requests / 4 : p.requests;
    Row rows[3];
    rows[0].allocator = "vattn (no sharing)";
    rows[1].allocator = "vattn (sharing)";
    rows[2].allocator = "paged/16 (refcount)";
    for (int rep = 0; rep < repeats; ++rep) {
      for (int k = 0; k < 3; ++k) {
        // Every request of the workload at its full length, no budget.
        std::unique_ptr<Allocator> a;
        if (k < 2) {
          a = std::make_unique<VattnAllocator>(*model, 0, p.max_tokens, max_extent_tokens,
                                               k == 1, costs);
        } else {
          a = std::make_unique<PagedAllocator>(bpt, 0);
        }
        rows[k].requests = w->run(*a, p, n);
        rows[k].held = a->HeldBytes();
        rows[k].prefill = a->prefill_tokens();
        Summarize(*a, &rows[k]);
        rows[k].notes = a->Notes();
        if (rep > 0) continue;
        // The batch that fits the budget (deterministic: once).
        std::unique_ptr<Allocator> b;
        if (k < 2) {
          b = std::make_unique<VattnAllocator>(*model, memory, p.max_tokens, max_extent_tokens,
                                               k == 1, vattn::LatencyCosts::Zero());
        } else {
          b = std::make_unique<PagedAllocator>(bpt, memory);
        }
        rows[k].batch = w->run(*b, p, -1);
      }
    }
    fmt::print("\n{}: {}\n", w->name, w->what);
    constexpr const char* kHead =
        "{:<20} {:>5} {:>9} {:>6} {:>6} {:>6} | {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} | "
        "{:>19} {:>8} {:>8}\n";
    fmt::print(fmt::runtime(kHead), "allocator", "reqs", "held MiB", "x pag", "batch", "x pag",
               "calls", "creat", "map", "unmap", "destr", "acces", "copy", "share p50 us",
               "max us", "prefill");
    fmt::print(fmt::runtime(kHead), "", "", "", "", "", "", "/shr", "", "", "", "", "", "",
               "(range of p50)", "", "tokens");
    const Row& paged = rows[2];
    for (const Row& r : rows) {
      const double p50 = Median(r.share_p50_us);
      const double lo = *std::min_element(r.share_p50_us.begin(), r.share_p50_us.end());
      const double hi = *std::max_element(r.share_p50_us.begin(), r.share_p50_us.end());
      fmt::print("{:<20} {:>5} {:>9.1f} {:>6.3f} {:>6} {:>6.3f} | {:>5.2f} {:>5.2f} {:>5.2f} "
                 "{:>5.2f} {:>5.2f} {:>5.2f} {:>5.2f} | {:>19} {:>8.1f} {:>8}\n",
                 r.allocator, r.requests, static_cast<double>(r.held) / kMiB,
                 static_cast<double>(r.held) /
                     static_cast<double>(std::max<std::int64_t>(paged.held, 1)),
                 r.batch, static_cast<double>(r.batch) / std::max(paged.batch, 1), r.calls,
                 r.creates, r.maps, r.unmaps, r.destroys, r.set_access, r.copies,
                 fmt::format("{:.1f} ({:.1f}..{:.1f})", p50, lo, hi), r.share_max_us,
                 r.prefill);
    }
    for (const Row& r : rows) fmt::print("  {}: {}\n", r.allocator, r.notes);
    const Row& s = rows[1];
    const double mem_ratio =
        static_cast<double>(s.held) / static_cast<double>(std::max<std::int64_t>(paged.held, 1));
    const double batch_ratio =
        static_cast<double>(paged.batch) / static_cast<double>(std::max(s.batch, 1));
    const bool met = mem_ratio <= 1.05 && batch_ratio <= 1.05 && s.calls <= 3.0;
    all_met = all_met && met;
    fmt::print("  target (sharing within 1.05x of paged's memory and batch, <= 3 driver calls "
               "per share): memory x{:.3f}, paged batch / vattn batch x{:.3f}, {:.2f} calls "
               "per share (max {}; {:.2f} without the creates a pooled handle would "
               "save): {}\n",
               mem_ratio, batch_ratio, s.calls, s.max_calls, s.calls - s.creates,
               met ? "MET" : "MISSED");
  }
  fmt::print("\n  held: bytes holding requests and kept prefixes with every request at full\n"
             "  length (vattn: physical less pooled; paged: referenced blocks). batch:\n"
             "  requests at full length that fit the budget. per share: AllocSlotWithPrefix\n"
             "  or Fork alone (no sharing: the AllocSlot + Grow that replace it); paged makes\n"
             "  no driver call (its pool is allocated up front). share times on the latency\n"
             "  model over the Host backend: median over the shares, (range of that median\n"
             "  over the repeats), max over all.\n");
  fmt::print("  all targets {}\n", all_met ? "met" : "NOT met (see the rows above)");
  return 0;
}
