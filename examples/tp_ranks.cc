// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// tp_ranks: two tensor-parallel ranks in lockstep, one vattn cache each.
//
// A model with 8 KV heads runs at tensor parallelism 2: rank r holds heads
// [4r, 4r + 4), so each rank's cache has num_kv_heads = 4 and otherwise the
// same options. The engine (this program's loop) makes every cache call
// once and broadcasts it to both ranks: AllocSlot for an arriving request,
// Grow for its prefill, Step for each decode step, Free when it ends. It
// never sends vattn's decisions (which slot, which extents); each rank's
// cache makes them itself, and they match because the cache is
// deterministic (tests/tp_determinism_test.cc). The program checks that
// after every call: the slot each AllocSlot returned, and every slot's
// backed tokens, mapped bytes and extents, on both ranks.
//
// Each rank writes its heads' share of every token's K and V (a value of
// the request, layer, token, global head and dim) through its own views;
// before a request is freed its full 8-head K/V is reassembled from the two
// ranks and checked, as attention's all-gather would see it.
//
// With --map-ahead=N each rank also runs the map-ahead thread, and waits for
// it after every call (WaitForBackgroundIdle). That is not enough for
// lockstep: the thread maps when it gets to run and also wakes on
// wall-clock deadlines, so the ranks' extents and pooled handles can differ,
// then which idle slot best fits the next request, and so the slots
// themselves; the program then reports the mismatch. Run TP ranks with
// map-ahead off.
//
// Usage: tp_ranks [--requests=N] [--map-ahead=TOKENS] [--seed=S]
// Exit 1 on any mismatch.

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fmt/core.h"
#include "vattn/vattn.h"

namespace {

constexpr int kTp = 2;
constexpr int kTotalHeads = 8;
constexpr int kLayers = 4;
constexpr int kHeadDim = 32;

// The model's K (kv = 0) or V (kv = 1) element, exact in float.
float Value(int req, int layer, int kv, std::int64_t t, int head, int d) {
  return static_cast<float>(
      ((req * 131 + layer * 31 + kv * 7 + head * 3 + d) * 17 + t) % 65521);
}

struct Rank {
  int index = 0;
  std::unique_ptr<vattn::KVCache> cache;
  int first_head() const { return index * kTotalHeads / kTp; }
  int heads() const { return kTotalHeads / kTp; }

  // Writes this rank's heads of tokens [first, last) of a request.
  void Write(int slot, int req, std::int64_t first, std::int64_t last) {
    for (int l = 0; l < kLayers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        const vattn::TensorView view = kv == 0 ? cache->K(l) : cache->V(l);
        for (std::int64_t t = first; t < last; ++t) {
          for (int h = 0; h < heads(); ++h) {
            for (int d = 0; d < kHeadDim; ++d) {
              *reinterpret_cast<float*>(view.ElementAddress(slot, t, h, d)) =
                  Value(req, l, kv, t, first_head() + h, d);
            }
          }
        }
      }
    }
  }
  float Read(int slot, int layer, int kv, std::int64_t t, int local_head, int d) const {
    const vattn::TensorView view = kv == 0 ? cache->K(layer) : cache->V(layer);
    return *reinterpret_cast<const float*>(view.ElementAddress(slot, t, local_head, d));
  }
};

// What one rank decided, comparable across ranks.
std::string Decisions(const vattn::KVCache& cache) {
  std::string out;
  for (int s = 0; s < cache.options().max_slots; ++s) {
    const vattn::SlotInfo info = *cache.GetSlot(s);
    out += fmt::format("[{} {} {} {} {}]", info.active, info.length, info.backed_tokens,
                       info.mapped_bytes, info.extents);
  }
  const vattn::CacheStats st = cache.Stats();
  out += fmt::format(" map={} unmap={} reuse={} reclaimed={}", st.map_calls, st.unmap_calls,
                     st.reuse_hits, st.reclaimed_extents);
  return out;
}

struct Request {
  int id = 0;
  int slot = -1;
  std::int64_t prompt = 0;
  std::int64_t output = 0;
  std::int64_t length = 0;
};

std::int64_t Flag(int argc, char** argv, std::string_view name, std::int64_t fallback) {
  const std::string prefix = fmt::format("--{}=", name);
  for (int i = 1; i < argc; ++i) {
    std::string_view arg(argv[i]);
    if (arg.substr(0, prefix.size()) == prefix) {
      return std::strtoll(argv[i] + prefix.size(), nullptr, 10);
    }
  }
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--help") {
      fmt::print("usage: tp_ranks [--requests=N] [--map-ahead=TOKENS] [--seed=S]\n");
      return 0;
    }
  }
  const int num_requests = static_cast<int>(Flag(argc, argv, "requests", 40));
  const std::int64_t map_ahead = Flag(argc, argv, "map-ahead", 0);
  std::mt19937 rng(static_cast<std::uint32_t>(Flag(argc, argv, "seed", 1)));

  // Options every rank shares: only num_kv_heads is the rank's share. The
  // budget is explicit (not "the device's memory"), so every rank runs out
  // at the same call.
  vattn::KVCacheOptions o;
  o.num_layers = kLayers;
  o.num_kv_heads = kTotalHeads / kTp;
  o.head_dim = kHeadDim;
  o.dtype = vattn::DType::kFloat32;
  o.max_slots = 6;
  o.max_tokens = 2048;
  o.map_ahead_tokens = map_ahead;
  o.memory_budget_bytes = std::size_t{16} << 20;

  Rank ranks[kTp];
  for (int r = 0; r < kTp; ++r) {
    vattn::HostBackendOptions h;
    h.granularity = std::size_t{64} << 10;
    auto backend = vattn::MakeHostBackend(h);  // One backend per rank (its GPU).
    if (!backend.ok()) {
      fmt::print(stderr, "rank {}: {}\n", r, backend.status().ToString());
      return 1;
    }
    auto cache = vattn::KVCache::Create(o, *std::move(backend));
    if (!cache.ok()) {
      fmt::print(stderr, "rank {}: {}\n", r, cache.status().ToString());
      return 1;
    }
    ranks[r].index = r;
    ranks[r].cache = *std::move(cache);
  }

  long calls = 0;
  long mismatches = 0;
  long tokens_checked = 0;
  long preempted = 0;
  // With map-ahead, each rank waits for its thread after every call (which
  // narrows, but does not close, the timing window: see the top).
  auto sync = [&](Rank& r) {
    if (map_ahead > 0) (void)r.cache->WaitForBackgroundIdle();
  };
  // After each broadcast call: both ranks must have decided the same.
  auto compare = [&](const std::string& what) {
    ++calls;
    const std::string d0 = Decisions(*ranks[0].cache);
    for (int r = 1; r < kTp; ++r) {
      const std::string d = Decisions(*ranks[r].cache);
      if (d != d0) {
        ++mismatches;
        fmt::print(stderr, "after {}: rank 0 {}\n           rank {} {}\n", what, d0, r, d);
      }
    }
  };

  std::uniform_int_distribution<int> prompt_len(16, 900);
  std::uniform_int_distribution<int> output_len(4, 200);
  std::vector<Request> running;
  int next_id = 0;
  long steps = 0;
  while (next_id < num_requests || !running.empty()) {
    // Admit one request when a slot is free: AllocSlot + Grow, broadcast.
    if (next_id < num_requests && static_cast<int>(running.size()) < o.max_slots) {
      Request q;
      q.id = next_id;
      q.prompt = prompt_len(rng);
      q.output = output_len(rng);
      int slots[kTp];
      bool grown[kTp];
      for (int r = 0; r < kTp; ++r) {
        const absl::StatusOr<int> slot = ranks[r].cache->AllocSlot(q.prompt);
        sync(ranks[r]);
        slots[r] = slot.ok() ? *slot : -1;
        grown[r] = slot.ok() && ranks[r].cache->Grow(*slot, q.prompt).ok();
        sync(ranks[r]);
      }
      if (slots[0] != slots[1] || grown[0] != grown[1]) {
        fmt::print(stderr, "request {}: rank 0 took slot {} (grown: {}), rank 1 slot {} ({})\n",
                   q.id, slots[0], grown[0], slots[1], grown[1]);
        return 1;  // The ranks' memory no longer matches the engine's books.
      }
      const bool admitted = grown[0];
      if (admitted) {
        q.slot = slots[0];
        q.length = q.prompt;
        for (Rank& r : ranks) r.Write(q.slot, q.id, 0, q.prompt);
        running.push_back(q);
        ++next_id;
      } else {
        // Over budget on every rank alike: give the slot back, retry later.
        for (int r = 0; r < kTp; ++r) {
          if (slots[r] >= 0) (void)ranks[r].cache->Free(slots[r]);
          sync(ranks[r]);
        }
      }
      compare(fmt::format("admitting request {}", q.id));
    }
    // One decode step for every running request, broadcast.
    std::vector<vattn::StepRequest> batch;
    for (const Request& q : running) batch.push_back({q.slot, q.length + 1});
    bool stepped[kTp];
    for (int r = 0; r < kTp; ++r) {
      stepped[r] = ranks[r].cache->Step(batch).ok();
      sync(ranks[r]);
    }
    compare(fmt::format("step {}", steps));
    if (stepped[0] != stepped[1]) {
      fmt::print(stderr, "step {}: rank 0 {}, rank 1 {}\n", steps, stepped[0], stepped[1]);
      return 1;
    }
    ++steps;
    if (!stepped[0]) {
      // Out of memory on both ranks: preempt the newest request.
      Request& victim = running.back();
      ++preempted;
      for (Rank& r : ranks) {
        (void)r.cache->Free(victim.slot);
        sync(r);
      }
      compare(fmt::format("preempting request {}", victim.id));
      running.pop_back();
      continue;
    }
    for (Request& q : running) {
      for (Rank& r : ranks) r.Write(q.slot, q.id, q.length, q.length + 1);
      ++q.length;
    }
    // Finish requests: reassemble the 8 heads from both ranks, then Free.
    for (auto it = running.begin(); it != running.end();) {
      if (it->length < it->prompt + it->output) {
        ++it;
        continue;
      }
      for (std::int64_t t = 0; t < it->length; t += 7) {
        for (int l = 0; l < kLayers; ++l) {
          for (int kv = 0; kv < 2; ++kv) {
            for (int head = 0; head < kTotalHeads; ++head) {
              const Rank& owner = ranks[head / (kTotalHeads / kTp)];
              for (int d = 0; d < kHeadDim; ++d) {
                if (owner.Read(it->slot, l, kv, t, head - owner.first_head(), d) !=
                    Value(it->id, l, kv, t, head, d)) {
                  ++mismatches;
                }
              }
            }
          }
        }
        ++tokens_checked;
      }
      for (Rank& r : ranks) {
        (void)r.cache->Free(it->slot);
        sync(r);
      }
      compare(fmt::format("freeing request {}", it->id));
      it = running.erase(it);
    }
  }

  const vattn::CacheStats st = ranks[0].cache->Stats();
  fmt::print("tp_ranks: {} ranks x {} of {} KV heads, map-ahead {}\n", kTp, o.num_kv_heads,
             kTotalHeads, map_ahead);
  fmt::print("  {} requests ({} preempted), {} decode steps, {} broadcast calls compared\n",
             num_requests, preempted, steps, calls);
  fmt::print("  per rank: {} extents mapped, {} reuse hits, {} extents reclaimed\n",
             st.extents_mapped, st.reuse_hits, st.reclaimed_extents);
  fmt::print("  {} tokens reassembled from both ranks and checked\n", tokens_checked);
  fmt::print("  mismatches: {}\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}
