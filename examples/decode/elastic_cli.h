// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The command line of the multi-model workload (elastic.h), shared by
// `batch_decode --models=2` (ModelsMain) and benchmarks/elastic_bench.cc:
// the flags, the backend by name and the config they make.
#ifndef VATTN_EXAMPLES_DECODE_ELASTIC_CLI_H_
#define VATTN_EXAMPLES_DECODE_ELASTIC_CLI_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "elastic.h"

namespace vdecode {

struct ElasticFlags {
  // "h200-model": the Host backend under the latency model with the H200's
  // driver costs; "host"; "cuda" (device 0: real memory is mapped).
  std::string backend = "h200-model";
  std::vector<std::string> models = {"llama3-8b", "yi-6b"};
  double budget_gib = 4;
  double duration_s = 60, burst_s = 10, step_ms = 20;
  // A model's burst rate over the rate the WHOLE budget sustains for it
  // (budget / (bytes per token x (mean prompt + mean output / 2))
  // requests at once, each living mean-output ticks; capped by max_slots);
  // quiet: its rate between its bursts, in the same unit.
  double load = 0.8, quiet = 0.05;
  double ttft_bound_ms = 2000;
  std::pair<std::int64_t, std::int64_t> prompt{256, 1024}, output{64, 256};
  int max_slots = 128;
  std::int64_t map_ahead_tokens = 0;
  std::uint32_t seed = 1;
  std::string json, svg;
};

// The flags' help lines (each "  --flag=...  what"), for usage texts.
const char* ElasticFlagsUsage();

// Parses one "--key=value" argument into *flags. Returns 1 when it was one
// of ElasticFlags' keys, 0 when the key is not one of them (for the caller
// to handle), -1 with *error set for a bad value.
int ParseElasticFlag(const std::string& arg, ElasticFlags* flags, std::string* error);

// The backend by name (see ElasticFlags::backend). InvalidArgument for
// another name; otherwise the factory's error.
absl::StatusOr<std::shared_ptr<vattn::Backend>> MakeElasticBackend(const std::string& name);

// The config the flags describe, on `backend`, with each model's rates
// computed as ElasticFlags says; *description (when not null) gets a few
// lines saying what will run. InvalidArgument: an unknown model name.
absl::StatusOr<ElasticConfig> ElasticConfigFromFlags(const ElasticFlags& flags,
                                                     std::shared_ptr<vattn::Backend> backend,
                                                     std::string* description);

// `batch_decode --models=N|A,B [flags]`: the workload with the arbiter and
// (unless --arbiter-only) with the static split, same run; prints the
// per-model table and writes the SVG (--svg=PATH; default
// elastic_memory.svg beside the program). `argv[0]` is the program.
// Returns the process's exit code.
int ModelsMain(int argc, char** argv);

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_ELASTIC_CLI_H_
