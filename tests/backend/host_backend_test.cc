// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Host-specific behaviour beyond the shared contract suite: the physical
// limit, option validation, memory really going back to the OS, and one file
// descriptor for any number of handles.

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"

namespace vattn {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

// Entries of /proc/self/fd, i.e. open descriptors (the directory's own
// descriptor included, equally before and after).
int CountFds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int n = 0;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n;
}

// The descriptors that name a vattn memfd.
std::vector<int> VattnMemfds() {
  std::vector<int> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return fds;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    const std::string path = std::string("/proc/self/fd/") + entry->d_name;
    char target[256] = {};
    const ssize_t n = ::readlink(path.c_str(), target, sizeof(target) - 1);
    if (n > 0 && std::string(target).find("memfd:vattn") != std::string::npos) {
      fds.push_back(std::stoi(entry->d_name));
    }
  }
  ::closedir(dir);
  return fds;
}

// Bytes of memory the memfd holds right now (its allocated blocks).
std::int64_t MemfdBytes(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return -1;
  return static_cast<std::int64_t>(st.st_blocks) * 512;
}

// Resident set size in bytes, from /proc/self/statm.
std::int64_t RssBytes() {
  std::ifstream statm("/proc/self/statm");
  std::int64_t size = 0;
  std::int64_t resident = 0;
  statm >> size >> resident;
  return resident * static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE));
}

bool SameState(const BackendCounters& a, const BackendCounters& b) {
  return a.reservations == b.reservations &&
         a.reserved_bytes == b.reserved_bytes && a.handles == b.handles &&
         a.physical_bytes == b.physical_bytes && a.mappings == b.mappings &&
         a.mapped_bytes == b.mapped_bytes && a.calls == b.calls;
}

TEST(HostBackendTest, Capabilities) {
  HostBackendOptions options;
  options.physical_limit_bytes = 64 * kMiB;
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> backend,
                             MakeHostBackend(options));
  const BackendCapabilities& caps = backend->capabilities();
  EXPECT_EQ(caps.name, "host");
  EXPECT_EQ(caps.device, -1);
  EXPECT_EQ(caps.granularity, 2 * kMiB);
  EXPECT_EQ(caps.physical_memory_bytes, 64 * kMiB);
  EXPECT_EQ(caps.max_reservation_bytes, std::size_t{64} << 40);
  EXPECT_TRUE(caps.host_accessible);
  EXPECT_FALSE(caps.has_streams);

  // The default limit is the machine's physical memory.
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> unlimited,
                             MakeHostBackend());
  EXPECT_EQ(unlimited->capabilities().physical_memory_bytes,
            static_cast<std::size_t>(::sysconf(_SC_PHYS_PAGES)) *
                static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)));
}

TEST(HostBackendTest, BadOptionsNameTheField) {
  struct Case {
    HostBackendOptions options;
    const char* field;
  };
  std::vector<Case> cases;
  for (std::size_t granularity :
       {std::size_t{0}, std::size_t{3}, std::size_t{1024},
        std::size_t{3} << 20}) {
    HostBackendOptions o;
    o.granularity = granularity;
    cases.push_back({o, "granularity"});
  }
  {
    HostBackendOptions o;
    o.max_reservation_bytes = 0;
    cases.push_back({o, "max_reservation_bytes"});
    o.max_reservation_bytes = 3 * kMiB;  // Not a multiple of 2 MiB.
    cases.push_back({o, "max_reservation_bytes"});
    o.max_reservation_bytes = std::size_t{1} << 48;  // Beyond user space.
    cases.push_back({o, "max_reservation_bytes"});
  }
  for (const Case& c : cases) {
    absl::StatusOr<std::shared_ptr<Backend>> backend =
        MakeHostBackend(c.options);
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kInvalidArgument)
        << testing::Describe(backend);
    EXPECT_NE(backend.status().message().find(c.field), std::string::npos)
        << testing::Describe(backend);
  }
  // The smallest granularity allowed is one page.
  HostBackendOptions page;
  page.granularity = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  VATTN_EXPECT_OK(MakeHostBackend(page));
}

TEST(HostBackendTest, PhysicalLimitIsResourceExhausted) {
  HostBackendOptions options;
  options.physical_limit_bytes = 8 * kMiB;  // Four granules.
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> backend,
                             MakeHostBackend(options));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle a, backend->Create(6 * kMiB));

  const BackendCounters before = backend->counters();
  absl::StatusOr<PhysicalHandle> over = backend->Create(4 * kMiB);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted)
      << testing::Describe(over);
  const std::string message(over.status().message());
  EXPECT_NE(message.find("physical_limit_bytes"), std::string::npos)
      << message;
  EXPECT_NE(message.find("8388608"), std::string::npos) << message;  // Limit.
  EXPECT_NE(message.find("6291456"), std::string::npos) << message;  // In use.
  const BackendCounters after = backend->counters();
  EXPECT_TRUE(SameState(before, after));
  EXPECT_EQ(after.failed_calls, before.failed_calls + 1);
  // Larger than the whole limit on its own.
  VATTN_EXPECT_CODE(backend->Create(10 * kMiB),
                    absl::StatusCode::kResourceExhausted);

  // What is left fits exactly; Destroy gives the budget back.
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle b, backend->Create(2 * kMiB));
  VATTN_EXPECT_CODE(backend->Create(2 * kMiB),
                    absl::StatusCode::kResourceExhausted);
  VATTN_ASSERT_OK(backend->Destroy(a));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle c, backend->Create(6 * kMiB));
  VATTN_ASSERT_OK(backend->Destroy(b));
  VATTN_ASSERT_OK(backend->Destroy(c));
  EXPECT_TRUE(backend->counters().Empty());
}

TEST(HostBackendTest, ConcurrentCreatesNeverOvershootTheLimit) {
  HostBackendOptions options;
  options.granularity = 64 << 10;
  options.physical_limit_bytes = 32 * options.granularity;
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> backend,
                             MakeHostBackend(options));
  constexpr int kThreads = 8;
  std::atomic<int> created{0};
  std::atomic<int> exhausted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 8; ++i) {
        absl::StatusOr<PhysicalHandle> h =
            backend->Create(options.granularity);
        if (h.ok()) {
          ++created;
        } else if (absl::IsResourceExhausted(h.status())) {
          ++exhausted;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(created.load(), 32);
  EXPECT_EQ(exhausted.load(), kThreads * 8 - 32);
  EXPECT_EQ(backend->counters().handles, 32);
  EXPECT_EQ(backend->counters().physical_bytes,
            static_cast<std::int64_t>(options.physical_limit_bytes));
}

TEST(HostBackendTest, DestroyReturnsTheMemory) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> backend,
                             MakeHostBackend());
  const std::vector<int> memfds = VattnMemfds();
  ASSERT_EQ(memfds.size(), 1u) << "expected one vattn memfd in the process";
  const int memfd = memfds[0];

  constexpr std::size_t kBytes = 64 * kMiB;
  constexpr int kCycles = 8;
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, backend->Reserve(kBytes));
  const std::int64_t rss_start = RssBytes();
  std::int64_t rss_peak = rss_start;
  for (int cycle = 0; cycle < kCycles; ++cycle) {
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, backend->Create(kBytes));
    VATTN_ASSERT_OK(backend->Map(va, h));
    auto* p = reinterpret_cast<volatile std::uint8_t*>(va);
    for (std::size_t off = 0; off < kBytes; off += page) {
      p[off] = static_cast<std::uint8_t>(cycle + 1);  // One touch per page.
    }
    EXPECT_GE(MemfdBytes(memfd), static_cast<std::int64_t>(kBytes));
    rss_peak = std::max(rss_peak, RssBytes());
    VATTN_ASSERT_OK(backend->Unmap(va, kBytes));
    VATTN_ASSERT_OK(backend->Destroy(h));
    // The hole is punched: the file holds nothing any more.
    EXPECT_EQ(MemfdBytes(memfd), 0) << "cycle " << cycle;
  }
  // Touching all of it did make it resident, and it went away each time:
  // eight cycles never held more than about one handle's worth at once.
  EXPECT_GE(rss_peak - rss_start, static_cast<std::int64_t>(kBytes / 2));
  EXPECT_LT(RssBytes() - rss_start, static_cast<std::int64_t>(kBytes / 2));
  VATTN_ASSERT_OK(backend->Release(va, kBytes));
}

TEST(HostBackendTest, OneFileDescriptorForAnyNumberOfHandles) {
  const int fds_before_backend = CountFds();
  HostBackendOptions options;
  options.granularity = 64 << 10;
  options.physical_limit_bytes = std::size_t{1} << 30;
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> backend,
                             MakeHostBackend(options));
  const int fds_before = CountFds();
  EXPECT_EQ(fds_before, fds_before_backend + 1);

  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va,
                             backend->Reserve(1000 * options.granularity));
  std::vector<PhysicalHandle> handles;
  for (int i = 0; i < 1000; ++i) {
    VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h,
                               backend->Create(options.granularity));
    handles.push_back(h);
  }
  // Map a few of them too: mappings cost no descriptor either.
  for (std::size_t i = 0; i < 10; ++i) {
    VATTN_ASSERT_OK(backend->Map(va + i * options.granularity, handles[i]));
  }
  EXPECT_EQ(CountFds(), fds_before);
  EXPECT_EQ(backend->counters().handles, 1000);

  backend.reset();  // Leaves mappings, handles and the reservation live.
  EXPECT_EQ(CountFds(), fds_before_backend);
}

// A copy pins the mappings it touches: an Unmap racing it either fails with
// FailedPrecondition or wins before the copy starts (which then fails with
// InvalidArgument). Never a fault on memory pulled from under the copy.
TEST(HostBackendTest, UnmapRacingACopyNeverPullsMemoryFromUnderIt) {
  auto backend = MakeHostBackend();
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  const std::size_t bytes = std::size_t{16} << 20;
  VATTN_ASSERT_OK_AND_ASSIGN(DevicePtr va, b.Reserve(bytes));
  VATTN_ASSERT_OK_AND_ASSIGN(PhysicalHandle h, b.Create(bytes));
  std::vector<char> buffer(bytes, 7);
  int unmap_refused = 0;
  int copy_refused = 0;
  for (int round = 0; round < 100; ++round) {
    VATTN_ASSERT_OK(b.Map(va, h));
    std::atomic<bool> started{false};
    absl::Status copy;
    std::thread copier([&] {
      started.store(true);
      copy = b.CopyToDevice(va, buffer.data(), bytes);
    });
    // Unmap just as the copy starts: mostly mid-copy.
    while (!started.load()) {
    }
    absl::Status unmap = b.Unmap(va, bytes);
    copier.join();
    if (unmap.ok()) {
      // The Unmap won: the copy must have been refused, not faulted.
      if (!copy.ok()) {
        EXPECT_EQ(copy.code(), absl::StatusCode::kInvalidArgument) << copy;
        ++copy_refused;
      }
    } else {
      EXPECT_EQ(unmap.code(), absl::StatusCode::kFailedPrecondition) << unmap;
      VATTN_ASSERT_OK(copy);
      ++unmap_refused;
      VATTN_ASSERT_OK(b.Unmap(va, bytes));
    }
  }
  // Both orders happen; the point is that neither faults.
  EXPECT_GT(unmap_refused, 0);
  VATTN_ASSERT_OK(b.Destroy(h));
  VATTN_ASSERT_OK(b.Release(va, bytes));
  EXPECT_TRUE(b.counters().Empty());
}

}  // namespace
}  // namespace vattn
