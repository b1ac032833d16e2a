// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The fault-injection wrapper. Every one of the state-changing calls is
// counted (per op and over all ops) when it reaches a hook, i.e. after the
// base class's contract checks passed, and checked against the plan before it
// is forwarded; an injected failure never reaches the inner backend, so it
// changes nothing there. Data movement and fences forward unchecked.

#include <array>
#include <memory>
#include <utility>

#include "absl/strings/str_format.h"
#include "src/internal/mutex.h"
#include "vattn/backend.h"
#include "vattn/fault_injection.h"
#include "vattn/status.h"

namespace vattn {

using internal::Mutex;
using internal::MutexLock;

FaultPlan FaultPlan::FailNth(BackendOp op, std::int64_t nth,
                             absl::StatusCode code) {
  FaultPlan plan;
  FaultRule rule;
  rule.op = op;
  rule.nth = nth;
  rule.code = code;
  plan.rules.push_back(rule);
  return plan;
}

FaultPlan FaultPlan::FailNthAny(std::int64_t nth, absl::StatusCode code) {
  FaultPlan plan;
  FaultRule rule;
  rule.op = std::nullopt;
  rule.nth = nth;
  rule.code = code;
  plan.rules.push_back(rule);
  return plan;
}

struct FaultInjectionBackend::Plan {
  mutable Mutex mu;
  FaultPlan plan ABSL_GUARDED_BY(mu);
  std::array<std::int64_t, kNumBackendOps> seen ABSL_GUARDED_BY(mu){};
  std::int64_t seen_all ABSL_GUARDED_BY(mu) = 0;
  std::int64_t injected ABSL_GUARDED_BY(mu) = 0;
};

FaultInjectionBackend::FaultInjectionBackend(std::shared_ptr<Backend> inner,
                                             FaultPlan plan)
    : BackendWrapper(std::move(inner), "fault_injection"),
      plan_(std::make_unique<Plan>()) {
  MutexLock lock(&plan_->mu);
  plan_->plan = std::move(plan);
}

absl::StatusOr<std::shared_ptr<FaultInjectionBackend>>
FaultInjectionBackend::Create(std::shared_ptr<Backend> inner, FaultPlan plan) {
  if (inner == nullptr) {
    return absl::InvalidArgumentError(
        "FaultInjectionBackend::Create: inner backend is null");
  }
  for (const FaultRule& rule : plan.rules) {
    if (rule.nth < 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "FaultInjectionBackend::Create: FaultRule.nth must be >= 1; got %d",
          rule.nth));
    }
    if (rule.code == absl::StatusCode::kOk) {
      return absl::InvalidArgumentError(
          "FaultInjectionBackend::Create: FaultRule.code must be an error");
    }
  }
  // The constructor is private, so make_shared cannot reach it.
  return std::shared_ptr<FaultInjectionBackend>(
      new FaultInjectionBackend(std::move(inner), std::move(plan)));
}

// Shutdown is never failed on purpose: BackendWrapper's destructor gives
// back what callers left live through its plain forwarding hooks.
FaultInjectionBackend::~FaultInjectionBackend() = default;

void FaultInjectionBackend::SetPlan(FaultPlan plan) {
  MutexLock lock(&plan_->mu);
  plan_->plan = std::move(plan);
  plan_->seen.fill(0);
  plan_->seen_all = 0;
  plan_->injected = 0;
}

std::int64_t FaultInjectionBackend::seen(std::optional<BackendOp> op) const {
  MutexLock lock(&plan_->mu);
  if (!op.has_value()) return plan_->seen_all;
  return plan_->seen[static_cast<int>(*op)];
}

std::int64_t FaultInjectionBackend::injected() const {
  MutexLock lock(&plan_->mu);
  return plan_->injected;
}

absl::Status FaultInjectionBackend::Check(BackendOp op) {
  MutexLock lock(&plan_->mu);
  const std::int64_t nth_of_op = ++plan_->seen[static_cast<int>(op)];
  const std::int64_t nth_of_all = ++plan_->seen_all;
  for (const FaultRule& rule : plan_->plan.rules) {
    if (rule.code == absl::StatusCode::kOk) continue;  // Never fires.
    if (rule.op.has_value() && *rule.op != op) continue;
    const std::int64_t n = rule.op.has_value() ? nth_of_op : nth_of_all;
    if (n == rule.nth || (rule.and_after && n > rule.nth)) {
      ++plan_->injected;
      return absl::Status(
          rule.code,
          rule.op.has_value()
              ? absl::StrFormat("injected fault: %s call #%d (backend %s)",
                                BackendOpName(op), n, capabilities().name)
              : absl::StrFormat(
                    "injected fault: %s call #%d, call #%d of any op "
                    "(backend %s)",
                    BackendOpName(op), nth_of_op, n, capabilities().name));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DevicePtr> FaultInjectionBackend::DoReserve(std::size_t bytes) {
  if (absl::Status s = Check(BackendOp::kReserve); !s.ok()) return s;
  return BackendWrapper::DoReserve(bytes);
}

absl::Status FaultInjectionBackend::DoRelease(DevicePtr va, std::size_t bytes) {
  if (absl::Status s = Check(BackendOp::kRelease); !s.ok()) return s;
  return BackendWrapper::DoRelease(va, bytes);
}

absl::StatusOr<PhysicalHandle> FaultInjectionBackend::DoCreate(
    std::size_t bytes) {
  if (absl::Status s = Check(BackendOp::kCreate); !s.ok()) return s;
  return BackendWrapper::DoCreate(bytes);
}

absl::Status FaultInjectionBackend::DoDestroy(PhysicalHandle handle,
                                              std::size_t bytes) {
  if (absl::Status s = Check(BackendOp::kDestroy); !s.ok()) return s;
  return BackendWrapper::DoDestroy(handle, bytes);
}

absl::Status FaultInjectionBackend::DoMap(DevicePtr va, PhysicalHandle handle,
                                          std::size_t bytes, MapAccess access) {
  if (absl::Status s = Check(BackendOp::kMap); !s.ok()) return s;
  return BackendWrapper::DoMap(va, handle, bytes, access);
}

absl::Status FaultInjectionBackend::DoSetAccess(DevicePtr va,
                                                std::size_t bytes,
                                                MapAccess access) {
  if (absl::Status s = Check(BackendOp::kSetAccess); !s.ok()) return s;
  return BackendWrapper::DoSetAccess(va, bytes, access);
}

absl::Status FaultInjectionBackend::DoUnmap(DevicePtr va, std::size_t bytes) {
  if (absl::Status s = Check(BackendOp::kUnmap); !s.ok()) return s;
  return BackendWrapper::DoUnmap(va, bytes);
}

absl::StatusOr<std::shared_ptr<Backend>> MakeFaultInjectionBackend(
    std::shared_ptr<Backend> inner, FaultPlan plan) {
  VATTN_ASSIGN_OR_RETURN(std::shared_ptr<FaultInjectionBackend> backend,
                         FaultInjectionBackend::Create(std::move(inner),
                                                       std::move(plan)));
  return std::shared_ptr<Backend>(std::move(backend));
}

}  // namespace vattn
