// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The latency model: fitted costs against DESIGN.md's measured table, and the
// wrapper charging at least the modelled time (lower bounds only: an upper
// bound on wall time flakes on a loaded machine).

#include <chrono>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"
#include "vattn/latency_model.h"

namespace vattn {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

double MicrosSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now() - start)
      .count();
}

// DESIGN.md, "Measured cost model": H200 medians for one handle of 2 MiB,
// 128 MiB and 512 MiB. Ranges are taken at their midpoint; map is cuMemMap +
// cuMemSetAccess.
struct Row {
  BackendOp op;
  double us_2mib;
  double us_128mib;
  double us_512mib;
};
constexpr Row kH200Table[] = {
    {BackendOp::kCreate, 13.5, 17, 27},
    {BackendOp::kMap, 1.2 + 39, 1.6 + 49, 2.1 + 69},
    {BackendOp::kUnmap, 24, 28, 34},
    {BackendOp::kDestroy, 14.5, 80, 287},
};

TEST(LatencyCostsTest, H200FitReproducesTheMeasuredTable) {
  const LatencyCosts costs = LatencyCosts::H200();
  for (const Row& row : kH200Table) {
    SCOPED_TRACE(BackendOpName(row.op));
    const CallCost& cost = costs.For(row.op);
    EXPECT_NEAR(cost.Micros(2 * kMiB), row.us_2mib, 0.1 * row.us_2mib);
    EXPECT_NEAR(cost.Micros(128 * kMiB), row.us_128mib, 0.1 * row.us_128mib);
    EXPECT_NEAR(cost.Micros(512 * kMiB), row.us_512mib, 0.1 * row.us_512mib);
  }
  // Address space is nearly free whatever the size.
  EXPECT_NEAR(costs.reserve.Micros(std::size_t{64} << 40), 5, 1);
  EXPECT_NEAR(costs.release.Micros(2 * kMiB), 5, 1);
}

TEST(LatencyCostsTest, H100FitReproducesItsLine) {
  const LatencyCosts costs = LatencyCosts::H100();
  // Per 2 MiB handle: create 7.4, map 0.5 + access 21, unmap 15, release 9.
  EXPECT_NEAR(costs.create.Micros(2 * kMiB), 7.4, 0.74);
  EXPECT_NEAR(costs.map.Micros(2 * kMiB), 21.5, 2.15);
  EXPECT_NEAR(costs.unmap.Micros(2 * kMiB), 15, 1.5);
  EXPECT_NEAR(costs.destroy.Micros(2 * kMiB), 9, 0.9);
  // One 128 MiB handle: access 43 us (map itself adds about 1 us).
  EXPECT_NEAR(costs.map.Micros(128 * kMiB), 44, 4.4);
  // Faster than the H200 on every mapping call, as measured.
  const LatencyCosts h200 = LatencyCosts::H200();
  for (BackendOp op : {BackendOp::kCreate, BackendOp::kMap, BackendOp::kUnmap,
                       BackendOp::kDestroy}) {
    EXPECT_LT(costs.For(op).Micros(2 * kMiB), h200.For(op).Micros(2 * kMiB))
        << BackendOpName(op);
  }
}

TEST(LatencyCostsTest, ForPicksTheOpsCost) {
  LatencyCosts costs;
  costs.reserve = {1, 0};
  costs.release = {2, 0};
  costs.create = {3, 0};
  costs.destroy = {4, 0};
  costs.map = {5, 0};
  costs.unmap = {6, 0};
  costs.set_access = {7, 0};
  for (int i = 0; i < kNumBackendOps; ++i) {
    EXPECT_EQ(costs.For(static_cast<BackendOp>(i)).base_us, i + 1);
  }
  const CallCost linear{10, 2};
  EXPECT_DOUBLE_EQ(linear.Micros(0), 10);
  EXPECT_DOUBLE_EQ(linear.Micros(2 * kMiB), 12);
  EXPECT_DOUBLE_EQ(linear.Micros(kMiB), 11);
  EXPECT_DOUBLE_EQ(linear.Micros(512 * kMiB), 10 + 2 * 256);
}

TEST(LatencyCostsTest, ZeroCostsNothing) {
  const LatencyCosts costs = LatencyCosts::Zero();
  for (int i = 0; i < kNumBackendOps; ++i) {
    EXPECT_EQ(costs.For(static_cast<BackendOp>(i)).Micros(512 * kMiB), 0.0);
  }
}

TEST(LatencyModelBackendTest, NullInnerIsInvalid) {
  VATTN_EXPECT_CODE(MakeLatencyModelBackend(nullptr),
                    absl::StatusCode::kInvalidArgument);
}

// Issue 9 defect 7: NaN, infinite, negative and absurd costs were accepted,
// then converting them to clock ticks in the spin loop was undefined.
TEST(LatencyModelBackendTest, UnusableCostsAreInvalid) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> host, MakeHostBackend());
  struct Case {
    double value;
    const char* text;
  };
  const Case cases[] = {
      {std::numeric_limits<double>::quiet_NaN(), "nan"},
      {std::numeric_limits<double>::infinity(), "inf"},
      {-std::numeric_limits<double>::infinity(), "-inf"},
      {-1.0, "-1"},
      {1e300, "1e+300"},
      {kMaxCallCostMicros * 2, "2e+06"},
  };
  for (const Case& c : cases) {
    for (int field = 0; field < 2; ++field) {
      SCOPED_TRACE(::testing::Message() << c.text << " field " << field);
      LatencyCosts costs = LatencyCosts::H200();
      (field == 0 ? costs.unmap.base_us : costs.unmap.per_granule_us) =
          c.value;
      const absl::StatusOr<std::shared_ptr<Backend>> lm =
          MakeLatencyModelBackend(host, costs);
      ASSERT_EQ(lm.status().code(), absl::StatusCode::kInvalidArgument)
          << testing::Describe(lm);
      EXPECT_THAT(std::string(lm.status().message()),
                  ::testing::HasSubstr(field == 0 ? "costs.unmap.base_us"
                                                  : "costs.unmap.per_granule_us"));
      EXPECT_THAT(std::string(lm.status().message()),
                  ::testing::HasSubstr(c.text));
    }
  }
  // The bounds themselves are accepted.
  LatencyCosts edge = LatencyCosts::Zero();
  edge.map.base_us = kMaxCallCostMicros;
  VATTN_EXPECT_OK(MakeLatencyModelBackend(host, edge).status());
}

TEST(LatencyModelBackendTest, ZeroCostsForwardUnchanged) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> inner,
                             MakeHostBackend());
  VATTN_ASSERT_OK_AND_ASSIGN(
      std::shared_ptr<Backend> lm,
      MakeLatencyModelBackend(inner, LatencyCosts::Zero()));
  EXPECT_EQ(lm->capabilities().name, "latency_model(host)");
  EXPECT_EQ(lm->granularity(), inner->granularity());
  EXPECT_EQ(lm->capabilities().max_reservation_bytes,
            inner->capabilities().max_reservation_bytes);
  EXPECT_TRUE(lm->capabilities().host_accessible);

  const std::size_t g = lm->granularity();
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, lm->Reserve(2 * g));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, lm->Create(g));
  VATTN_ASSERT_OK(lm->Map(va + g, h));
  const std::vector<char> data(100, 'x');
  VATTN_ASSERT_OK(lm->CopyToDevice(va + g, data.data(), data.size()));
  std::vector<char> back(100);
  VATTN_ASSERT_OK(inner->CopyFromDevice(back.data(), va + g, back.size()));
  EXPECT_EQ(back, data);  // Same memory, seen through the inner.

  // Both backends count the same calls and live objects.
  BackendCounters outer = lm->counters();
  BackendCounters in = inner->counters();
  EXPECT_EQ(outer.calls, in.calls);
  EXPECT_EQ(outer.mappings, 1);
  EXPECT_EQ(in.mappings, 1);
  EXPECT_EQ(in.handles, 1);
  EXPECT_EQ(in.reservations, 1);

  // Errors caught by the contract checks never reach the inner.
  VATTN_EXPECT_CODE(lm->Destroy(h), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(inner->counters().failed_calls, 0);

  // The wrapper's destructor gives back what was left through the inner.
  lm.reset();
  EXPECT_TRUE(inner->counters().Empty());
}

TEST(LatencyModelBackendTest, CallsTakeAtLeastTheModelledTime) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> inner,
                             MakeHostBackend());
  const LatencyCosts costs = LatencyCosts::H200();
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> lm,
                             MakeLatencyModelBackend(inner, costs));
  const std::size_t bytes = 64 * kMiB;
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, lm->Reserve(bytes));

  auto start = std::chrono::steady_clock::now();
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, lm->Create(bytes));
  EXPECT_GE(MicrosSince(start), costs.create.Micros(bytes));

  start = std::chrono::steady_clock::now();
  VATTN_ASSERT_OK(lm->Map(va, h));
  EXPECT_GE(MicrosSince(start), costs.map.Micros(bytes));

  start = std::chrono::steady_clock::now();
  VATTN_ASSERT_OK(lm->Unmap(va, bytes));
  EXPECT_GE(MicrosSince(start), costs.unmap.Micros(bytes));

  start = std::chrono::steady_clock::now();
  VATTN_ASSERT_OK(lm->Destroy(h));
  EXPECT_GE(MicrosSince(start), costs.destroy.Micros(bytes));

  start = std::chrono::steady_clock::now();
  VATTN_ASSERT_OK(lm->Release(va, bytes));
  EXPECT_GE(MicrosSince(start), costs.release.Micros(bytes));
}

TEST(LatencyModelBackendTest, MappingIsSerializedAcrossThreads) {
  // With a flat 200 us per Map, 4 threads x 10 maps cannot finish in less
  // than 40 x 200 us, however many cores there are: the modelled driver
  // does one mapping call at a time.
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> inner,
                             MakeHostBackend());
  LatencyCosts costs = LatencyCosts::Zero();
  costs.map = {200, 0};
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> lm,
                             MakeLatencyModelBackend(inner, costs));
  const std::size_t g = lm->granularity();
  constexpr int kThreads = 4;
  constexpr int kMaps = 10;
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, lm->Reserve(kThreads * g));
  std::vector<PhysicalHandle> handles;
  for (int t = 0; t < kThreads; ++t) {
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, lm->Create(g));
    handles.push_back(h);
  }
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const DevicePtr at = va + static_cast<std::size_t>(t) * g;
      for (int i = 0; i < kMaps; ++i) {
        VATTN_EXPECT_OK(lm->Map(at, handles[static_cast<std::size_t>(t)]));
        VATTN_EXPECT_OK(lm->Unmap(at, g));
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_GE(MicrosSince(start), kThreads * kMaps * 200.0);
  EXPECT_EQ(lm->counters().calls_of(BackendOp::kMap), kThreads * kMaps);
}

}  // namespace
}  // namespace vattn
