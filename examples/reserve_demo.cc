// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// reserve_demo: the backend layer end to end, on the best backend present.
//
// Reserves a virtual range the size of a whole KV cache (Llama-3-8B shape,
// 256 slots of 8192 tokens), grows slot 0 by mapping three extents of
// different sizes back to back (so the slot's KV stays one contiguous range),
// writes a pattern over the mapped prefix in one copy and reads it back, then
// unmaps, destroys and releases everything. Prints each call with its time,
// the backend's counters, and fails (exit 1) unless every counter is back to
// zero at the end.
//
// Usage: reserve_demo [--backend=auto|cuda|host]
//   auto (the default) picks CUDA device 0 when a driver and a device are
//   present, else the Host backend, and says why.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fmt/core.h"
#include "vattn/vattn.h"

namespace {

constexpr std::size_t kKiB = std::size_t{1} << 10;
constexpr std::size_t kMiB = kKiB << 10;
constexpr std::size_t kGiB = kMiB << 10;
constexpr std::size_t kTiB = kGiB << 10;

// The KV cache whose address space is reserved: Llama-3-8B, fp16.
struct CacheShape {
  std::size_t layers = 32;
  std::size_t kv_heads = 8;
  std::size_t head_dim = 128;
  std::size_t dtype_bytes = 2;  // fp16
  std::size_t slots = 256;
  std::size_t max_tokens = 8192;

  // K and V of every layer for one token.
  std::size_t BytesPerToken() const {
    return layers * 2 * kv_heads * head_dim * dtype_bytes;
  }
  std::size_t BytesPerSlot() const { return BytesPerToken() * max_tokens; }
  std::size_t Bytes() const { return BytesPerSlot() * slots; }
};

std::string HumanBytes(std::size_t bytes) {
  if (bytes == 0) return "0";
  const struct {
    std::size_t unit;
    const char* name;
  } units[] = {{kTiB, "TiB"}, {kGiB, "GiB"}, {kMiB, "MiB"}, {kKiB, "KiB"}};
  for (const auto& u : units) {
    if (bytes < u.unit) continue;
    if (bytes % u.unit == 0) return fmt::format("{} {}", bytes / u.unit, u.name);
    return fmt::format("{:.1f} {}",
                       static_cast<double>(bytes) / static_cast<double>(u.unit),
                       u.name);
  }
  return fmt::format("{} B", bytes);
}

std::size_t RoundUp(std::size_t bytes, std::size_t granularity) {
  return (bytes + granularity - 1) / granularity * granularity;
}

using Clock = std::chrono::steady_clock;

double MicrosSince(Clock::time_point start) {
  return std::chrono::duration<double, std::micro>(Clock::now() - start)
      .count();
}

// One backend call as it appears in the printed table.
struct CallRecord {
  std::string call;
  std::string what;
  double micros = 0;
  std::size_t bytes_moved = 0;  // For copies: shown as a rate.
};

class CallLog {
 public:
  // Runs `fn` (returning a Status or StatusOr), records its time under
  // `call` / `what`, and returns its result.
  // `bytes_moved` is the data a copy moves (0 for other calls).
  template <typename Fn>
  auto Time(std::string call, std::string what, Fn&& fn,
            std::size_t bytes_moved = 0) {
    const Clock::time_point start = Clock::now();
    auto result = std::forward<Fn>(fn)();
    records_.push_back(
        {std::move(call), std::move(what), MicrosSince(start), bytes_moved});
    return result;
  }

  void Print() const {
    fmt::print("\n{:<3} {:<15} {:<36} {:>12} {:>10}\n", "#", "call", "what",
               "time (us)", "GB/s");
    fmt::print("{:-<80}\n", "");
    int n = 0;
    for (const CallRecord& r : records_) {
      const std::string rate =
          r.bytes_moved == 0 || r.micros <= 0
              ? std::string()
              : fmt::format("{:.2f}", static_cast<double>(r.bytes_moved) /
                                          (r.micros * 1e3));
      fmt::print("{:<3} {:<15} {:<36} {:>12.1f} {:>10}\n", ++n, r.call,
                 r.what, r.micros, rate);
    }
  }

 private:
  std::vector<CallRecord> records_;
};

void PrintCounters(const vattn::BackendCounters& mapped,
                   const vattn::BackendCounters& end) {
  fmt::print("\n{:<24} {:>16} {:>16}\n", "backend counter", "while mapped",
             "at the end");
  fmt::print("{:-<58}\n", "");
  const auto row = [](std::string_view name, std::int64_t a, std::int64_t b) {
    fmt::print("{:<24} {:>16} {:>16}\n", name, a, b);
  };
  const auto bytes_row = [](std::string_view name, std::int64_t a,
                            std::int64_t b) {
    fmt::print("{:<24} {:>16} {:>16}\n", name,
               HumanBytes(static_cast<std::size_t>(a)),
               HumanBytes(static_cast<std::size_t>(b)));
  };
  row("reservations", mapped.reservations, end.reservations);
  bytes_row("reserved bytes", mapped.reserved_bytes, end.reserved_bytes);
  row("handles", mapped.handles, end.handles);
  bytes_row("physical bytes", mapped.physical_bytes, end.physical_bytes);
  row("mappings", mapped.mappings, end.mappings);
  bytes_row("mapped bytes", mapped.mapped_bytes, end.mapped_bytes);
  row("fences", mapped.fences, end.fences);
  for (int i = 0; i < vattn::kNumBackendOps; ++i) {
    const auto op = static_cast<vattn::BackendOp>(i);
    row(fmt::format("calls: {}", vattn::BackendOpName(op)), mapped.calls_of(op),
        end.calls_of(op));
  }
  row("failed calls", mapped.failed_calls, end.failed_calls);
}

bool NothingLive(const vattn::BackendCounters& c) {
  return c.Empty() && c.reserved_bytes == 0 && c.physical_bytes == 0 &&
         c.mapped_bytes == 0;
}

// The backend to run on, and why it was chosen.
struct Choice {
  std::shared_ptr<vattn::Backend> backend;
  std::string why;
};

absl::StatusOr<Choice> ChooseBackend(std::string_view want) {
  std::string why;
  if (want == "host") {
    why = "--backend=host was asked for";
  } else {
    const absl::StatusOr<int> count = vattn::CudaDeviceCount();
    if (!count.ok()) {
      why = fmt::format("CUDA is unavailable ({})", count.status().ToString());
    } else if (*count == 0) {
      why = "the CUDA driver loaded but reports no device";
    } else {
      absl::StatusOr<std::shared_ptr<vattn::Backend>> cuda =
          vattn::MakeCudaBackend(0);
      if (cuda.ok()) {
        return Choice{*std::move(cuda),
                      fmt::format("CUDA device 0 (of {} present)", *count)};
      }
      why = fmt::format("MakeCudaBackend(0) failed ({})",
                        cuda.status().ToString());
    }
    if (want == "cuda") return absl::UnavailableError(why);
  }
  absl::StatusOr<std::shared_ptr<vattn::Backend>> host =
      vattn::MakeHostBackend();
  if (!host.ok()) return host.status();
  return Choice{*std::move(host), why + "; using the Host backend"};
}

// A mapped extent of slot 0.
struct Extent {
  vattn::DevicePtr va = 0;
  std::size_t bytes = 0;
  vattn::PhysicalHandle handle = vattn::kInvalidHandle;
};

absl::Status Run(vattn::Backend& backend) {
  const vattn::BackendCapabilities& caps = backend.capabilities();
  const std::size_t granularity = backend.granularity();
  fmt::print("backend      {} (granularity {}, largest reservation {}, "
             "physical memory {}, host-accessible: {})\n",
             caps.name, HumanBytes(granularity),
             HumanBytes(caps.max_reservation_bytes),
             HumanBytes(caps.physical_memory_bytes),
             caps.host_accessible ? "yes" : "no");

  const CacheShape shape;
  const std::size_t cache_bytes = RoundUp(shape.Bytes(), granularity);
  fmt::print("cache shape  {} layers x {} KV heads x {} dim x fp16 x 2 (K,V) "
             "= {} per token\n",
             shape.layers, shape.kv_heads, shape.head_dim,
             HumanBytes(shape.BytesPerToken()));
  fmt::print("             {} slots x {} tokens = {} per slot, {} in all\n",
             shape.slots, shape.max_tokens, HumanBytes(shape.BytesPerSlot()),
             HumanBytes(cache_bytes));

  CallLog log;
  VATTN_ASSIGN_OR_RETURN(
      const vattn::DevicePtr base,
      log.Time("Reserve", HumanBytes(cache_bytes) + " of address space",
               [&] { return backend.Reserve(cache_bytes); }));

  // Slot 0 grows by three extents placed back to back: a prefill-sized one,
  // then larger ones as the request would keep decoding.
  std::vector<Extent> extents;
  std::size_t mapped = 0;
  for (const std::size_t want : {2 * kMiB, 32 * kMiB, 128 * kMiB}) {
    Extent e;
    e.bytes = RoundUp(want, granularity);
    e.va = base + mapped;
    VATTN_ASSIGN_OR_RETURN(
        e.handle, log.Time("Create", HumanBytes(e.bytes) + " handle",
                           [&] { return backend.Create(e.bytes); }));
    VATTN_RETURN_IF_ERROR(log.Time(
        "Map", fmt::format("{} at slot 0 + {}", HumanBytes(e.bytes),
                           HumanBytes(mapped)),
        [&] { return backend.Map(e.va, e.handle); }));
    mapped += e.bytes;
    extents.push_back(e);
  }
  fmt::print("slot 0       {} mapped contiguously = {} tokens of KV\n",
             HumanBytes(mapped), mapped / shape.BytesPerToken());
  const vattn::BackendCounters while_mapped = backend.counters();

  // One write over the whole prefix (it spans all three mappings), one read.
  std::vector<std::uint32_t> pattern(mapped / sizeof(std::uint32_t));
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    pattern[i] = static_cast<std::uint32_t>(i * 2654435761u) ^ 0x5a5a5a5au;
  }
  std::vector<std::uint32_t> readback(pattern.size(), 0);
  VATTN_RETURN_IF_ERROR(log.Time(
      "CopyToDevice", HumanBytes(mapped) + " pattern over slot 0",
      [&] { return backend.CopyToDevice(base, pattern.data(), mapped); },
      mapped));
  VATTN_RETURN_IF_ERROR(log.Time(
      "CopyFromDevice", HumanBytes(mapped) + " back from slot 0",
      [&] { return backend.CopyFromDevice(readback.data(), base, mapped); },
      mapped));
  if (std::memcmp(pattern.data(), readback.data(), mapped) != 0) {
    return absl::InternalError("the pattern read back differs from the one written");
  }

  for (const Extent& e : extents) {
    VATTN_RETURN_IF_ERROR(log.Time(
        "Unmap", fmt::format("{} at slot 0 + {}", HumanBytes(e.bytes),
                             HumanBytes(e.va - base)),
        [&] { return backend.Unmap(e.va, e.bytes); }));
  }
  for (const Extent& e : extents) {
    VATTN_RETURN_IF_ERROR(
        log.Time("Destroy", HumanBytes(e.bytes) + " handle",
                 [&] { return backend.Destroy(e.handle); }));
  }
  VATTN_RETURN_IF_ERROR(
      log.Time("Release", HumanBytes(cache_bytes) + " of address space",
               [&] { return backend.Release(base, cache_bytes); }));

  log.Print();
  const vattn::BackendCounters end = backend.counters();
  PrintCounters(while_mapped, end);
  fmt::print("\npattern      {} written and read back intact{}\n",
             HumanBytes(mapped),
             caps.host_accessible
                 ? " (the first write also populates the pages: slow on Host)"
                 : "");
  if (!NothingLive(end)) {
    return absl::InternalError(
        "the backend still holds reservations, handles or mappings");
  }
  fmt::print("counters     back to zero: nothing leaked\n");
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  std::string_view want = "auto";
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    constexpr std::string_view kFlag = "--backend=";
    if (arg.substr(0, kFlag.size()) == kFlag) {
      want = arg.substr(kFlag.size());
    }
    if ((want != "auto" && want != "cuda" && want != "host") ||
        arg.substr(0, kFlag.size()) != kFlag) {
      fmt::print(stderr, "usage: {} [--backend=auto|cuda|host]\n", argv[0]);
      return 2;
    }
  }

  absl::StatusOr<Choice> choice = ChooseBackend(want);
  if (!choice.ok()) {
    fmt::print(stderr, "reserve_demo: no backend: {}\n",
               choice.status().ToString());
    return 1;
  }
  fmt::print("chose        {}\n", choice->why);
  const absl::Status status = Run(*choice->backend);
  if (!status.ok()) {
    fmt::print(stderr, "reserve_demo: FAILED: {}\n", status.ToString());
    return 1;
  }
  return 0;
}
