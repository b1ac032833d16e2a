// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The CUDA backend's driver-side logic that needs no device: how driver
// errors become status codes, the default budget, and the stream handles
// vattn::Stream hands the driver. Runs on every machine (CudaCallError only
// asks the driver for names when one is loaded).

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "src/backend/cuda_driver.h"
#include "vattn/stream.h"

namespace vattn {
namespace {

using ::testing::HasSubstr;

constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kGiB = std::size_t{1} << 30;

TEST(CudaDefaultBudgetTest, FreeMemoryLessTheMargin) {
  // 141 GiB card, 140 GiB free: the margin is 5% of total (7.05 GiB).
  const std::size_t total = 141 * kGiB;
  const std::size_t g = 2 * kMiB;
  const std::size_t budget =
      internal::CudaDefaultBudget(140 * kGiB, total, g);
  EXPECT_EQ(budget % g, 0u);
  EXPECT_LE(budget, 140 * kGiB - total / 20);
  EXPECT_GT(budget, 140 * kGiB - total / 20 - g);
  // A small card: the margin is at least 1 GiB.
  EXPECT_EQ(internal::CudaDefaultBudget(8 * kGiB, 8 * kGiB, g), 7 * kGiB);
  // Less free than the margin: one granule, never 0 (0 would mean "the
  // device's whole memory" to the cache).
  EXPECT_EQ(internal::CudaDefaultBudget(512 * kMiB, 8 * kGiB, g), g);
  EXPECT_EQ(internal::CudaDefaultBudget(0, 8 * kGiB, g), g);
}

#if defined(VATTN_HAVE_CUDA_HEADERS)

TEST(CudaStreamHandlesTest, StreamMatchesTheDriversSpecialHandles) {
  EXPECT_EQ(Stream::Legacy().value(), static_cast<void*>(CU_STREAM_LEGACY));
  EXPECT_EQ(Stream::PerThread().value(),
            static_cast<void*>(CU_STREAM_PER_THREAD));
  EXPECT_EQ(Stream::FromHandle(CU_STREAM_PER_THREAD), Stream::PerThread());
}

absl::Status ErrorOf(CUresult r) {
  return internal::CudaCallError(r, "cuMemMap(va, bytes, 0, handle, 0)",
                                 "/x/src/backend/cuda.cc", 42);
}

// Issue 11 item 4: Backend checks every argument before the driver sees it,
// so CUDA_ERROR_INVALID_VALUE is vattn's bug (or a device property), not
// the caller's: Internal, naming the call.
TEST(CudaCallErrorTest, InvalidValueIsInternalAndNamesTheCall) {
  const absl::Status s = ErrorOf(CUDA_ERROR_INVALID_VALUE);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("cuMemMap("));
  EXPECT_THAT(std::string(s.message()), HasSubstr("src/backend/cuda.cc:42"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("CUDA_ERROR_INVALID_VALUE"));
}

TEST(CudaCallErrorTest, CodesFollowTheContract) {
  EXPECT_EQ(ErrorOf(CUDA_ERROR_OUT_OF_MEMORY).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(ErrorOf(CUDA_ERROR_NO_DEVICE).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(ErrorOf(CUDA_ERROR_NOT_SUPPORTED).code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(ErrorOf(CUDA_ERROR_ILLEGAL_ADDRESS).code(),
            absl::StatusCode::kInternal);
}

// Issue 11 item 7: what the driver refuses during a graph capture is a
// precondition of the caller's, not an internal error.
TEST(CudaCallErrorTest, CaptureErrorsAreFailedPrecondition) {
  for (CUresult r : {CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                     CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                     CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
                     CUDA_ERROR_CAPTURED_EVENT,
                     CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD}) {
    const absl::Status s = ErrorOf(r);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("graph"));
  }
}

#else

TEST(CudaCallErrorTest, InvalidValueIsInternalAndNamesTheCall) {
  GTEST_SKIP() << "built without the CUDA toolkit's headers";
}

#endif  // VATTN_HAVE_CUDA_HEADERS

}  // namespace
}  // namespace vattn
