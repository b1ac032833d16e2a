// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Stream-ordered safety on the CPU: a backend whose fences complete only
// when the test says so (standing in for GPU work still reading a freed
// slot) checks that the cache never unmaps a fenced slot's memory before its
// fence completes, prefers memory that needs no wait, and waits only when it
// must.

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "gtest/gtest.h"
#include "src/internal/mutex.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

// Forwards everything to a Host backend; fences are manual. An Unmap inside
// a watched range while one of its fences is pending is a violation.
class ManualFenceBackend : public BackendWrapper {
 public:
  // `tally`, if given, receives the violation count when the backend dies.
  explicit ManualFenceBackend(std::shared_ptr<Backend> inner,
                              std::shared_ptr<int> tally = nullptr)
      : BackendWrapper(std::move(inner), "manual_fences"),
        tally_(std::move(tally)) {}
  ~ManualFenceBackend() override {
    ReleaseAllForShutdown();
    if (tally_ != nullptr) *tally_ = violations();
  }

  // Fences recorded from now on guard [begin, end) until completed.
  void Watch(DevicePtr begin, DevicePtr end) {
    internal::MutexLock lock(&mu_);
    watch_begin_ = begin;
    watch_end_ = end;
  }
  void Complete(FenceId f) {
    internal::MutexLock lock(&mu_);
    fences_[f].done = true;
  }
  int waits() {
    internal::MutexLock lock(&mu_);
    return waits_;
  }
  int violations() {
    internal::MutexLock lock(&mu_);
    return violations_;
  }
  Stream last_stream() {
    internal::MutexLock lock(&mu_);
    return last_stream_;
  }
  std::vector<FenceId> pending() {
    internal::MutexLock lock(&mu_);
    std::vector<FenceId> out;
    for (const auto& [id, f] : fences_) {
      if (!f.done) out.push_back(id);
    }
    return out;
  }

 protected:
  absl::Status DoUnmap(DevicePtr va, std::size_t bytes) override {
    {
      internal::MutexLock lock(&mu_);
      for (const auto& [id, f] : fences_) {
        if (!f.done && va < f.end && va + bytes > f.begin) ++violations_;
      }
    }
    return BackendWrapper::DoUnmap(va, bytes);
  }
  absl::Status DoZero(DevicePtr va, std::size_t bytes) override {
    {
      internal::MutexLock lock(&mu_);
      for (const auto& [id, f] : fences_) {
        if (!f.done && va < f.end && va + bytes > f.begin) ++violations_;
      }
    }
    return BackendWrapper::DoZero(va, bytes);
  }
  absl::StatusOr<FenceId> DoRecordFence(Stream stream) override {
    internal::MutexLock lock(&mu_);
    last_stream_ = stream;
    const FenceId id = next_++;
    fences_[id] = Fence{watch_begin_, watch_end_, false};
    return id;
  }
  absl::StatusOr<bool> DoFenceDone(FenceId f) override {
    internal::MutexLock lock(&mu_);
    return fences_[f].done;
  }
  // "The GPU work finishes": waiting completes the fence, and is counted.
  absl::Status DoWaitFence(FenceId f) override {
    internal::MutexLock lock(&mu_);
    if (!fences_[f].done) {
      ++waits_;
      fences_[f].done = true;
    }
    return absl::OkStatus();
  }
  // Releasing a fence does not stop the GPU work behind it: a fence
  // released before it completed keeps guarding its range (for ever).
  absl::Status DoReleaseFence(FenceId f) override {
    internal::MutexLock lock(&mu_);
    if (fences_[f].done) fences_.erase(f);
    return absl::OkStatus();
  }

 private:
  struct Fence {
    DevicePtr begin = 0;
    DevicePtr end = 0;
    bool done = false;
  };
  const std::shared_ptr<int> tally_;
  internal::Mutex mu_;
  absl::flat_hash_map<FenceId, Fence> fences_ ABSL_GUARDED_BY(mu_);
  FenceId next_ ABSL_GUARDED_BY(mu_) = 1;
  DevicePtr watch_begin_ ABSL_GUARDED_BY(mu_) = 0;
  DevicePtr watch_end_ ABSL_GUARDED_BY(mu_) = 0;
  int waits_ ABSL_GUARDED_BY(mu_) = 0;
  int violations_ ABSL_GUARDED_BY(mu_) = 0;
  Stream last_stream_ ABSL_GUARDED_BY(mu_) = Stream::PerThread();
};

class FenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto host = MakeHostBackend();
    ASSERT_TRUE(host.ok());
    backend_ = std::make_shared<ManualFenceBackend>(*host);
    opts_.num_layers = 1;
    opts_.num_kv_heads = 8;
    opts_.head_dim = 128;  // 4 KiB per token: 512 tokens per 2 MiB.
    opts_.max_slots = 3;
    opts_.max_tokens = 2048;
    opts_.max_extent_bytes = 2 * kMiB;
    opts_.memory_budget_bytes = 4 * kMiB;  // Two extents in all.
  }
  void Make() {
    auto cache = KVCache::Create(opts_, backend_);
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = std::move(*cache);
  }
  // Fences recorded next guard this slot's whole virtual range.
  void WatchSlot(int slot) {
    const TensorView k = cache_->K(0);
    const DevicePtr begin = k.ElementAddress(slot, 0, 0, 0);
    const DevicePtr end = k.ElementAddress(slot + 1, 0, 0, 0);
    backend_->Watch(begin, end);
  }
  // A stream handle; the manual backend ignores its value.
  static Stream AStream() {
    return Stream::FromHandle(reinterpret_cast<void*>(0x1000));
  }

  std::shared_ptr<ManualFenceBackend> backend_;
  KVCacheOptions opts_;
  std::unique_ptr<KVCache> cache_;
};

TEST_F(FenceTest, FencedMemoryIsReclaimedOnlyAfterItsFenceCompletes) {
  ASSERT_NO_FATAL_FAILURE(Make());
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(a, 512));
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(b, 512));  // The budget is full.
  WatchSlot(a);
  VATTN_ASSERT_OK(cache_->Free(a, AStream()));  // GPU work still reads a.
  ASSERT_EQ(backend_->pending().size(), 1u);
  // b needs a's memory: the cache must wait for a's fence, then unmap.
  VATTN_ASSERT_OK(cache_->Grow(b, 1024));
  EXPECT_EQ(backend_->violations(), 0);
  EXPECT_EQ(backend_->waits(), 1);
  EXPECT_EQ(cache_->Stats().fence_waits, 1);
  EXPECT_EQ(cache_->Stats().reclaimed_extents, 1);
  cache_.reset();
  EXPECT_TRUE(backend_->counters().Empty());
}

TEST_F(FenceTest, ReclamationPrefersMemoryWhoseFenceHasCompleted) {
  opts_.memory_budget_bytes = 6 * kMiB;
  ASSERT_NO_FATAL_FAILURE(Make());
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(a, 512));
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(b, 512));
  VATTN_ASSERT_OK_AND_ASSIGN(int c, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(c, 512));
  WatchSlot(a);
  VATTN_ASSERT_OK(cache_->Free(a, AStream()));  // Freed first, still busy.
  WatchSlot(b);
  VATTN_ASSERT_OK(cache_->Free(b, AStream()));
  const std::vector<FenceId> fences = backend_->pending();
  ASSERT_EQ(fences.size(), 2u);
  // b's GPU work has finished, a's has not: b goes first, no wait, even
  // though a was freed earlier.
  backend_->Complete(fences[0] > fences[1] ? fences[0] : fences[1]);
  VATTN_ASSERT_OK(cache_->Grow(c, 1024));
  EXPECT_EQ(backend_->waits(), 0);
  EXPECT_EQ(backend_->violations(), 0);
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info_a, cache_->GetSlot(a));
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info_b, cache_->GetSlot(b));
  EXPECT_EQ(info_a.mapped_bytes, std::int64_t{2} << 20);
  EXPECT_EQ(info_b.mapped_bytes, 0);
  cache_.reset();
  EXPECT_TRUE(backend_->counters().Empty());
}

TEST_F(FenceTest, ReusingAFencedSlotKeepsItsFenceUntilItIsReclaimed) {
  ASSERT_NO_FATAL_FAILURE(Make());
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot(1024));
  VATTN_ASSERT_OK(cache_->Grow(a, 1024));  // 4 MiB: the whole budget.
  WatchSlot(a);
  VATTN_ASSERT_OK(cache_->Free(a, AStream()));
  // A short request reuses a (adopting its one 4 MiB extent): the old
  // request's fence stays with the slot, since its GPU work may still read
  // the memory the new request has not written yet.
  VATTN_ASSERT_OK_AND_ASSIGN(int again, cache_->AllocSlot(100));
  EXPECT_EQ(again, a);
  EXPECT_EQ(backend_->pending().size(), 1u);
  VATTN_ASSERT_OK(cache_->Grow(a, 100));
  EXPECT_EQ(backend_->violations(), 0);
  cache_.reset();  // Waits for the fence before unmapping.
  EXPECT_EQ(backend_->violations(), 0);
  EXPECT_EQ(backend_->waits(), 1);
  EXPECT_TRUE(backend_->counters().Empty());
}

TEST_F(FenceTest, ZeroOnReuseWaitsForTheFenceBeforeWriting) {
  opts_.zero_on_reuse = true;
  ASSERT_NO_FATAL_FAILURE(Make());
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(a, 512));
  WatchSlot(a);
  VATTN_ASSERT_OK(cache_->Free(a, AStream()));
  VATTN_ASSERT_OK_AND_ASSIGN(int again, cache_->AllocSlot(512));
  EXPECT_EQ(again, a);
  EXPECT_EQ(backend_->violations(), 0) << "zeroed under running GPU work";
  EXPECT_EQ(backend_->waits(), 1);
  cache_.reset();
  EXPECT_TRUE(backend_->counters().Empty());
}

TEST_F(FenceTest, DestroyingTheCacheWaitsForEveryFence) {
  ASSERT_NO_FATAL_FAILURE(Make());
  for (int i = 0; i < 2; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(int s, cache_->AllocSlot(512));
    VATTN_ASSERT_OK(cache_->Grow(s, 512));
    WatchSlot(s);
    VATTN_ASSERT_OK(cache_->Free(s, AStream()));
  }
  ASSERT_EQ(backend_->pending().size(), 2u);
  cache_.reset();
  EXPECT_EQ(backend_->violations(), 0);
  EXPECT_EQ(backend_->waits(), 2);
  EXPECT_TRUE(backend_->counters().Empty());
}

TEST_F(FenceTest, WithoutDeferralFreeWaitsThenUnmaps) {
  opts_.defer_reclaim = false;
  ASSERT_NO_FATAL_FAILURE(Make());
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(a, 512));
  WatchSlot(a);
  VATTN_ASSERT_OK(cache_->Free(a, AStream()));
  EXPECT_EQ(backend_->violations(), 0);
  EXPECT_EQ(backend_->waits(), 1);
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache_->GetSlot(a));
  EXPECT_EQ(info.mapped_bytes, 0);
  cache_.reset();
  EXPECT_TRUE(backend_->counters().Empty());
}

// Free without a stream is safe by default: it fences the legacy default
// stream, so a kernel still reading the slot keeps it mapped.
TEST_F(FenceTest, FreeWithoutAStreamFencesTheLegacyDefaultStream) {
  ASSERT_NO_FATAL_FAILURE(Make());
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(a, 512));
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(b, 512));  // The budget is full.
  WatchSlot(a);
  VATTN_ASSERT_OK(cache_->Free(a));
  ASSERT_EQ(backend_->pending().size(), 1u) << "no fence recorded";
  EXPECT_TRUE(backend_->last_stream().is_legacy());
  VATTN_ASSERT_OK(cache_->Grow(b, 1024));  // Needs a's memory: waits.
  EXPECT_EQ(backend_->violations(), 0);
  EXPECT_EQ(backend_->waits(), 1);
  // std::nullopt means the same.
  VATTN_ASSERT_OK_AND_ASSIGN(int c, cache_->AllocSlot(0));
  VATTN_ASSERT_OK(cache_->Free(c, std::optional<Stream>()));
  EXPECT_TRUE(backend_->last_stream().is_legacy());
  cache_.reset();
  EXPECT_TRUE(backend_->counters().Empty());
}

// kNoFence: the caller synchronised; nothing is recorded and reclamation
// does not wait.
TEST_F(FenceTest, FreeWithNoFenceRecordsNothing) {
  ASSERT_NO_FATAL_FAILURE(Make());
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(a, 512));
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache_->AllocSlot(512));
  VATTN_ASSERT_OK(cache_->Grow(b, 512));
  WatchSlot(a);
  VATTN_ASSERT_OK(cache_->Free(a, kNoFence));
  EXPECT_TRUE(backend_->pending().empty());
  VATTN_ASSERT_OK(cache_->Grow(b, 1024));
  EXPECT_EQ(backend_->waits(), 0);
  EXPECT_EQ(cache_->Stats().fence_waits, 0);
  VATTN_EXPECT_CODE(cache_->Free(a, kNoFence),
                    absl::StatusCode::kFailedPrecondition);
  cache_.reset();
  EXPECT_TRUE(backend_->counters().Empty());
}

// A caller that leaks a fenced mapping: destroying the backend waits for the
// fence before it unmaps.
TEST(ManualFenceBackendTest, DestroyingTheBackendWaitsForLeakedFences) {
  auto host = MakeHostBackend();
  ASSERT_TRUE(host.ok());
  auto tally = std::make_shared<int>(-1);
  {
    auto backend = std::make_shared<ManualFenceBackend>(*host, tally);
    const std::size_t g = backend->granularity();
    VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, backend->Reserve(4 * g));
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, backend->Create(g));
    VATTN_ASSERT_OK(backend->Map(va, h));
    backend->Watch(va, va + g);
    VATTN_ASSERT_OK_AND_ASSIGN(FenceId f, backend->RecordFence(Stream{}));
    EXPECT_NE(f, kCompletedFence);
  }  // Leaked: the mapping, the handle, the reservation and the fence.
  EXPECT_EQ(*tally, 0) << "unmapped under a pending fence";
  EXPECT_TRUE((*host)->counters().Empty());
}

}  // namespace
}  // namespace vattn
