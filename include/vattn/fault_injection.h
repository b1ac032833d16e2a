// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The fault-injection backend: a wrapper that fails chosen calls, for tests
// of every error path above the backend.
#ifndef VATTN_FAULT_INJECTION_H_
#define VATTN_FAULT_INJECTION_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vattn/backend.h"
#include "vattn/backend_wrapper.h"
#include "vattn/export.h"

namespace vattn {

// Fault injection: forwards to an inner backend, but fails chosen calls with
// a chosen code before they reach it (so a failed call changes nothing).
// Calls are counted per op from 1, counting only calls that passed the
// contract checks (so indices are stable for a given call sequence).
struct FaultRule {
  // Which calls the rule counts; std::nullopt counts every op together.
  std::optional<BackendOp> op;
  // The call (1-based, among the calls counted) that fails.
  std::int64_t nth = 1;
  // Fail every call from the nth on, not just the nth.
  bool and_after = false;
  absl::StatusCode code = absl::StatusCode::kInternal;
};
struct VATTN_EXPORT FaultPlan {
  std::vector<FaultRule> rules;
  // Fails the nth call of `op` once.
  static FaultPlan FailNth(BackendOp op, std::int64_t nth,
                           absl::StatusCode code = absl::StatusCode::kInternal);
  // Fails the nth call of any op, once.
  static FaultPlan FailNthAny(
      std::int64_t nth, absl::StatusCode code = absl::StatusCode::kInternal);
};

// The fault-injection wrapper, public so tests can change the plan and read
// how many calls it saw. Thread-safe.
class VATTN_EXPORT FaultInjectionBackend : public BackendWrapper {
 public:
  static absl::StatusOr<std::shared_ptr<FaultInjectionBackend>> Create(
      std::shared_ptr<Backend> inner, FaultPlan plan = {});
  ~FaultInjectionBackend() override;
  // The static Create above would otherwise hide Backend::Create(bytes).
  using Backend::Create;

  // Replaces the plan and restarts the call counts.
  void SetPlan(FaultPlan plan);
  // Calls of `op` seen since the last SetPlan (nullopt: all ops).
  std::int64_t seen(std::optional<BackendOp> op = std::nullopt) const;
  // Calls failed on purpose since the last SetPlan.
  std::int64_t injected() const;

 protected:
  absl::StatusOr<DevicePtr> DoReserve(std::size_t bytes) override;
  absl::Status DoRelease(DevicePtr va, std::size_t bytes) override;
  absl::StatusOr<PhysicalHandle> DoCreate(std::size_t bytes) override;
  absl::Status DoDestroy(PhysicalHandle handle, std::size_t bytes) override;
  absl::Status DoMap(DevicePtr va, PhysicalHandle handle, std::size_t bytes,
                     MapAccess access) override;
  absl::Status DoSetAccess(DevicePtr va, std::size_t bytes,
                           MapAccess access) override;
  absl::Status DoUnmap(DevicePtr va, std::size_t bytes) override;

 private:
  FaultInjectionBackend(std::shared_ptr<Backend> inner, FaultPlan plan);
  // Counts the call and returns the injected error, if any.
  absl::Status Check(BackendOp op);

  struct Plan;  // The plan and call counts; defined in fault_injection.cc.
  const std::unique_ptr<Plan> plan_;
};

VATTN_EXPORT absl::StatusOr<std::shared_ptr<Backend>>
MakeFaultInjectionBackend(std::shared_ptr<Backend> inner, FaultPlan plan);

}  // namespace vattn

#endif  // VATTN_FAULT_INJECTION_H_
