// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Free on a stream that is being captured into a CUDA graph (issue 11 item
// 7), on the CPU: a backend whose RecordFence refuses a "capturing" stream
// with FailedPrecondition, as the CUDA backend does (cuStreamIsCapturing).
// The cache passes the error through and changes nothing; the device case
// is in tests/backend/cuda_gpu_test.cc.

#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn {
namespace {

// A Host backend whose one "capturing" stream cannot take a fence.
class CapturingStreamBackend : public BackendWrapper {
 public:
  CapturingStreamBackend(std::shared_ptr<Backend> inner, Stream capturing)
      : BackendWrapper(std::move(inner), "capturing"), capturing_(capturing) {}
  ~CapturingStreamBackend() override { ReleaseAllForShutdown(); }

 protected:
  absl::StatusOr<FenceId> DoRecordFence(Stream stream) override {
    if (stream == capturing_) {
      return absl::FailedPreconditionError(
          "RecordFence: stream is being captured into a CUDA graph");
    }
    return BackendWrapper::DoRecordFence(stream);
  }

 private:
  const Stream capturing_;
};

TEST(KVCacheCaptureTest, FreeOnACapturingStreamFailsAndChangesNothing) {
  int object = 0;
  const Stream capturing = Stream::FromHandle(&object);
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> host, MakeHostBackend());
  auto backend = std::make_shared<CapturingStreamBackend>(host, capturing);
  KVCacheOptions o;
  o.num_layers = 2;
  o.num_kv_heads = 2;
  o.head_dim = 64;
  o.max_slots = 2;
  o.max_tokens = 256;
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> cache,
                             KVCache::Create(o, backend));
  VATTN_ASSERT_OK_AND_ASSIGN(int slot, cache->AllocSlot());
  VATTN_ASSERT_OK(cache->Grow(slot, 16));

  const absl::Status s = cache->Free(slot, capturing);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("captured"));
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache->GetSlot(slot));
  EXPECT_TRUE(info.active) << "a refused Free freed the slot";
  EXPECT_EQ(info.length, 16);
  EXPECT_EQ(backend->counters().fences, 0);

  // After the capture (another stream here), Free works.
  VATTN_EXPECT_OK(cache->Free(slot, Stream::Legacy()));
  VATTN_ASSERT_OK_AND_ASSIGN(info, cache->GetSlot(slot));
  EXPECT_FALSE(info.active);
}

}  // namespace
}  // namespace vattn
