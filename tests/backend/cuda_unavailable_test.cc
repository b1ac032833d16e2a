// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The CUDA backend on any machine: where no driver can be loaded (this CPU
// machine), MakeCudaBackend and CudaDeviceCount say so with Unavailable and a
// reason that names libcuda; where a driver and a device exist, both succeed.
// The test binary itself never links libcuda (see no_libcuda_dependency).

#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"

namespace vattn {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;

TEST(CudaUnavailableTest, DeviceCountAndFactoryAgree) {
  const absl::StatusOr<int> count = CudaDeviceCount();
  if (!count.ok()) {
    // No driver (or vattn built without the toolkit): both calls report
    // Unavailable with a reason naming the CUDA driver library.
    EXPECT_EQ(count.status().code(), absl::StatusCode::kUnavailable)
        << testing::Describe(count);
    EXPECT_THAT(std::string(count.status().message()),
                AnyOf(HasSubstr("libcuda"), HasSubstr("cuInit")));
    const absl::StatusOr<std::shared_ptr<Backend>> backend = MakeCudaBackend(0);
    ASSERT_FALSE(backend.ok());
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable)
        << testing::Describe(backend);
    EXPECT_EQ(backend.status().message(), count.status().message());
    std::printf("no usable CUDA driver here: %s\n",
                testing::Describe(count).c_str());
    return;
  }
  // A driver: the count is never negative, and device 0 works when present.
  ASSERT_GE(*count, 0);
  const absl::StatusOr<std::shared_ptr<Backend>> backend = MakeCudaBackend(0);
  if (*count == 0) {
    ASSERT_FALSE(backend.ok());
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable)
        << testing::Describe(backend);
    return;
  }
  VATTN_ASSERT_OK(backend);
  EXPECT_EQ((*backend)->capabilities().device, 0);
  EXPECT_TRUE((*backend)->counters().Empty());
  std::printf("CUDA driver with %d device(s); device 0 is %s\n", *count,
              (*backend)->capabilities().name.c_str());
}

TEST(CudaUnavailableTest, NoDriverMessageNamesTheLibrary) {
  const absl::StatusOr<int> count = CudaDeviceCount();
  if (count.ok()) {
    GTEST_SKIP() << "a CUDA driver is loaded here (" << *count
                 << " device(s)); nothing is unavailable";
  }
  const std::string message(count.status().message());
  // Either the loader could not open libcuda.so.1 (with dlerror's reason) or
  // vattn was built without the toolkit; both say why in words.
  EXPECT_THAT(message, AnyOf(HasSubstr("libcuda.so.1 could not be loaded"),
                             HasSubstr("built without the CUDA toolkit"),
                             HasSubstr("cuInit")))
      << message;
}

TEST(CudaUnavailableTest, RepeatedCallsGiveTheSameAnswer) {
  // The driver is loaded once per process; later calls must not retry
  // differently or crash.
  const absl::StatusOr<int> first = CudaDeviceCount();
  for (int i = 0; i < 3; ++i) {
    const absl::StatusOr<int> again = CudaDeviceCount();
    EXPECT_EQ(again.ok(), first.ok());
    if (first.ok() && again.ok()) {
      EXPECT_EQ(*again, *first);
    } else {
      EXPECT_EQ(again.status(), first.status());
    }
  }
}

TEST(CudaUnavailableTest, NegativeOrdinalIsRejected) {
  const absl::StatusOr<std::shared_ptr<Backend>> backend = MakeCudaBackend(-1);
  ASSERT_FALSE(backend.ok());
  const absl::StatusOr<int> count = CudaDeviceCount();
  if (!count.ok() || *count == 0) {
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable)
        << testing::Describe(backend);
  } else {
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kInvalidArgument)
        << testing::Describe(backend);
    EXPECT_THAT(std::string(backend.status().message()), HasSubstr("-1"));
  }
}

}  // namespace
}  // namespace vattn
