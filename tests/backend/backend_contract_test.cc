// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The backend contract suite on the CPU backends: Host, and the two wrappers
// over Host (the latency model charges the H200's measured costs, which keeps
// this binary at a few tens of milliseconds per test).

#include <memory>
#include <utility>

#include "tests/backend/backend_contract.h"
#include "vattn/backend.h"
#include "vattn/fault_injection.h"
#include "vattn/latency_model.h"
#include "vattn/status.h"

namespace vattn::testing {
namespace {

absl::StatusOr<std::shared_ptr<Backend>> Host() { return MakeHostBackend(); }

absl::StatusOr<std::shared_ptr<Backend>> LatencyModelOverHost() {
  VATTN_ASSIGN_OR_RETURN(std::shared_ptr<Backend> inner, MakeHostBackend());
  return MakeLatencyModelBackend(std::move(inner), LatencyCosts::H200());
}

absl::StatusOr<std::shared_ptr<Backend>> FaultInjectionOverHost() {
  VATTN_ASSIGN_OR_RETURN(std::shared_ptr<Backend> inner, MakeHostBackend());
  return MakeFaultInjectionBackend(std::move(inner), FaultPlan{});
}

INSTANTIATE_TEST_SUITE_P(
    Cpu, BackendContractTest,
    ::testing::Values(BackendFactory{"Host", Host},
                      BackendFactory{"LatencyModelOverHost",
                                     LatencyModelOverHost},
                      BackendFactory{"FaultInjectionOverHost",
                                     FaultInjectionOverHost}),
    BackendFactoryName);

}  // namespace
}  // namespace vattn::testing
