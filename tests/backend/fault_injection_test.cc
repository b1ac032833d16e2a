// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The fault-injection wrapper: an injected failure never reaches the inner
// backend and changes nothing; rules count calls as documented.

#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"
#include "vattn/fault_injection.h"

namespace vattn {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

bool SameState(const BackendCounters& a, const BackendCounters& b) {
  return a.reservations == b.reservations &&
         a.reserved_bytes == b.reserved_bytes && a.handles == b.handles &&
         a.physical_bytes == b.physical_bytes && a.mappings == b.mappings &&
         a.mapped_bytes == b.mapped_bytes && a.fences == b.fences &&
         a.calls == b.calls;
}

class FaultInjectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HostBackendOptions options;
    options.physical_limit_bytes = 256 * kMiB;
    VATTN_ASSERT_OK_AND_ASSIGN(inner_, MakeHostBackend(options));
    VATTN_ASSERT_OK_AND_ASSIGN(fi_, FaultInjectionBackend::Create(inner_));
  }

  std::shared_ptr<Backend> inner_;
  std::shared_ptr<FaultInjectionBackend> fi_;
};

TEST_F(FaultInjectionTest, NameAndCapabilities) {
  EXPECT_EQ(fi_->capabilities().name, "fault_injection(host)");
  EXPECT_EQ(fi_->granularity(), inner_->granularity());
  EXPECT_EQ(fi_->capabilities().host_accessible, true);
  EXPECT_EQ(fi_->inner(), inner_);
}

TEST(FaultInjectionFactoryTest, NullInnerIsInvalid) {
  VATTN_EXPECT_CODE(FaultInjectionBackend::Create(nullptr),
                    absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(MakeFaultInjectionBackend(nullptr, FaultPlan{}),
                    absl::StatusCode::kInvalidArgument);
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> host, MakeHostBackend());
  VATTN_EXPECT_CODE(
      MakeFaultInjectionBackend(host, FaultPlan::FailNth(BackendOp::kMap, 0)),
      absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(
      MakeFaultInjectionBackend(
          host, FaultPlan::FailNth(BackendOp::kMap, 1, absl::StatusCode::kOk)),
      absl::StatusCode::kInvalidArgument);
}

// For each op: set up what the op needs, fail its first call by plan, and
// check that neither the wrapper nor the inner backend changed; the retry
// then succeeds (the rule fires once).
TEST_F(FaultInjectionTest, EachFailedOpChangesNothing) {
  const std::size_t g = fi_->granularity();
  for (int i = 0; i < kNumBackendOps; ++i) {
    const auto op = static_cast<BackendOp>(i);
    SCOPED_TRACE(BackendOpName(op));
    // A world with one reservation, one mapped and one unmapped handle.
    VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, fi_->Reserve(4 * g));
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle mapped, fi_->Create(g));
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle spare, fi_->Create(g));
    VATTN_ASSERT_OK(fi_->Map(va, mapped));
    VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr empty, fi_->Reserve(g));

    std::function<absl::Status()> call;
    switch (op) {
      case BackendOp::kReserve:
        call = [&] { return fi_->Reserve(2 * g).status(); };
        break;
      case BackendOp::kRelease:
        call = [&] { return fi_->Release(empty, g); };
        break;
      case BackendOp::kCreate:
        call = [&] { return fi_->Create(2 * g).status(); };
        break;
      case BackendOp::kDestroy:
        call = [&] { return fi_->Destroy(spare); };
        break;
      case BackendOp::kMap:
        call = [&] { return fi_->Map(va + 2 * g, spare); };
        break;
      case BackendOp::kUnmap:
        call = [&] { return fi_->Unmap(va, g); };
        break;
      case BackendOp::kSetAccess:
        call = [&] { return fi_->SetAccess(va, g, MapAccess::kReadOnly); };
        break;
    }

    fi_->SetPlan(
        FaultPlan::FailNth(op, 1, absl::StatusCode::kResourceExhausted));
    const BackendCounters outer_before = fi_->counters();
    const BackendCounters inner_before = inner_->counters();
    const absl::Status s = call();
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted)
        << testing::Describe(s);
    EXPECT_NE(s.message().find(std::string("injected fault: ") +
                               BackendOpName(op) + " call #1"),
              std::string::npos)
        << s.message();
    const BackendCounters outer_after = fi_->counters();
    const BackendCounters inner_after = inner_->counters();
    EXPECT_TRUE(SameState(outer_before, outer_after));
    EXPECT_EQ(outer_after.failed_calls, outer_before.failed_calls + 1);
    EXPECT_TRUE(SameState(inner_before, inner_after));
    EXPECT_EQ(inner_after.failed_calls, inner_before.failed_calls)
        << "the injected failure reached the inner backend";
    EXPECT_EQ(fi_->injected(), 1);
    EXPECT_EQ(fi_->seen(op), 1);

    // Fires once: the same call now goes through.
    VATTN_EXPECT_OK(call());
    EXPECT_EQ(fi_->injected(), 1);
    EXPECT_EQ(fi_->seen(op), 2);
    EXPECT_EQ(fi_->seen(), 2);

    // Whatever the round left live goes back through the wrapper's
    // destructor; the next round starts from a fresh wrapper.
    fi_.reset();
    EXPECT_TRUE(inner_->counters().Empty());
    VATTN_ASSERT_OK_AND_ASSIGN(fi_, FaultInjectionBackend::Create(inner_));
    EXPECT_TRUE(fi_->counters().Empty());
    EXPECT_TRUE(inner_->counters().Empty());
  }
}

TEST_F(FaultInjectionTest, AndAfterFailsEveryLaterCall) {
  const std::size_t g = fi_->granularity();
  FaultPlan plan;
  FaultRule rule;
  rule.op = BackendOp::kCreate;
  rule.nth = 2;
  rule.and_after = true;
  rule.code = absl::StatusCode::kUnavailable;
  plan.rules.push_back(rule);
  fi_->SetPlan(plan);

  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, fi_->Create(g));
  for (int i = 2; i <= 4; ++i) {
    absl::StatusOr<PhysicalHandle> failed = fi_->Create(g);
    EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_NE(failed.status().message().find("Create call #" +
                                             std::to_string(i)),
              std::string::npos)
        << failed.status().message();
  }
  // Other ops are not affected.
  VATTN_EXPECT_OK(fi_->Destroy(h));
  EXPECT_EQ(fi_->seen(BackendOp::kCreate), 4);
  EXPECT_EQ(fi_->seen(BackendOp::kDestroy), 1);
  EXPECT_EQ(fi_->seen(), 5);
  EXPECT_EQ(fi_->injected(), 3);
  EXPECT_EQ(inner_->counters().calls_of(BackendOp::kCreate), 1);
  EXPECT_EQ(fi_->counters().failed_calls, 3);
  EXPECT_EQ(inner_->counters().failed_calls, 0);
}

TEST_F(FaultInjectionTest, FailNthAnyCountsAcrossOps) {
  const std::size_t g = fi_->granularity();
  fi_->SetPlan(FaultPlan::FailNthAny(3, absl::StatusCode::kDataLoss));
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, fi_->Reserve(g));   // Call 1.
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, fi_->Create(g));  // Call 2.
  const absl::Status s = fi_->Map(va, h);                        // Call 3.
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << testing::Describe(s);
  EXPECT_NE(s.message().find("injected fault: Map call #1"), std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("#3 of any op"), std::string::npos)
      << s.message();
  EXPECT_EQ(fi_->counters().mappings, 0);
  EXPECT_EQ(inner_->counters().mappings, 0);
  VATTN_ASSERT_OK(fi_->Map(va, h));  // Call 4: only the third fails.
  EXPECT_EQ(fi_->seen(), 4);
  EXPECT_EQ(fi_->seen(BackendOp::kMap), 2);
  EXPECT_EQ(fi_->injected(), 1);
}

TEST_F(FaultInjectionTest, ContractFailuresAreNotCounted) {
  const std::size_t g = fi_->granularity();
  fi_->SetPlan(FaultPlan::FailNth(BackendOp::kCreate, 1));
  // Rejected by the contract checks before any hook: not a counted call.
  VATTN_EXPECT_CODE(fi_->Create(0), absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(fi_->Create(g + 1), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fi_->seen(BackendOp::kCreate), 0);
  EXPECT_EQ(fi_->injected(), 0);
  // So the first valid call is still call #1 and fails.
  VATTN_EXPECT_CODE(fi_->Create(g), absl::StatusCode::kInternal);
  EXPECT_EQ(fi_->injected(), 1);
}

TEST_F(FaultInjectionTest, SetPlanRestartsTheCounts) {
  const std::size_t g = fi_->granularity();
  fi_->SetPlan(FaultPlan::FailNth(BackendOp::kReserve, 2));
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr a, fi_->Reserve(g));
  VATTN_EXPECT_CODE(fi_->Reserve(g), absl::StatusCode::kInternal);
  EXPECT_EQ(fi_->seen(BackendOp::kReserve), 2);
  EXPECT_EQ(fi_->injected(), 1);

  fi_->SetPlan(FaultPlan::FailNth(BackendOp::kReserve, 2,
                                  absl::StatusCode::kAborted));
  EXPECT_EQ(fi_->seen(), 0);
  EXPECT_EQ(fi_->seen(BackendOp::kReserve), 0);
  EXPECT_EQ(fi_->injected(), 0);
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr b, fi_->Reserve(g));  // #1 again.
  VATTN_EXPECT_CODE(fi_->Reserve(g), absl::StatusCode::kAborted);  // #2.
  VATTN_ASSERT_OK(fi_->Release(a, g));
  VATTN_ASSERT_OK(fi_->Release(b, g));
  EXPECT_TRUE(inner_->counters().Empty());
}

TEST_F(FaultInjectionTest, SeveralRulesAndTheirCodes) {
  const std::size_t g = fi_->granularity();
  FaultPlan plan = FaultPlan::FailNth(BackendOp::kMap, 1,
                                      absl::StatusCode::kResourceExhausted);
  plan.rules.push_back(
      FaultPlan::FailNth(BackendOp::kUnmap, 1, absl::StatusCode::kInternal)
          .rules[0]);
  fi_->SetPlan(plan);
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, fi_->Reserve(g));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, fi_->Create(g));
  VATTN_EXPECT_CODE(fi_->Map(va, h), absl::StatusCode::kResourceExhausted);
  VATTN_ASSERT_OK(fi_->Map(va, h));
  VATTN_EXPECT_CODE(fi_->Unmap(va, g), absl::StatusCode::kInternal);
  EXPECT_EQ(inner_->counters().mappings, 1);  // The failed Unmap did nothing.
  VATTN_ASSERT_OK(fi_->Unmap(va, g));
  EXPECT_EQ(fi_->injected(), 2);
}

TEST_F(FaultInjectionTest, DestructorIgnoresThePlanAndCleansUp) {
  const std::size_t g = fi_->granularity();
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, fi_->Reserve(2 * g));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, fi_->Create(g));
  VATTN_ASSERT_OK(fi_->Map(va, h));
  // Every further call would fail...
  FaultPlan plan = FaultPlan::FailNthAny(1);
  plan.rules[0].and_after = true;
  fi_->SetPlan(plan);
  VATTN_EXPECT_CODE(fi_->Unmap(va, g), absl::StatusCode::kInternal);
  // ...but shutdown is not failed on purpose: the inner ends up empty.
  fi_.reset();
  EXPECT_TRUE(inner_->counters().Empty());
}

}  // namespace
}  // namespace vattn
