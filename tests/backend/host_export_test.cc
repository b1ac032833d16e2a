// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Backend::ExportHandle / ImportHandle on the Host backend with
// exportable_handles: a handle's memory seen through a second backend (as a
// second process would: file descriptors are per process, backends are
// not), its lifetime once the exporter destroys its handle, the counters,
// and every refusal, each leaving the process's descriptors as they were.

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"

namespace vattn {
namespace {

constexpr std::size_t kGranularity = std::size_t{64} << 10;

// Open descriptors of this process (readdir's own is not counted).
int OpenFds() {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int n = 0;
  while (readdir(dir) != nullptr) ++n;
  closedir(dir);
  return n - 3;  // ".", ".." and the directory's own descriptor.
}

std::shared_ptr<Backend> Host(bool exportable) {
  HostBackendOptions o;
  o.granularity = kGranularity;
  o.exportable_handles = exportable;
  auto backend = MakeHostBackend(o);
  EXPECT_TRUE(backend.ok()) << testing::Describe(backend);
  return backend.ok() ? *backend : nullptr;
}

TEST(HostExportTest, ImportedHandleSeesTheExportersBytesAndOutlivesIt) {
  const int fds_before = OpenFds();
  {
    std::shared_ptr<Backend> a = Host(true);
    std::shared_ptr<Backend> b = Host(false);  // Importing needs no option.
    ASSERT_TRUE(a->capabilities().exportable);
    ASSERT_FALSE(b->capabilities().exportable);
    const std::size_t bytes = 2 * kGranularity;
    VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va_a, a->Reserve(bytes));
    VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va_b, b->Reserve(bytes));
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, a->Create(bytes));
    VATTN_ASSERT_OK(a->Map(va_a, h));
    std::vector<std::uint8_t> pattern(bytes);
    for (std::size_t i = 0; i < bytes; ++i) pattern[i] = static_cast<std::uint8_t>(i * 7 + 3);
    VATTN_ASSERT_OK(a->CopyToDevice(va_a, pattern.data(), bytes));

    VATTN_ASSERT_OK_AND_ASSIGN(int fd, a->ExportHandle(h));
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle imported, b->ImportHandle(fd, bytes));
    ::close(fd);  // The importer holds its own reference.
    EXPECT_EQ(b->counters().handles, 1);
    EXPECT_EQ(b->counters().imported_bytes, static_cast<std::int64_t>(bytes));
    EXPECT_EQ(b->counters().physical_bytes, 0);
    EXPECT_EQ(a->counters().physical_bytes, static_cast<std::int64_t>(bytes));
    VATTN_ASSERT_OK(b->Map(va_b, imported));
    EXPECT_EQ(std::memcmp(reinterpret_cast<void*>(va_b), pattern.data(), bytes), 0);

    // Writes go both ways: it is one memory.
    reinterpret_cast<std::uint8_t*>(va_b)[5] = 0xEE;
    EXPECT_EQ(reinterpret_cast<std::uint8_t*>(va_a)[5], 0xEE);
    pattern[5] = 0xEE;

    // The exporter lets go first: the importer still reads every byte.
    VATTN_ASSERT_OK(a->Unmap(va_a, bytes));
    VATTN_ASSERT_OK(a->Destroy(h));
    EXPECT_EQ(a->counters().handles, 0);
    EXPECT_EQ(std::memcmp(reinterpret_cast<void*>(va_b), pattern.data(), bytes), 0);

    VATTN_ASSERT_OK(b->Unmap(va_b, bytes));
    VATTN_ASSERT_OK(b->Destroy(imported));
    EXPECT_EQ(b->counters().imported_bytes, 0);
    EXPECT_EQ(b->counters().handles, 0);
    VATTN_ASSERT_OK(a->Release(va_a, bytes));
    VATTN_ASSERT_OK(b->Release(va_b, bytes));
  }
  EXPECT_EQ(OpenFds(), fds_before);
}

TEST(HostExportTest, ExportableHandlesAreOneMemfdEachClosedByDestroy) {
  std::shared_ptr<Backend> a = Host(true);
  const int before = OpenFds();
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h1, a->Create(kGranularity));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h2, a->Create(kGranularity));
  EXPECT_EQ(OpenFds(), before + 2);
  VATTN_ASSERT_OK(a->Destroy(h1));
  VATTN_ASSERT_OK(a->Destroy(h2));
  EXPECT_EQ(OpenFds(), before);
}

TEST(HostExportTest, RefusalsNameTheValueAndLeaveNothingBehind) {
  std::shared_ptr<Backend> a = Host(true);
  std::shared_ptr<Backend> plain = Host(false);
  std::shared_ptr<Backend> b = Host(false);
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, a->Create(kGranularity));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle p, plain->Create(kGranularity));
  const int before = OpenFds();
  const BackendCounters b_before = b->counters();

  // Not exportable; unknown handle.
  auto unexportable = plain->ExportHandle(p);
  VATTN_EXPECT_CODE(unexportable, absl::StatusCode::kUnimplemented);
  EXPECT_NE(unexportable.status().message().find("exportable_handles"),
            std::string::npos);
  VATTN_EXPECT_CODE(a->ExportHandle(h + 1000), absl::StatusCode::kInvalidArgument);

  // A closed descriptor.
  VATTN_ASSERT_OK_AND_ASSIGN(int fd, a->ExportHandle(h));
  ::close(fd);
  auto closed = b->ImportHandle(fd, kGranularity);
  VATTN_EXPECT_CODE(closed, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(closed.status().message().find(std::to_string(fd)), std::string::npos)
      << closed.status();
  VATTN_EXPECT_CODE(b->ImportHandle(-1, kGranularity),
                    absl::StatusCode::kInvalidArgument);

  // Foreign descriptors: a plain file, a memfd of another name.
  const int file = ::open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(file, 0);
  auto foreign = b->ImportHandle(file, kGranularity);
  VATTN_EXPECT_CODE(foreign, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(foreign.status().message().find("/proc/"), std::string::npos)
      << foreign.status();
  ::close(file);
  const int other = ::memfd_create("someone-else", MFD_CLOEXEC);
  ASSERT_GE(other, 0);
  ASSERT_EQ(::ftruncate(other, kGranularity), 0);
  auto other_memfd = b->ImportHandle(other, kGranularity);
  VATTN_EXPECT_CODE(other_memfd, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(other_memfd.status().message().find("someone-else"), std::string::npos)
      << other_memfd.status();
  ::close(other);

  // The right kind, the wrong size; a size off the granularity.
  VATTN_ASSERT_OK_AND_ASSIGN(fd, a->ExportHandle(h));
  auto wrong_size = b->ImportHandle(fd, 2 * kGranularity);
  VATTN_EXPECT_CODE(wrong_size, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong_size.status().message().find(std::to_string(2 * kGranularity)),
            std::string::npos)
      << wrong_size.status();
  VATTN_EXPECT_CODE(b->ImportHandle(fd, 100), absl::StatusCode::kInvalidArgument);
  ::close(fd);

  EXPECT_EQ(OpenFds(), before);
  const BackendCounters b_after = b->counters();
  EXPECT_EQ(b_after.handles, b_before.handles);
  EXPECT_EQ(b_after.imported_bytes, b_before.imported_bytes);
}

TEST(HostExportTest, DestroyingTheBackendClosesImportedAndExportableHandles) {
  const int before = OpenFds();
  {
    std::shared_ptr<Backend> a = Host(true);
    std::shared_ptr<Backend> b = Host(false);
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, a->Create(kGranularity));
    VATTN_ASSERT_OK_AND_ASSIGN(int fd, a->ExportHandle(h));
    VATTN_ASSERT_OK(b->ImportHandle(fd, kGranularity).status());
    ::close(fd);
  }
  EXPECT_EQ(OpenFds(), before);
}

}  // namespace
}  // namespace vattn
