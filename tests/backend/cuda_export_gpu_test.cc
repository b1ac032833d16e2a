// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// ExportHandle / ImportHandle and the slot handoff on the CUDA backend
// (CudaBackendOptions::exportable_handles): a handle exported as a POSIX
// file descriptor and imported by a second backend of the same device (as a
// second process would: descriptors are per process, backends are not)
// holds the same bytes, outlives the exporter's Destroy, and a slot handed
// over with SendSlot / ReceiveSlot reads the same through the importer's
// ranges with nothing created on its side. Skips without a device, or when
// the device cannot export POSIX descriptors.

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"
#include "vattn/kv_cache.h"
#include "vattn/slot_export.h"

namespace vattn {
namespace {

// The exportable backend, or the reason to skip.
std::shared_ptr<Backend> Exportable(std::string* skip) {
  absl::StatusOr<int> count = CudaDeviceCount();
  if (!count.ok() || *count == 0) {
    *skip = count.ok() ? "the CUDA driver reports no device"
                       : std::string(count.status().message());
    return nullptr;
  }
  CudaBackendOptions o;
  o.exportable_handles = true;
  absl::StatusOr<std::shared_ptr<Backend>> b = MakeCudaBackend(0, o);
  if (!b.ok()) {
    *skip = "no exportable CUDA backend: " + std::string(b.status().message());
    return nullptr;
  }
  return *b;
}

TEST(CudaExportGpuTest, ImportedHandleHoldsTheBytesAndOutlivesTheExporter) {
  std::string skip;
  std::shared_ptr<Backend> a = Exportable(&skip);
  if (a == nullptr) GTEST_SKIP() << skip;
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> b, MakeCudaBackend(0));
  ASSERT_TRUE(a->capabilities().exportable);
  const std::size_t bytes = 2 * a->granularity();
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va_a, a->Reserve(bytes));
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va_b, b->Reserve(bytes));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, a->Create(bytes));
  VATTN_ASSERT_OK(a->Map(va_a, h));
  std::vector<std::uint8_t> pattern(bytes);
  for (std::size_t i = 0; i < bytes; ++i) pattern[i] = static_cast<std::uint8_t>(i * 13 + 5);
  VATTN_ASSERT_OK(a->CopyToDevice(va_a, pattern.data(), bytes));

  VATTN_ASSERT_OK_AND_ASSIGN(int fd, a->ExportHandle(h));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle imported, b->ImportHandle(fd, bytes));
  ::close(fd);
  EXPECT_EQ(b->counters().imported_bytes, static_cast<std::int64_t>(bytes));
  EXPECT_EQ(b->counters().physical_bytes, 0);
  VATTN_ASSERT_OK(b->Map(va_b, imported));  // cuMemMap + cuMemSetAccess.

  // The exporter lets go first.
  VATTN_ASSERT_OK(a->Unmap(va_a, bytes));
  VATTN_ASSERT_OK(a->Destroy(h));
  std::vector<std::uint8_t> back(bytes);
  VATTN_ASSERT_OK(b->CopyFromDevice(back.data(), va_b, bytes));
  EXPECT_EQ(back, pattern);
  VATTN_ASSERT_OK(b->Unmap(va_b, bytes));
  VATTN_ASSERT_OK(b->Destroy(imported));
  EXPECT_EQ(b->counters().imported_bytes, 0);
  VATTN_ASSERT_OK(a->Release(va_a, bytes));
  VATTN_ASSERT_OK(b->Release(va_b, bytes));
}

TEST(CudaExportGpuTest, RefusesDescriptorsThatAreNotExports) {
  std::string skip;
  std::shared_ptr<Backend> a = Exportable(&skip);
  if (a == nullptr) GTEST_SKIP() << skip;
  const std::size_t bytes = a->granularity();
  const int file = ::open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(file, 0);
  VATTN_EXPECT_CODE(a->ImportHandle(file, bytes), absl::StatusCode::kInvalidArgument);
  ::close(file);
  VATTN_EXPECT_CODE(a->ImportHandle(file, bytes), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a->counters().handles, 0);
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> plain, MakeCudaBackend(0));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, plain->Create(bytes));
  VATTN_EXPECT_CODE(plain->ExportHandle(h), absl::StatusCode::kUnimplemented);
  VATTN_ASSERT_OK(plain->Destroy(h));
}

TEST(CudaExportGpuTest, SlotHandoffReadsTheSameBytesWithNothingCreated) {
  std::string skip;
  std::shared_ptr<Backend> a = Exportable(&skip);
  if (a == nullptr) GTEST_SKIP() << skip;
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> b, MakeCudaBackend(0));
  KVCacheOptions o;
  o.num_layers = 4;
  o.num_kv_heads = 2;
  o.head_dim = 64;
  o.max_slots = 4;
  o.max_tokens = 8192;
  o.memory_budget_bytes = std::size_t{1} << 30;
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> prefill, KVCache::Create(o, a));
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> decode, KVCache::Create(o, b));
  const std::int64_t prompt = 3000;
  VATTN_ASSERT_OK_AND_ASSIGN(int src, prefill->AllocSlot(prompt));
  VATTN_ASSERT_OK(prefill->Grow(src, prompt));
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<MemoryRange> ranges, prefill->SlotRanges(src, prompt));
  ASSERT_EQ(ranges.size(), 1u);
  std::vector<std::uint8_t> pattern(ranges[0].bytes);
  for (std::size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<std::uint8_t>(i * 7 + 1);
  VATTN_ASSERT_OK(a->CopyToDevice(ranges[0].address, pattern.data(), pattern.size()));

  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  VATTN_EXPECT_OK(SendSlot(sv[0], *prefill, src, prompt));
  absl::StatusOr<int> dst = ReceiveSlot(sv[1], *decode);
  ::close(sv[0]);
  ::close(sv[1]);
  ASSERT_TRUE(dst.ok()) << dst.status();
  EXPECT_EQ(decode->Stats().physical_bytes, 0);
  EXPECT_GE(decode->Stats().imported_bytes, prompt * decode->bytes_per_token());
  VATTN_ASSERT_OK(prefill->Free(src));  // Exporter first.
  VATTN_ASSERT_OK_AND_ASSIGN(std::vector<MemoryRange> mine, decode->SlotRanges(*dst, prompt));
  std::vector<std::uint8_t> back(mine[0].bytes);
  VATTN_ASSERT_OK(b->CopyFromDevice(back.data(), mine[0].address, back.size()));
  EXPECT_EQ(back, pattern);
  VATTN_ASSERT_OK(decode->Grow(*dst, prompt + 2000));
  EXPECT_GT(decode->Stats().physical_bytes, 0);
  VATTN_ASSERT_OK(decode->Free(*dst));
  EXPECT_EQ(decode->Stats().imported_bytes, 0);
}

}  // namespace
}  // namespace vattn
