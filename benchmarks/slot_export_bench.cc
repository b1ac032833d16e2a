// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Prefill -> decode handoff of one request on one machine, zero-copy
// (SendSlot / ReceiveSlot: the decode cache maps the prefill cache's
// memory) against copying it (decode Grows a slot of its own and the bytes
// are copied range to range through SlotRanges, as a same-node transfer
// engine would; memcpy is the copy's lower bound). Host backend, both
// caches in one process over a socketpair (the kernel work of passing a
// descriptor is the same across processes). Per request size it reports
// the median and spread of:
//   handoff  - zero-copy: SendSlot + ReceiveSlot; copy: AllocSlot + Grow +
//              memcpy of the prompt;
//   + read   - the handoff plus decode reading every byte of the prompt
//              once (the zero-copy side pays its page-table faults here).
// Each repetition starts from a freshly written prompt and frees both
// slots after. Usage:
//   slot_export_bench [--tokens 256,4096,16384] [--reps 15] [--layers 8]
//                     [--heads 8] [--head-dim 128]
// fp16, token-major. Default shape: 32 KiB per token (16k tokens = 512 MiB).

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "vattn/backend.h"
#include "vattn/kv_cache.h"
#include "vattn/slot_export.h"

namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

[[noreturn]] void Die(const char* what, const absl::Status& s) {
  std::fprintf(stderr, "slot_export_bench: %s: %s\n", what, s.ToString().c_str());
  std::exit(1);
}

template <typename T>
T Check(const char* what, absl::StatusOr<T> v) {
  if (!v.ok()) Die(what, v.status());
  return *std::move(v);
}
void Check(const char* what, const absl::Status& s) {
  if (!s.ok()) Die(what, s);
}

// Sums every 8-byte word of the range (so the reads cannot be elided).
std::uint64_t ReadAll(const vattn::MemoryRange& r) {
  const auto* p = reinterpret_cast<const std::uint64_t*>(r.address);
  std::uint64_t sum = 0;
  for (std::size_t i = 0; i < r.bytes / 8; ++i) sum += p[i];
  return sum;
}

struct Sample {
  double handoff = 0;
  double with_read = 0;
};

struct Summary {
  double median, lo, hi;
};
Summary Summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

std::vector<std::int64_t> ParseList(const char* s) {
  std::vector<std::int64_t> out;
  for (const char* p = s; *p != '\0';) {
    char* end = nullptr;
    out.push_back(std::strtoll(p, &end, 10));
    p = *end == ',' ? end + 1 : end;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::int64_t> sizes = {256, 4096, 16384};
  int reps = 15;
  vattn::KVCacheOptions o;
  o.num_layers = 8;
  o.num_kv_heads = 8;
  o.head_dim = 128;
  o.dtype = vattn::DType::kFloat16;
  o.max_slots = 2;
  o.max_tokens = 16384;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--tokens") {
      sizes = ParseList(argv[i + 1]);
    } else if (flag == "--reps") {
      reps = std::atoi(argv[i + 1]);
    } else if (flag == "--layers") {
      o.num_layers = std::atoi(argv[i + 1]);
    } else if (flag == "--heads") {
      o.num_kv_heads = std::atoi(argv[i + 1]);
    } else if (flag == "--head-dim") {
      o.head_dim = std::atoi(argv[i + 1]);
    } else {
      std::fprintf(stderr, "slot_export_bench: unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  for (std::int64_t t : sizes) o.max_tokens = std::max(o.max_tokens, t);

  vattn::HostBackendOptions exportable;
  exportable.exportable_handles = true;
  auto prefill = Check("prefill cache",
                       vattn::KVCache::Create(o, Check("backend", vattn::MakeHostBackend(exportable))));
  auto decode = Check("decode cache",
                      vattn::KVCache::Create(o, Check("backend", vattn::MakeHostBackend())));
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    std::perror("socketpair");
    return 1;
  }
  std::printf("slot_export_bench: %d layers x %d heads x %d dim fp16, token-major, %lld "
              "bytes/token, Host backend, %d reps (first of each size dropped)\n",
              o.num_layers, o.num_kv_heads, o.head_dim,
              static_cast<long long>(prefill->bytes_per_token()), reps);
  std::printf("%8s %10s | %-26s | %-26s | %-26s | %-26s | %s\n", "tokens", "MiB",
              "zero-copy handoff ms", "copy handoff ms", "zero-copy + read ms",
              "copy + read ms", "copy/zero (handoff, +read)");
  std::uint64_t sink = 0;
  for (std::int64_t tokens : sizes) {
    std::vector<double> zh, zr, ch, cr;
    for (int rep = 0; rep <= reps; ++rep) {
      // A fresh prompt each time (exported memory is destroyed at Free).
      const int src = Check("AllocSlot", prefill->AllocSlot(tokens));
      Check("Grow", prefill->Grow(src, tokens));
      const auto ranges = Check("SlotRanges", prefill->SlotRanges(src, tokens));
      std::memset(reinterpret_cast<void*>(ranges[0].address), rep + 1, ranges[0].bytes);

      // Copy: decode backs a slot of its own and the bytes move.
      auto t0 = Clock::now();
      const int copy = Check("AllocSlot", decode->AllocSlot(tokens));
      Check("Grow", decode->Grow(copy, tokens));
      const auto dst = Check("SlotRanges", decode->SlotRanges(copy, tokens));
      std::memcpy(reinterpret_cast<void*>(dst[0].address),
                  reinterpret_cast<const void*>(ranges[0].address), ranges[0].bytes);
      auto t1 = Clock::now();
      sink += ReadAll(dst[0]);
      auto t2 = Clock::now();
      Check("Free", decode->Free(copy, vattn::kNoFence));
      if (rep > 0) {
        ch.push_back(Ms(t1 - t0));
        cr.push_back(Ms(t2 - t0));
      }

      // Zero-copy: decode maps prefill's memory.
      t0 = Clock::now();
      Check("SendSlot", vattn::SendSlot(sv[0], *prefill, src, tokens));
      const int mapped = Check("ReceiveSlot", vattn::ReceiveSlot(sv[1], *decode));
      t1 = Clock::now();
      const auto mine = Check("SlotRanges", decode->SlotRanges(mapped, tokens));
      sink += ReadAll(mine[0]);
      t2 = Clock::now();
      Check("Free", prefill->Free(src, vattn::kNoFence));
      Check("Free", decode->Free(mapped, vattn::kNoFence));
      if (rep > 0) {
        zh.push_back(Ms(t1 - t0));
        zr.push_back(Ms(t2 - t0));
      }
    }
    const Summary a = Summarize(zh), b = Summarize(ch), c = Summarize(zr),
                  d = Summarize(cr);
    std::printf("%8lld %10.1f | %7.3f (%7.3f-%7.3f) | %7.3f (%7.3f-%7.3f) | "
                "%7.3f (%7.3f-%7.3f) | %7.3f (%7.3f-%7.3f) | %6.1fx, %5.2fx\n",
                static_cast<long long>(tokens),
                static_cast<double>(tokens * prefill->bytes_per_token()) / (1 << 20),
                a.median, a.lo, a.hi, b.median, b.lo, b.hi, c.median, c.lo, c.hi,
                d.median, d.lo, d.hi, b.median / a.median, d.median / c.median);
  }
  ::close(sv[0]);
  ::close(sv[1]);
  return sink == 42 ? 3 : 0;  // Uses the sums.
}
