// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// CUDA-specific cases of the CUDA backend (the shared contract suite runs in
// backend_contract_gpu_test). Each case skips, with the reason, where no
// driver or device exists. Streams for the fence cases are driven through
// vattn's own run-time driver loader, so this binary never links libcuda.

#include <time.h>

#include <algorithm>
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

// Stream::PerThread() hands the driver CU_STREAM_PER_THREAD, which the
// legacy-stream entry points vattn resolves must accept as a handle.
TEST_F(CudaBackendTest, FenceOnThePerThreadStreamCompletes) {
  VATTN_ASSERT_OK_AND_ASSIGN(FenceId fence,
                             backend_->RecordFence(Stream::PerThread()));
  EXPECT_NE(fence, kCompletedFence);
  VATTN_ASSERT_OK(backend_->WaitFence(fence));
  VATTN_ASSERT_OK_AND_ASSIGN(bool done, backend_->FenceDone(fence));
  EXPECT_TRUE(done);
  VATTN_EXPECT_OK(backend_->ReleaseFence(fence));
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
  // On a new non-blocking stream, or (on_legacy) on the legacy default
  // stream, which then also holds up every blocking stream.
  static absl::StatusOr<std::unique_ptr<BlockedStream>> Make(
      bool on_legacy = false) {
    VATTN_ASSIGN_OR_RETURN(const internal::CudaDriver* d,
                           internal::LoadCudaDriver());
    auto s = std::unique_ptr<BlockedStream>(new BlockedStream(*d));
    CUdevice device = 0;
    VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(d->cuDeviceGet(&device, 0)));
    VATTN_RETURN_IF_ERROR(
        VATTN_CU_STATUS(d->cuDevicePrimaryCtxRetain(&s->context_, device)));
    s->device_ = device;
    VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(d->cuCtxSetCurrent(s->context_)));
    if (on_legacy) {
      s->launched_on_ = CU_STREAM_LEGACY;
    } else {
      VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(
          d->cuStreamCreate(&s->stream_, CU_STREAM_NON_BLOCKING)));
      s->launched_on_ = s->stream_;
    }
    VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(d->cuLaunchHostFunc(
        s->launched_on_, &BlockedStream::Block, s.get())));
    return s;
  }

  ~BlockedStream() {
    Release();
    if (launched_on_ != nullptr) {
      (void)d_.cuCtxSetCurrent(context_);
      (void)d_.cuStreamSynchronize(launched_on_);
    }
    if (stream_ != nullptr) (void)d_.cuStreamDestroy(stream_);
    if (context_ != nullptr) (void)d_.cuDevicePrimaryCtxRelease(device_);
  }

  Stream stream() const { return Stream::FromHandle(launched_on_); }
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
  CUstream stream_ = nullptr;       // Created here, or null.
  CUstream launched_on_ = nullptr;  // Where the blocking function runs.
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

// The primary context of device 0 made current on this thread for a scope
// (for driver calls the tests make themselves).
class PrimaryContext {
 public:
  static absl::StatusOr<std::unique_ptr<PrimaryContext>> Make() {
    VATTN_ASSIGN_OR_RETURN(const internal::CudaDriver* d,
                           internal::LoadCudaDriver());
    auto c = std::unique_ptr<PrimaryContext>(new PrimaryContext(*d));
    VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(d->cuDeviceGet(&c->device_, 0)));
    VATTN_RETURN_IF_ERROR(
        VATTN_CU_STATUS(d->cuDevicePrimaryCtxRetain(&c->context_, c->device_)));
    VATTN_RETURN_IF_ERROR(VATTN_CU_STATUS(d->cuCtxSetCurrent(c->context_)));
    return c;
  }
  ~PrimaryContext() {
    if (context_ != nullptr) (void)d_.cuDevicePrimaryCtxRelease(device_);
  }
  const internal::CudaDriver& d() const { return d_; }
  std::size_t FreeBytes() const {
    std::size_t free = 0, total = 0;
    return d_.cuMemGetInfo(&free, &total) == CUDA_SUCCESS ? free : 0;
  }

 private:
  explicit PrimaryContext(const internal::CudaDriver& d) : d_(d) {}
  const internal::CudaDriver& d_;
  CUdevice device_ = 0;
  CUcontext context_ = nullptr;
};

// One mapped granule at *va (handle *h), for the data-call cases.
void MapOne(Backend& b, DevicePtr* va, PhysicalHandle* h) {
  VATTN_ASSERT_OK_AND_ASSIGN(*va, b.Reserve(b.granularity()));
  VATTN_ASSERT_OK_AND_ASSIGN(*h, b.Create(b.granularity()));
  VATTN_ASSERT_OK(b.Map(*va, *h));
}
void UnmapOne(Backend& b, DevicePtr va, PhysicalHandle h) {
  VATTN_EXPECT_OK(b.Unmap(va, b.granularity()));
  VATTN_EXPECT_OK(b.Destroy(h));
  VATTN_EXPECT_OK(b.Release(va, b.granularity()));
}

// Issue 11 item 1: Zero and the copies run on the backend's private
// non-blocking stream, so a legacy default stream held up by other work
// (PyTorch's default stream, say) does not hold them up. On the legacy
// stream (the old code) they would wait until the host function returns.
TEST_F(CudaBackendTest, ZeroAndCopiesDoNotWaitForTheLegacyStream) {
  DevicePtr va = 0;
  PhysicalHandle h = kInvalidHandle;
  ASSERT_NO_FATAL_FAILURE(MapOne(*backend_, &va, &h));
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockedStream> blocked,
                             BlockedStream::Make(/*on_legacy=*/true));
  std::vector<std::uint8_t> data(g_, 0xAB);
  std::vector<std::uint8_t> back(g_, 0);
  const auto start = std::chrono::steady_clock::now();
  VATTN_EXPECT_OK(backend_->CopyToDevice(va, data.data(), g_));
  VATTN_EXPECT_OK(backend_->Zero(va, g_ / 2));
  VATTN_EXPECT_OK(backend_->CopyFromDevice(back.data(), va, g_));
  const double ms = MillisSince(start);
  blocked->Release();
  EXPECT_LT(ms, 5000.0) << "data calls waited for the blocked legacy stream";
  EXPECT_EQ(back[0], 0);
  EXPECT_EQ(back[g_ / 2 - 1], 0);
  EXPECT_EQ(back[g_ / 2], 0xAB);
  EXPECT_EQ(back[g_ - 1], 0xAB);
  blocked.reset();
  UnmapOne(*backend_, va, h);
  std::printf("3 data calls with the legacy stream blocked: %.3f ms\n", ms);
}

// Issue 11 item 6: WaitFence sleeps (CU_EVENT_BLOCKING_SYNC) instead of
// spinning a core for the whole wait.
TEST_F(CudaBackendTest, WaitFenceSleepsInsteadOfSpinning) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockedStream> blocked,
                             BlockedStream::Make());
  VATTN_ASSERT_OK_AND_ASSIGN(FenceId fence,
                             backend_->RecordFence(blocked->stream()));
  std::thread releaser([&blocked] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    blocked->Release();
  });
  timespec cpu0{}, cpu1{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu0);
  const auto start = std::chrono::steady_clock::now();
  const absl::Status waited = backend_->WaitFence(fence);
  const double wall_ms = MillisSince(start);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu1);
  releaser.join();
  VATTN_ASSERT_OK(waited);
  const double cpu_ms = (cpu1.tv_sec - cpu0.tv_sec) * 1e3 +
                        (cpu1.tv_nsec - cpu0.tv_nsec) / 1e6;
  EXPECT_GE(wall_ms, 200.0);
  EXPECT_LT(cpu_ms, 0.5 * wall_ms) << "the waiting thread spun";
  VATTN_EXPECT_OK(backend_->ReleaseFence(fence));
  std::printf("WaitFence: %.1f ms wall, %.1f ms CPU\n", wall_ms, cpu_ms);
}

// Issue 11 item 7: a fence on a stream being captured into a graph is
// FailedPrecondition (it would be a graph node, not a fence), and so is one
// on the legacy stream while a blocking stream captures. The capture itself
// survives, and the backend's data calls still work meanwhile.
TEST_F(CudaBackendTest, RecordFenceOnACapturingStreamIsFailedPrecondition) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<PrimaryContext> ctx,
                             PrimaryContext::Make());
  const internal::CudaDriver& d = ctx->d();
  DevicePtr va = 0;
  PhysicalHandle h = kInvalidHandle;
  ASSERT_NO_FATAL_FAILURE(MapOne(*backend_, &va, &h));
  for (unsigned flags : {unsigned{CU_STREAM_NON_BLOCKING},
                         unsigned{CU_STREAM_DEFAULT}}) {
    SCOPED_TRACE(flags == CU_STREAM_DEFAULT ? "blocking" : "non-blocking");
    CUstream s = nullptr;
    ASSERT_EQ(d.cuStreamCreate(&s, flags), CUDA_SUCCESS);
    ASSERT_EQ(d.cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL),
              CUDA_SUCCESS);
    const absl::StatusOr<FenceId> f =
        backend_->RecordFence(Stream::FromHandle(s));
    EXPECT_EQ(f.status().code(), absl::StatusCode::kFailedPrecondition)
        << testing::Describe(f);
    EXPECT_THAT(std::string(f.status().message()), HasSubstr("captur"));
    if (flags == CU_STREAM_DEFAULT) {
      VATTN_EXPECT_CODE(backend_->RecordFence(Stream::Legacy()),
                        absl::StatusCode::kFailedPrecondition);
    }
    // The private stream is not part of the capture.
    VATTN_EXPECT_OK(backend_->Zero(va, g_));
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
    EXPECT_EQ(d.cuStreamIsCapturing(s, &status), CUDA_SUCCESS);
    EXPECT_EQ(status, CU_STREAM_CAPTURE_STATUS_ACTIVE)
        << "vattn's calls invalidated the caller's capture";
    CUgraph graph = nullptr;
    EXPECT_EQ(d.cuStreamEndCapture(s, &graph), CUDA_SUCCESS);
    if (graph != nullptr) (void)d.cuGraphDestroy(graph);
    (void)d.cuStreamDestroy(s);
  }
  EXPECT_EQ(backend_->counters().fences, 0);
  UnmapOne(*backend_, va, h);
}

// Another thread's global-mode graph capture (torch.cuda.graph's default)
// must neither fail the backend's mapping and data calls (the map-ahead
// thread keeps working during a capture) nor be invalidated by them.
TEST_F(CudaBackendTest, MappingDuringAnotherThreadsCaptureLeavesItIntact) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<PrimaryContext> ctx,
                             PrimaryContext::Make());
  const internal::CudaDriver& d = ctx->d();
  CUstream s = nullptr;
  ASSERT_EQ(d.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), CUDA_SUCCESS);
  ASSERT_EQ(d.cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL),
            CUDA_SUCCESS);
  std::thread mapper([&] {
    DevicePtr va = 0;
    PhysicalHandle h = kInvalidHandle;
    ASSERT_NO_FATAL_FAILURE(MapOne(*backend_, &va, &h));
    VATTN_EXPECT_OK(backend_->Zero(va, g_));
    std::vector<std::uint8_t> back(64, 1);
    VATTN_EXPECT_OK(backend_->CopyFromDevice(back.data(), va, back.size()));
    EXPECT_EQ(back[0], 0);
    UnmapOne(*backend_, va, h);
  });
  mapper.join();
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  EXPECT_EQ(d.cuStreamIsCapturing(s, &status), CUDA_SUCCESS);
  EXPECT_EQ(status, CU_STREAM_CAPTURE_STATUS_ACTIVE)
      << "the backend's calls invalidated another thread's capture";
  CUgraph graph = nullptr;
  EXPECT_EQ(d.cuStreamEndCapture(s, &graph), CUDA_SUCCESS);
  if (graph != nullptr) (void)d.cuGraphDestroy(graph);
  (void)d.cuStreamDestroy(s);
}

// Issue 11 item 5 on the device: threads race FenceDone, WaitFence,
// ReleaseFence and RecordFence; a fence on the blocked stream must never
// read done (it would if its query saw an event re-recorded on the idle
// stream by another fence).
TEST_F(CudaBackendTest, RacingFenceCallsNeverAnswerForAnotherFence) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<BlockedStream> blocked,
                             BlockedStream::Make());
  std::atomic<int> wrong{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&] {  // Busy fences: queried, released early.
      for (int i = 0; i < 2000; ++i) {
        absl::StatusOr<FenceId> f = backend_->RecordFence(blocked->stream());
        if (!f.ok()) continue;
        absl::StatusOr<bool> done = backend_->FenceDone(*f);
        if (done.ok() && *done) ++wrong;
        (void)backend_->ReleaseFence(*f);
      }
    });
  }
  threads.emplace_back([&] {  // Idle fences recycle events fast.
    while (!stop.load()) {
      absl::StatusOr<FenceId> f = backend_->RecordFence(Stream::Legacy());
      if (!f.ok()) continue;
      (void)backend_->WaitFence(*f);
      (void)backend_->ReleaseFence(*f);
    }
  });
  threads[0].join();
  threads[1].join();
  stop.store(true);
  threads[2].join();
  blocked->Release();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(backend_->counters().fences, 0);
}

// Issue 11 item 8: one granule more than the device has free cannot be
// created; the only code the contract allows for that is ResourceExhausted.
TEST_F(CudaBackendTest, CreatingMoreThanTheFreeMemoryIsResourceExhausted) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<PrimaryContext> ctx,
                             PrimaryContext::Make());
  const std::size_t free_bytes = ctx->FreeBytes();
  ASSERT_GT(free_bytes, 0u);
  const std::size_t ask = (free_bytes + g_ - 1) / g_ * g_ + g_;
  const BackendCounters before = backend_->counters();
  const absl::StatusOr<PhysicalHandle> h = backend_->Create(ask);
  if (h.ok()) (void)backend_->Destroy(*h);
  ASSERT_FALSE(h.ok()) << "cuMemCreate of " << ask << " bytes (free "
                       << free_bytes << ") succeeded";
  EXPECT_EQ(h.status().code(), absl::StatusCode::kResourceExhausted)
      << testing::Describe(h);
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("cuMemCreate"));
  const BackendCounters after = backend_->counters();
  EXPECT_EQ(after.handles, before.handles);
  EXPECT_EQ(after.physical_bytes, before.physical_bytes);
  EXPECT_EQ(after.failed_calls, before.failed_calls + 1);
  std::printf("Create(free %zu + granule) -> %s\n", free_bytes,
              testing::Describe(h).c_str());
}

// Issue 11 item 3: the default budget is the free memory at Create less
// the documented margin, not the device's total.
TEST_F(CudaBackendTest, DefaultBudgetIsFreeMemoryLessTheMargin) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<PrimaryContext> ctx,
                             PrimaryContext::Make());
  const BackendCapabilities& caps = backend_->capabilities();
  const std::size_t free_now = ctx->FreeBytes();
  const std::size_t margin =
      std::max(internal::kCudaBudgetMarginMinBytes,
               caps.physical_memory_bytes / internal::kCudaBudgetMarginDivisor);
  EXPECT_EQ(caps.default_budget_bytes % g_, 0u);
  EXPECT_LT(caps.default_budget_bytes, caps.physical_memory_bytes);
  // Free memory moves a little (other processes, this one's context).
  const double slack = 512.0 * kMiB;
  EXPECT_NEAR(static_cast<double>(caps.default_budget_bytes + margin),
              static_cast<double>(free_now), slack);
  std::printf("default budget %zu MiB, free %zu MiB, total %zu MiB\n",
              caps.default_budget_bytes / kMiB, free_now / kMiB,
              caps.physical_memory_bytes / kMiB);
}

#else  // !VATTN_HAVE_CUDA_HEADERS

TEST_F(CudaBackendTest, FenceOnABusyStreamIsNotDoneUntilTheWorkFinishes) {
  GTEST_SKIP() << "vattn's tests were built without the CUDA toolkit";
}

#endif  // VATTN_HAVE_CUDA_HEADERS

}  // namespace
}  // namespace vattn
