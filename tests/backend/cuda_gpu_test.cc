// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// CUDA-specific cases of the CUDA backend (the shared contract suite runs in
// backend_contract_gpu_test). Each case skips, with the reason, where no
// driver or device exists. Streams for the fence cases are driven through
// vattn's own run-time driver loader, so this binary never links libcuda.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "src/backend/cuda_driver.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"
#include "vattn/status.h"

namespace vattn {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kTiB = std::size_t{1} << 40;

// Skips the calling test (from the test body or SetUp) unless a CUDA device
// can be used; sets *count otherwise.
#define VATTN_SKIP_WITHOUT_CUDA_DEVICE(count)                             \
  do {                                                                    \
    const absl::StatusOr<int> vattn_count_ = CudaDeviceCount();           \
    if (!vattn_count_.ok()) {                                             \
      GTEST_SKIP() << "no CUDA driver: "                                  \
                   << testing::Describe(vattn_count_);                    \
    }                                                                     \
    if (*vattn_count_ == 0) {                                             \
      GTEST_SKIP() << "the CUDA driver reports no device";                \
    }                                                                     \
    count = *vattn_count_;                                                \
  } while (false)

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    VATTN_SKIP_WITHOUT_CUDA_DEVICE(device_count_);
    VATTN_ASSERT_OK_AND_ASSIGN(backend_, MakeCudaBackend(0));
    g_ = backend_->granularity();
  }

  void TearDown() override {
    if (backend_ != nullptr) {
      EXPECT_TRUE(backend_->counters().Empty()) << "a test leaked objects";
    }
  }

  int device_count_ = 0;
  std::shared_ptr<Backend> backend_;
  std::size_t g_ = 0;
};

double MillisSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now() - start)
      .count();
}

TEST_F(CudaBackendTest, CapabilitiesDescribeTheDevice) {
  const BackendCapabilities& caps = backend_->capabilities();
  EXPECT_EQ(caps.device, 0);
  EXPECT_GT(caps.granularity, 0u);
  EXPECT_EQ(caps.granularity % (2 * kMiB), 0u)
      << "granularity " << caps.granularity << " is not a multiple of 2 MiB";
  EXPECT_EQ(caps.granularity & (caps.granularity - 1), 0u);
  EXPECT_THAT(caps.name, StartsWith("cuda:0 ("));
  // A real device name inside the parentheses, e.g. "NVIDIA H100 80GB HBM3".
  EXPECT_GT(caps.name.size(), std::string("cuda:0 ()").size()) << caps.name;
  EXPECT_EQ(caps.name.back(), ')');
  EXPECT_EQ(caps.max_reservation_bytes, 64 * kTiB);
  EXPECT_GT(caps.physical_memory_bytes, std::size_t{1} << 30);
  EXPECT_FALSE(caps.host_accessible);
  EXPECT_TRUE(caps.has_streams);
  std::printf("%s: granularity %zu bytes, %zu MiB of device memory\n",
              caps.name.c_str(), caps.granularity,
              caps.physical_memory_bytes / kMiB);
}

TEST_F(CudaBackendTest, Reserves64TiBButNotMore) {
  const auto start = std::chrono::steady_clock::now();
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, backend_->Reserve(64 * kTiB));
  const double reserve_ms = MillisSince(start);
  EXPECT_NE(va, 0u);
  EXPECT_EQ(va % g_, 0u);
  VATTN_EXPECT_OK(backend_->Release(va, 64 * kTiB));
  std::printf("Reserve(64 TiB) took %.3f ms\n", reserve_ms);
  VATTN_EXPECT_CODE(backend_->Reserve(128 * kTiB),
                    absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaBackendTest, ZeroAndCopiesRoundTrip) {
  const std::size_t bytes = 2 * g_;
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, backend_->Reserve(bytes));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, backend_->Create(bytes));
  VATTN_ASSERT_OK(backend_->Map(va, h));

  std::vector<std::uint8_t> pattern(bytes);
  for (std::size_t i = 0; i < bytes; ++i) {
    pattern[i] = static_cast<std::uint8_t>(i * 31 + 7);
  }
  VATTN_ASSERT_OK(backend_->CopyToDevice(va, pattern.data(), bytes));
  VATTN_ASSERT_OK(backend_->Zero(va + g_ / 2, g_));
  std::vector<std::uint8_t> back(bytes, 0xAB);
  VATTN_ASSERT_OK(backend_->CopyFromDevice(back.data(), va, bytes));
  for (std::size_t i = 0; i < bytes; ++i) {
    const bool zeroed = i >= g_ / 2 && i < g_ / 2 + g_;
    ASSERT_EQ(back[i], zeroed ? 0 : pattern[i]) << "byte " << i;
  }

  VATTN_EXPECT_OK(backend_->Unmap(va, bytes));
  VATTN_EXPECT_OK(backend_->Destroy(h));
  VATTN_EXPECT_OK(backend_->Release(va, bytes));
}

TEST_F(CudaBackendTest, AliasedMappingsShareMemory) {
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, backend_->Reserve(2 * g_));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, backend_->Create(g_));
  VATTN_ASSERT_OK(backend_->Map(va, h));
  VATTN_ASSERT_OK(backend_->Map(va + g_, h));
  const std::uint64_t value = 0x0123456789abcdefULL;
  VATTN_ASSERT_OK(backend_->CopyToDevice(va + 64, &value, sizeof(value)));
  std::uint64_t seen = 0;
  VATTN_ASSERT_OK(backend_->CopyFromDevice(&seen, va + g_ + 64, sizeof(seen)));
  EXPECT_EQ(seen, value);
  VATTN_EXPECT_OK(backend_->Unmap(va + g_, g_));
  VATTN_EXPECT_OK(backend_->Unmap(va, g_));
  VATTN_EXPECT_OK(backend_->Destroy(h));
  VATTN_EXPECT_OK(backend_->Release(va, 2 * g_));
}

// DESIGN.md: cost is per handle, not per byte. Both shapes must work; the
// times are printed for the record (benchmarks measure them properly).
TEST_F(CudaBackendTest, Maps64SmallHandlesAndOneLargeHandle) {
  constexpr int kSmall = 64;
  const std::size_t large_bytes = kSmall * g_;
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, backend_->Reserve(2 * large_bytes));

  std::vector<PhysicalHandle> small;
  for (int i = 0; i < kSmall; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, backend_->Create(g_));
    small.push_back(h);
  }
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle large,
                             backend_->Create(large_bytes));

  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kSmall; ++i) {
    VATTN_ASSERT_OK(backend_->Map(va + i * g_, small[i]));
  }
  const double small_ms = MillisSince(start);
  start = std::chrono::steady_clock::now();
  VATTN_ASSERT_OK(backend_->Map(va + large_bytes, large));
  const double large_ms = MillisSince(start);

  BackendCounters c = backend_->counters();
  EXPECT_EQ(c.mappings, kSmall + 1);
  EXPECT_EQ(c.mapped_bytes, static_cast<std::int64_t>(2 * large_bytes));
  EXPECT_EQ(c.handles, kSmall + 1);

  // One copy across all 65 mappings: the range is contiguous to the device.
  std::vector<std::uint32_t> data(2 * large_bytes / sizeof(std::uint32_t));
  for (std::size_t i = 0; i < data.size(); ++i) {
    data[i] = static_cast<std::uint32_t>(i * 2654435761u);
  }
  VATTN_ASSERT_OK(backend_->CopyToDevice(va, data.data(), 2 * large_bytes));
  std::vector<std::uint32_t> back(data.size());
  VATTN_ASSERT_OK(backend_->CopyFromDevice(back.data(), va, 2 * large_bytes));
  EXPECT_TRUE(back == data) << "data read back differs";

  for (int i = 0; i < kSmall; ++i) {
    VATTN_ASSERT_OK(backend_->Unmap(va + i * g_, g_));
    VATTN_ASSERT_OK(backend_->Destroy(small[i]));
  }
  VATTN_ASSERT_OK(backend_->Unmap(va + large_bytes, large_bytes));
  VATTN_ASSERT_OK(backend_->Destroy(large));
  VATTN_ASSERT_OK(backend_->Release(va, 2 * large_bytes));
  std::printf(
      "map+access: %d x %zu MiB handles %.3f ms; one %zu MiB handle %.3f ms\n",
      kSmall, g_ / kMiB, small_ms, large_bytes / kMiB, large_ms);
}

TEST_F(CudaBackendTest, OutOfMemoryIsResourceExhaustedAndChangesNothing) {
  const std::size_t caps_total = backend_->capabilities().physical_memory_bytes;
  // Twice the device's memory, rounded up to the granularity: no driver can
  // hand that out as one physical allocation.
  const std::size_t absurd = (2 * caps_total + g_ - 1) / g_ * g_;
  const BackendCounters before = backend_->counters();
  const absl::StatusOr<PhysicalHandle> h = backend_->Create(absurd);
  ASSERT_FALSE(h.ok()) << "cuMemCreate of " << absurd << " bytes succeeded";
  EXPECT_EQ(h.status().code(), absl::StatusCode::kResourceExhausted)
      << testing::Describe(h);
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("cuMemCreate"));
  EXPECT_THAT(std::string(h.status().message()),
              HasSubstr("CUDA_ERROR_OUT_OF_MEMORY"));
  const BackendCounters after = backend_->counters();
  EXPECT_EQ(after.handles, before.handles);
  EXPECT_EQ(after.physical_bytes, before.physical_bytes);
  EXPECT_EQ(after.calls, before.calls);
  EXPECT_EQ(after.failed_calls, before.failed_calls + 1);
  std::printf("Create(%zu) -> %s\n", absurd, testing::Describe(h).c_str());
}

TEST_F(CudaBackendTest, InvalidOrdinalIsInvalidArgument) {
  const absl::StatusOr<std::shared_ptr<Backend>> beyond =
      MakeCudaBackend(device_count_);
  ASSERT_FALSE(beyond.ok());
  EXPECT_EQ(beyond.status().code(), absl::StatusCode::kInvalidArgument)
      << testing::Describe(beyond);
  EXPECT_THAT(std::string(beyond.status().message()),
              HasSubstr("ordinal " + std::to_string(device_count_)));
  VATTN_EXPECT_CODE(MakeCudaBackend(-1), absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaBackendTest, TwoBackendsOnOneDeviceAreIndependent) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> other,
                             MakeCudaBackend(0));
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, other->Reserve(g_));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, other->Create(g_));
  VATTN_ASSERT_OK(other->Map(va, h));
  // Destroying a backend with live objects takes them back and releases its
  // reference on the primary context; the first backend keeps working.
  other.reset();
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va2, backend_->Reserve(g_));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h2, backend_->Create(g_));
  VATTN_ASSERT_OK(backend_->Map(va2, h2));
  VATTN_ASSERT_OK(backend_->Zero(va2, g_));
  VATTN_EXPECT_OK(backend_->Unmap(va2, g_));
  VATTN_EXPECT_OK(backend_->Destroy(h2));
  VATTN_EXPECT_OK(backend_->Release(va2, g_));
}

TEST_F(CudaBackendTest, FenceOnTheDefaultStreamCompletes) {
  VATTN_ASSERT_OK_AND_ASSIGN(FenceId fence, backend_->RecordFence(Stream{}));
  EXPECT_NE(fence, kCompletedFence);
  EXPECT_EQ(backend_->counters().fences, 1);
  VATTN_ASSERT_OK(backend_->WaitFence(fence));
  VATTN_ASSERT_OK_AND_ASSIGN(bool done, backend_->FenceDone(fence));
  EXPECT_TRUE(done);
  VATTN_EXPECT_OK(backend_->ReleaseFence(fence));
  VATTN_EXPECT_CODE(backend_->FenceDone(fence),
                    absl::StatusCode::kInvalidArgument);
}

#if defined(VATTN_HAVE_CUDA_HEADERS)

// A stream of device 0 held busy by a host function until Release(): work
// queued behind it cannot finish before the test allows it.
class BlockedStream {
 public:
  static absl::StatusOr<std::unique_ptr<BlockedStream>> Make() {
    VATTN_ASSIGN_OR_RETURN(const internal::CudaDriver* d,
                           internal::LoadCudaDriver());
    auto s = std::unique_ptr<BlockedStream>(new BlockedStream(*d));
    CUdevice device = 0;
    VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(d->cuDeviceGet(&device, 0)));
    VATTN_RETURN_IF_ERROR(
        VATTN_CU_STATUS(d->cuDevicePrimaryCtxRetain(&s->context_, device)));
    s->device_ = device;
    VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(d->cuCtxSetCurrent(s->context_)));
    VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(
        d->cuStreamCreate(&s->stream_, CU_STREAM_NON_BLOCKING)));
    VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(
        d->cuLaunchHostFunc(s->stream_, &BlockedStream::Block, s.get())));
    return s;
  }

  ~BlockedStream() {
    Release();
    if (stream_ != nullptr) {
      (void)d_.cuCtxSetCurrent(context_);
      (void)d_.cuStreamSynchronize(stream_);
      (void)d_.cuStreamDestroy(stream_);
    }
    if (context_ != nullptr) (void)d_.cuDevicePrimaryCtxRelease(device_);
  }

  Stream stream() const { return Stream::FromHandle(stream_); }
  void Release() { released_.store(true); }

 private:
  explicit BlockedStream(const internal::CudaDriver& d) : d_(d) {}

  // Runs on a driver thread; must not call CUDA. Gives up after 60 s so a
  // failing test cannot hang the process.
  static void CUDA_CB Block(void* self) {
    auto* s = static_cast<BlockedStream*>(self);
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!s->released_.load() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  const internal::CudaDriver& d_;
  CUdevice device_ = 0;
  CUcontext context_ = nullptr;
  CUstream stream_ = nullptr;
  std::atomic<bool> released_{false};
};

TEST_F(CudaBackendTest, FenceOnABusyStreamIsNotDoneUntilTheWorkFinishes) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockedStream> blocked,
                             BlockedStream::Make());
  VATTN_ASSERT_OK_AND_ASSIGN(FenceId fence,
                             backend_->RecordFence(blocked->stream()));
  VATTN_ASSERT_OK_AND_ASSIGN(bool done, backend_->FenceDone(fence));
  EXPECT_FALSE(done) << "fence done while its stream is still blocked";
  // Still not done a little later: the stream waits for the host function.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  VATTN_ASSERT_OK_AND_ASSIGN(done, backend_->FenceDone(fence));
  EXPECT_FALSE(done);

  std::thread releaser([&blocked] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    blocked->Release();
  });
  const auto start = std::chrono::steady_clock::now();
  const absl::Status waited = backend_->WaitFence(fence);
  const double wait_ms = MillisSince(start);
  releaser.join();
  VATTN_ASSERT_OK(waited);
  EXPECT_GE(wait_ms, 5.0) << "WaitFence returned before the stream was freed";
  VATTN_ASSERT_OK_AND_ASSIGN(done, backend_->FenceDone(fence));
  EXPECT_TRUE(done);
  VATTN_EXPECT_OK(backend_->ReleaseFence(fence));
}

TEST_F(CudaBackendTest, FencesAreIndependentAndReusable) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockedStream> blocked,
                             BlockedStream::Make());
  VATTN_ASSERT_OK_AND_ASSIGN(FenceId idle, backend_->RecordFence(Stream{}));
  VATTN_ASSERT_OK_AND_ASSIGN(FenceId busy,
                             backend_->RecordFence(blocked->stream()));
  EXPECT_NE(idle, busy);
  VATTN_ASSERT_OK(backend_->WaitFence(idle));
  VATTN_ASSERT_OK_AND_ASSIGN(bool done, backend_->FenceDone(busy));
  EXPECT_FALSE(done);
  // Releasing an unfinished fence is allowed; its event goes back to the
  // pool and a new fence on an idle stream must not inherit its state.
  VATTN_EXPECT_OK(backend_->ReleaseFence(busy));
  VATTN_ASSERT_OK_AND_ASSIGN(FenceId again, backend_->RecordFence(Stream{}));
  VATTN_ASSERT_OK(backend_->WaitFence(again));
  VATTN_ASSERT_OK_AND_ASSIGN(done, backend_->FenceDone(again));
  EXPECT_TRUE(done);
  VATTN_EXPECT_OK(backend_->ReleaseFence(again));
  VATTN_EXPECT_OK(backend_->ReleaseFence(idle));
  blocked->Release();
}

TEST_F(CudaBackendTest, CallsLeaveTheCallersContextAlone) {
  VATTN_ASSERT_OK_AND_ASSIGN(const internal::CudaDriver* d,
                             internal::LoadCudaDriver());
  std::thread worker([&] {
    CUcontext before = reinterpret_cast<CUcontext>(0x1);
    ASSERT_EQ(d->cuCtxGetCurrent(&before), CUDA_SUCCESS);
    ASSERT_EQ(before, nullptr) << "a fresh thread has no current context";
    VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, backend_->Reserve(g_));
    CUcontext after = reinterpret_cast<CUcontext>(0x1);
    ASSERT_EQ(d->cuCtxGetCurrent(&after), CUDA_SUCCESS);
    EXPECT_EQ(after, nullptr);
    VATTN_EXPECT_OK(backend_->Release(va, g_));
  });
  worker.join();
}

#else  // !VATTN_HAVE_CUDA_HEADERS

TEST_F(CudaBackendTest, FenceOnABusyStreamIsNotDoneUntilTheWorkFinishes) {
  GTEST_SKIP() << "vattn's tests were built without the CUDA toolkit";
}

#endif  // VATTN_HAVE_CUDA_HEADERS

}  // namespace
}  // namespace vattn
