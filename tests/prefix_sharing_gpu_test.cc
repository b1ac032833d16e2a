// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Prefix sharing on the CUDA backend: read-only maps
// (CU_MEM_ACCESS_FLAGS_PROT_READ), SetAccess on a live mapping, and the
// tail copy (cuMemcpyDtoDAsync on the caller's stream). Skips without a
// device.

#include <cstdint>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn {
namespace {

std::vector<std::uint8_t> Pattern(std::size_t bytes, std::uint8_t seed) {
  std::vector<std::uint8_t> v(bytes);
  for (std::size_t i = 0; i < bytes; ++i) {
    v[i] = static_cast<std::uint8_t>(seed + i * 31);
  }
  return v;
}

TEST(PrefixSharingGpuTest, SharersReadThePrefixAndCannotWriteIt) {
  absl::StatusOr<std::shared_ptr<Backend>> cuda = MakeCudaBackend(0);
  if (!cuda.ok()) GTEST_SKIP() << "no CUDA device: " << cuda.status();
  KVCacheOptions o;  // Llama-3-8B shape: 128 KiB per token, 16 per granule.
  o.max_slots = 8;
  o.max_tokens = 4096;
  o.memory_budget_bytes = std::size_t{2} << 30;
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, *cuda));
  const std::int64_t bpt = cache->bytes_per_token();
  const std::int64_t prompt = 2048 + 10;  // A 2k system prompt and a tail.
  VATTN_ASSERT_OK_AND_ASSIGN(int owner, cache->AllocSlot(prompt, 2048 + 10));
  VATTN_ASSERT_OK(cache->Grow(owner, prompt));
  const DevicePtr base = cache->K(0).ElementAddress(owner, 0, 0, 0);
  const auto bytes = static_cast<std::size_t>(prompt * bpt);
  const std::vector<std::uint8_t> data = Pattern(bytes, 7);
  VATTN_ASSERT_OK((*cuda)->CopyToDevice(base, data.data(), bytes));
  VATTN_ASSERT_OK(cache->KeepPrefix(owner, prompt, 1));
  const CacheStats before = cache->Stats();
  VATTN_ASSERT_OK_AND_ASSIGN(int sharer, cache->AllocSlotWithPrefix(1, prompt));
  const CacheStats after = cache->Stats();
  EXPECT_EQ(after.map_calls - before.map_calls, 2);
  EXPECT_EQ(after.copy_calls - before.copy_calls, 1);
  // The copy ran on the legacy stream; CopyFromDevice runs on the backend's
  // private stream, so wait for the legacy stream first.
  VATTN_ASSERT_OK_AND_ASSIGN(FenceId f, (*cuda)->RecordFence(Stream{}));
  VATTN_ASSERT_OK((*cuda)->WaitFence(f));
  VATTN_ASSERT_OK((*cuda)->ReleaseFence(f));
  std::vector<std::uint8_t> read(bytes);
  VATTN_ASSERT_OK((*cuda)->CopyFromDevice(
      read.data(), cache->K(0).ElementAddress(sharer, 0, 0, 0), bytes));
  EXPECT_EQ(read, data);
  // Shared tokens are read-only in both slots.
  for (int slot : {owner, sharer}) {
    VATTN_EXPECT_CODE((*cuda)->CopyToDevice(
                          cache->K(0).ElementAddress(slot, 0, 0, 0),
                          data.data(), 4096),
                      absl::StatusCode::kPermissionDenied);
  }
  // Fork copies the partly filled extent and shares the rest.
  VATTN_ASSERT_OK_AND_ASSIGN(int child, cache->Fork(sharer));
  VATTN_ASSERT_OK_AND_ASSIGN(f, (*cuda)->RecordFence(Stream{}));
  VATTN_ASSERT_OK((*cuda)->WaitFence(f));
  VATTN_ASSERT_OK((*cuda)->ReleaseFence(f));
  VATTN_ASSERT_OK((*cuda)->CopyFromDevice(
      read.data(), cache->K(0).ElementAddress(child, 0, 0, 0), bytes));
  EXPECT_EQ(read, data);
  VATTN_ASSERT_OK(cache->Free(child));
  VATTN_ASSERT_OK(cache->Free(sharer));
  VATTN_ASSERT_OK(cache->Free(owner));
}

}  // namespace
}  // namespace vattn
