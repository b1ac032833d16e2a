// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The backends the benchmarks run on, by name: one place, so every program
// means the same thing by "host" or "h200-model".
#ifndef VATTN_BENCHMARKS_BENCH_BACKEND_H_
#define VATTN_BENCHMARKS_BENCH_BACKEND_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vattn/vattn.h"

namespace vattn_bench {

// "cuda": device 0. "host": the Host backend. "h200-model" (also spelled
// "latency"): the Host backend under the latency model with the H200's
// measured costs. The Host backend may hand out 1 TiB: benchmarks never
// touch most handles, so the memfd stays sparse. InvalidArgument for any
// other name; otherwise the factory's error (Unavailable without a device).
inline absl::StatusOr<std::shared_ptr<vattn::Backend>> MakeBenchBackend(
    const std::string& name) {
  if (name == "cuda") return vattn::MakeCudaBackend(0);
  if (name != "host" && name != "h200-model" && name != "latency") {
    return absl::InvalidArgumentError("unknown backend '" + name +
                                      "' (h200-model, host or cuda)");
  }
  vattn::HostBackendOptions host_opts;
  host_opts.physical_limit_bytes = std::size_t{1} << 40;
  absl::StatusOr<std::shared_ptr<vattn::Backend>> host =
      vattn::MakeHostBackend(host_opts);
  if (!host.ok() || name == "host") return host;
  return vattn::MakeLatencyModelBackend(*host, vattn::LatencyCosts::H200());
}

}  // namespace vattn_bench

#endif  // VATTN_BENCHMARKS_BENCH_BACKEND_H_
