// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Zero-copy slot handoff on the Host backend (KVCache::ExportSlot /
// ImportSlot, SendSlot / ReceiveSlot): bytes equal through the importer's
// memory with nothing copied, budgets and stats on both sides, lifetime
// (exporter lets go first), exporter safety (exported memory never backs
// another of its requests), a fork()ed importer in another process, more
// descriptors than one message carries, and bad input, each leaving the
// process's descriptors and both caches' stats as they were.

#include <dirent.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"
#include "vattn/c_api.h"
#include "vattn/fault_injection.h"
#include "vattn/kv_cache.h"
#include "vattn/options.h"
#include "vattn/slot_export.h"

namespace vattn {
namespace {

constexpr std::size_t kGranularity = std::size_t{64} << 10;

KVCacheOptions Shape(Layout layout = Layout::kTokenMajor, int layers = 2) {
  KVCacheOptions o;
  o.num_layers = layers;
  o.num_kv_heads = 2;
  o.head_dim = 16;
  o.dtype = DType::kFloat32;  // 2 x 2 x 16 x 4 = 256 bytes per token per layer.
  o.max_slots = 4;
  o.max_tokens = 2048;
  o.layout = layout;
  o.map_ahead_tokens = 0;
  return o;
}

std::shared_ptr<Backend> Host(bool exportable) {
  HostBackendOptions h;
  h.granularity = kGranularity;
  h.exportable_handles = exportable;
  auto backend = MakeHostBackend(h);
  EXPECT_TRUE(backend.ok()) << testing::Describe(backend);
  return backend.ok() ? *backend : nullptr;
}

std::unique_ptr<KVCache> Cache(const KVCacheOptions& o,
                               std::shared_ptr<Backend> backend) {
  auto cache = KVCache::Create(o, std::move(backend));
  EXPECT_TRUE(cache.ok()) << testing::Describe(cache);
  return cache.ok() ? *std::move(cache) : nullptr;
}

// The inodes of this process's open descriptors and of its file mappings.
std::set<ino_t> OpenInodes() {
  std::set<ino_t> out;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return out;
  while (dirent* d = readdir(dir)) {
    struct stat st = {};
    const std::string path = std::string("/proc/self/fd/") + d->d_name;
    if (d->d_name[0] != '.' && ::stat(path.c_str(), &st) == 0) out.insert(st.st_ino);
  }
  closedir(dir);
  return out;
}
// The inodes of the files mapped in [lo, hi) (nullopt bounds: anywhere).
std::set<ino_t> MappedInodes(std::uintptr_t lo = 0,
                             std::uintptr_t hi = ~std::uintptr_t{0}) {
  std::set<ino_t> out;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    // address perms offset dev inode path
    char perms[8] = {}, dev[16] = {};
    unsigned long long start = 0, end = 0, offset = 0, inode = 0;  // NOLINT
    if (std::sscanf(line.c_str(), "%llx-%llx %7s %llx %15s %llu", &start, &end,
                    perms, &offset, dev, &inode) == 6 &&
        inode != 0 && start < hi && end > lo) {
      out.insert(static_cast<ino_t>(inode));
    }
  }
  return out;
}
int OpenFds() {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int n = 0;
  while (readdir(dir) != nullptr) ++n;
  closedir(dir);
  return n - 3;
}

// A byte unique to (token, byte-in-token), with a salt per writer.
std::uint8_t Pattern(std::int64_t t, std::int64_t i, int salt) {
  return static_cast<std::uint8_t>(t * 131 + i * 7 + salt * 29 + 1);
}

// Writes tokens [0, tokens) of the slot through its ranges.
void Fill(KVCache& cache, int slot, std::int64_t tokens, int salt) {
  auto ranges = cache.SlotRanges(slot, tokens);
  ASSERT_TRUE(ranges.ok()) << testing::Describe(ranges);
  for (const MemoryRange& r : *ranges) {
    auto* p = reinterpret_cast<std::uint8_t*>(r.address);
    const std::int64_t per_token = static_cast<std::int64_t>(r.bytes) / tokens;
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t i = 0; i < per_token; ++i) p[t * per_token + i] = Pattern(t, i, salt);
    }
    ++salt;
  }
}

// Bytes that differ from Fill's pattern in tokens [0, tokens).
std::int64_t Mismatches(const KVCache& cache, int slot, std::int64_t tokens, int salt) {
  auto ranges = cache.SlotRanges(slot, tokens);
  if (!ranges.ok()) return -1;
  std::int64_t bad = 0;
  for (const MemoryRange& r : *ranges) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(r.address);
    const std::int64_t per_token = static_cast<std::int64_t>(r.bytes) / tokens;
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t i = 0; i < per_token; ++i) bad += p[t * per_token + i] != Pattern(t, i, salt);
    }
    ++salt;
  }
  return bad;
}

struct SocketPair {
  SocketPair() { EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fd), 0); }
  ~SocketPair() {
    for (int f : fd) {
      if (f >= 0) ::close(f);
    }
  }
  void Close(int i) {
    ::close(fd[i]);
    fd[i] = -1;
  }
  int fd[2] = {-1, -1};
};

class SlotExportTest : public ::testing::TestWithParam<Layout> {};

TEST_P(SlotExportTest, HandoffMapsTheSameMemoryAndEachSideCountsItsOwn) {
  const KVCacheOptions o = Shape(GetParam());
  std::set<ino_t> exported_inodes;
  const int fds_at_start = OpenFds();
  {
    std::unique_ptr<KVCache> prefill = Cache(o, Host(true));
    std::unique_ptr<KVCache> decode = Cache(o, Host(false));
    ASSERT_NE(prefill, nullptr);
    ASSERT_NE(decode, nullptr);
    const std::int64_t prompt = 700;  // Several granules; not a whole extent.
    VATTN_ASSERT_OK_AND_ASSIGN(int src, prefill->AllocSlot(prompt));
    VATTN_ASSERT_OK(prefill->Grow(src, prompt));
    Fill(*prefill, src, prompt, /*salt=*/1);
    const CacheStats decode_before = decode->Stats();
    SocketPair sp;
    VATTN_ASSERT_OK(SendSlot(sp.fd[0], *prefill, src, prompt));
    VATTN_ASSERT_OK_AND_ASSIGN(int dst, ReceiveSlot(sp.fd[1], *decode));

    // What the importer maps at its slot are the exporter's memfds.
    VATTN_ASSERT_OK_AND_ASSIGN(std::vector<MemoryRange> mine,
                               decode->SlotRanges(dst, prompt));
    for (const MemoryRange& r : mine) {
      for (ino_t i : MappedInodes(r.address, r.address + r.bytes)) {
        exported_inodes.insert(i);
      }
    }
    EXPECT_EQ(exported_inodes.size(), static_cast<std::size_t>(mine.size()));
    VATTN_ASSERT_OK_AND_ASSIGN(std::vector<MemoryRange> theirs,
                               prefill->SlotRanges(src, prompt));
    std::set<ino_t> exporter_inodes;
    for (const MemoryRange& r : theirs) {
      for (ino_t i : MappedInodes(r.address, r.address + r.bytes)) {
        exporter_inodes.insert(i);
      }
    }
    EXPECT_EQ(exporter_inodes, exported_inodes);

    VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, decode->GetSlot(dst));
    EXPECT_TRUE(info.active);
    EXPECT_EQ(info.length, prompt);
    EXPECT_GE(info.backed_tokens, prompt);
    EXPECT_EQ(Mismatches(*decode, dst, prompt, 1), 0);

    // Zero bytes copied: the importer's physical memory did not grow.
    const CacheStats d = decode->Stats();
    const CacheStats p = prefill->Stats();
    EXPECT_EQ(d.physical_bytes, decode_before.physical_bytes);
    EXPECT_EQ(d.create_calls, decode_before.create_calls);
    EXPECT_EQ(d.imported_bytes, info.mapped_bytes);
    EXPECT_GE(d.imported_bytes, prompt * decode->bytes_per_token());
    EXPECT_EQ(d.imported_slots, 1);
    EXPECT_EQ(p.exported_bytes, d.imported_bytes);
    EXPECT_EQ(p.exported_slots, 1);
    EXPECT_EQ(decode->backend()->counters().imported_bytes, d.imported_bytes);

    // Writes through either side land in the one memory.
    auto d_ranges = decode->SlotRanges(dst, 1);
    auto p_ranges = prefill->SlotRanges(src, 1);
    ASSERT_TRUE(d_ranges.ok() && p_ranges.ok());
    EXPECT_EQ(*reinterpret_cast<std::uint8_t*>((*p_ranges)[0].address), Pattern(0, 0, 1));

    // The importer grows past the prompt with extents of its own.
    const std::int64_t far = info.backed_tokens + 300;
    VATTN_ASSERT_OK(decode->Grow(dst, far));
    EXPECT_GT(decode->Stats().physical_bytes, decode_before.physical_bytes);
    EXPECT_EQ(decode->Stats().imported_bytes, d.imported_bytes);
    EXPECT_EQ(Mismatches(*decode, dst, prompt, 1), 0);

    // The exporter lets go first: its exported extents are destroyed, not
    // pooled; the importer still reads every byte.
    const CacheStats p_before_free = prefill->Stats();
    VATTN_ASSERT_OK(prefill->Free(src));
    const CacheStats p_after_free = prefill->Stats();
    EXPECT_EQ(p_after_free.exported_bytes, 0);
    EXPECT_EQ(p_after_free.physical_bytes,
              p_before_free.physical_bytes - p_before_free.exported_bytes);
    EXPECT_EQ(p_after_free.pooled_bytes,
              p_before_free.pooled_bytes + p_before_free.mapped_bytes -
                  p_before_free.exported_bytes);
    EXPECT_EQ(Mismatches(*decode, dst, prompt, 1), 0);

    // Exporter safety: its next requests never get the exported memory.
    for (int i = 0; i < o.max_slots; ++i) {
      VATTN_ASSERT_OK_AND_ASSIGN(int again, prefill->AllocSlot(prompt));
      VATTN_ASSERT_OK(prefill->Grow(again, prompt));
      Fill(*prefill, again, prompt, /*salt=*/50 + i);
    }
    EXPECT_EQ(Mismatches(*decode, dst, prompt, 1), 0);

    // The importer lets go: its imported memory is released, not pooled.
    const CacheStats d_before_free = decode->Stats();
    VATTN_ASSERT_OK(decode->Free(dst));
    EXPECT_EQ(decode->Stats().imported_bytes, 0);
    EXPECT_EQ(decode->backend()->counters().imported_bytes, 0);
    EXPECT_EQ(decode->Stats().physical_bytes, d_before_free.physical_bytes);
    const std::set<ino_t> open_now = OpenInodes();
    const std::set<ino_t> mapped_now = MappedInodes();
    for (ino_t i : exported_inodes) {
      EXPECT_EQ(open_now.count(i), 0u) << "exported memfd inode " << i << " still open";
      EXPECT_EQ(mapped_now.count(i), 0u) << "exported memfd inode " << i << " still mapped";
    }
  }
  EXPECT_EQ(OpenFds(), fds_at_start);
}

TEST_P(SlotExportTest, ImporterFreesFirstThenTheExporterStillOwnsItsBytes) {
  const KVCacheOptions o = Shape(GetParam());
  std::unique_ptr<KVCache> prefill = Cache(o, Host(true));
  std::unique_ptr<KVCache> decode = Cache(o, Host(false));
  VATTN_ASSERT_OK_AND_ASSIGN(int src, prefill->AllocSlot(300));
  VATTN_ASSERT_OK(prefill->Grow(src, 300));
  Fill(*prefill, src, 300, 3);
  SlotExport e;
  std::vector<int> fds;
  VATTN_ASSERT_OK(prefill->ExportSlot(src, 300, &e, &fds));
  EXPECT_EQ(e.tokens, 300);
  EXPECT_EQ(fds.size(), e.num_fds());
  VATTN_ASSERT_OK_AND_ASSIGN(int dst, decode->ImportSlot(e, fds));
  for (int fd : fds) ::close(fd);
  VATTN_ASSERT_OK(decode->Free(dst));
  EXPECT_EQ(Mismatches(*prefill, src, 300, 3), 0);
  // The imported slot starts clean: the next request there maps its own.
  VATTN_ASSERT_OK_AND_ASSIGN(int next, decode->AllocSlot(10));
  VATTN_ASSERT_OK(decode->Grow(next, 10));
  EXPECT_EQ(decode->Stats().imported_bytes, 0);
  VATTN_ASSERT_OK(prefill->Free(src));
  EXPECT_EQ(prefill->Stats().exported_bytes, 0);
}

TEST_P(SlotExportTest, ZeroTokensHandsOverAnEmptySlot) {
  const KVCacheOptions o = Shape(GetParam());
  std::unique_ptr<KVCache> prefill = Cache(o, Host(true));
  std::unique_ptr<KVCache> decode = Cache(o, Host(false));
  VATTN_ASSERT_OK_AND_ASSIGN(int src, prefill->AllocSlot(0));
  SocketPair sp;
  VATTN_ASSERT_OK(SendSlot(sp.fd[0], *prefill, src, 0));
  VATTN_ASSERT_OK_AND_ASSIGN(int dst, ReceiveSlot(sp.fd[1], *decode));
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, decode->GetSlot(dst));
  EXPECT_EQ(info.length, 0);
  EXPECT_EQ(info.extents, 0);
  VATTN_ASSERT_OK(decode->Grow(dst, 5));
}

TEST_P(SlotExportTest, ZeroOnReuseNeverClearsImportedMemory) {
  KVCacheOptions o = Shape(GetParam());
  std::unique_ptr<KVCache> prefill = Cache(o, Host(true));
  o.zero_on_reuse = true;
  std::unique_ptr<KVCache> decode = Cache(o, Host(false));
  // A used idle slot first, so the import lands where zeroing would apply.
  VATTN_ASSERT_OK_AND_ASSIGN(int used, decode->AllocSlot(100));
  VATTN_ASSERT_OK(decode->Grow(used, 100));
  VATTN_ASSERT_OK(decode->Free(used));
  VATTN_ASSERT_OK_AND_ASSIGN(int src, prefill->AllocSlot(500));
  VATTN_ASSERT_OK(prefill->Grow(src, 500));
  Fill(*prefill, src, 500, 21);
  SocketPair sp;
  VATTN_ASSERT_OK(SendSlot(sp.fd[0], *prefill, src, 500));
  VATTN_ASSERT_OK_AND_ASSIGN(int dst, ReceiveSlot(sp.fd[1], *decode));
  EXPECT_EQ(Mismatches(*decode, dst, 500, 21), 0);
  EXPECT_EQ(Mismatches(*prefill, src, 500, 21), 0);
  // Its own growth is cleared as usual; the prompt stays.
  VATTN_ASSERT_OK(decode->Grow(dst, 1500));
  EXPECT_EQ(Mismatches(*decode, dst, 500, 21), 0);
}

INSTANTIATE_TEST_SUITE_P(Layouts, SlotExportTest,
                         ::testing::Values(Layout::kTokenMajor, Layout::kLayerMajor),
                         [](const auto& param_info) {
                           return param_info.param == Layout::kTokenMajor
                                      ? "TokenMajor"
                                      : "LayerMajor";
                         });

TEST(SlotExportProcessTest, AForkedImporterReadsTheBytesAfterTheExporterFreed) {
  const KVCacheOptions o = Shape();
  std::unique_ptr<KVCache> prefill = Cache(o, Host(true));
  const std::int64_t prompt = 900;
  VATTN_ASSERT_OK_AND_ASSIGN(int src, prefill->AllocSlot(prompt));
  VATTN_ASSERT_OK(prefill->Grow(src, prompt));
  Fill(*prefill, src, prompt, 7);
  SocketPair sp;
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The importer: its own backend and cache. Exit codes say what failed.
    ::close(sp.fd[0]);
    HostBackendOptions h;
    h.granularity = kGranularity;
    auto backend = MakeHostBackend(h);
    if (!backend.ok()) ::_exit(10);
    auto decode = KVCache::Create(o, *backend);
    if (!decode.ok()) ::_exit(11);
    auto dst = ReceiveSlot(sp.fd[1], **decode);
    if (!dst.ok()) ::_exit(12);
    char go = 0;  // The exporter has freed its slot.
    if (::read(sp.fd[1], &go, 1) != 1) ::_exit(13);
    if (Mismatches(**decode, *dst, prompt, 7) != 0) ::_exit(14);
    if ((*decode)->Stats().physical_bytes != 0) ::_exit(15);
    if (!(*decode)->Grow(*dst, prompt + 500).ok()) ::_exit(16);
    if (Mismatches(**decode, *dst, prompt, 7) != 0) ::_exit(17);
    ::_exit(0);
  }
  ::close(sp.fd[1]);
  sp.fd[1] = -1;
  VATTN_EXPECT_OK(SendSlot(sp.fd[0], *prefill, src, prompt));
  VATTN_EXPECT_OK(prefill->Free(src));
  // Whatever the exporter does next lands elsewhere.
  auto again = prefill->AllocSlot(prompt);
  ASSERT_TRUE(again.ok());
  VATTN_EXPECT_OK(prefill->Grow(*again, prompt));
  Fill(*prefill, *again, prompt, 99);
  EXPECT_EQ(prefill->Stats().exported_bytes, 0);
  const char go = 1;
  EXPECT_EQ(::write(sp.fd[0], &go, 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the importer failed at step " << WEXITSTATUS(status);
}

TEST(SlotExportWireTest, MoreDescriptorsThanOneMessageCarriesTravelInChunks) {
  // Layer-major, 40 layers: 80 regions, so 4 extents need 320 descriptors.
  const KVCacheOptions o = Shape(Layout::kLayerMajor, 40);
  std::unique_ptr<KVCache> prefill = Cache(o, Host(true));
  std::unique_ptr<KVCache> decode = Cache(o, Host(false));
  const int fds_before = OpenFds();
  VATTN_ASSERT_OK_AND_ASSIGN(int src, prefill->AllocSlot(0));
  // Four Grows, one extent each (each token holds 128 bytes per region:
  // 512 tokens per granule).
  for (std::int64_t t : {100, 600, 1100, 1600}) VATTN_ASSERT_OK(prefill->Grow(src, t));
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo p_info, prefill->GetSlot(src));
  ASSERT_GE(p_info.extents, 4);
  Fill(*prefill, src, 1600, 11);
  const int fds_mid = OpenFds();
  SocketPair sp;
  VATTN_ASSERT_OK(SendSlot(sp.fd[0], *prefill, src, 1600));
  VATTN_ASSERT_OK_AND_ASSIGN(int dst, ReceiveSlot(sp.fd[1], *decode));
  EXPECT_EQ(Mismatches(*decode, dst, 1600, 11), 0);
  EXPECT_GT(OpenFds() - fds_mid - 2, 253) << "the importer holds one per handle";
  VATTN_ASSERT_OK(decode->Free(dst));
  VATTN_ASSERT_OK(prefill->Free(src));
  EXPECT_LE(OpenFds(), fds_mid + 2);
  EXPECT_GE(OpenFds(), fds_before);
}

TEST(SlotExportCApiTest, SendAndReceiveThroughTheCApi) {
  vattn_backend* exportable = nullptr;
  vattn_backend* plain = nullptr;
  ASSERT_EQ(vattn_backend_host_exportable(&exportable), VATTN_OK) << vattn_last_error();
  ASSERT_EQ(vattn_backend_host(&plain), VATTN_OK) << vattn_last_error();
  vattn_cache_options opts;
  vattn_cache_options_default(&opts);
  opts.num_layers = 2;
  opts.num_kv_heads = 2;
  opts.head_dim = 64;
  opts.max_slots = 2;
  opts.max_tokens = 4096;
  vattn_cache* prefill = nullptr;
  vattn_cache* decode = nullptr;
  ASSERT_EQ(vattn_cache_create(&opts, exportable, &prefill), VATTN_OK) << vattn_last_error();
  ASSERT_EQ(vattn_cache_create(&opts, plain, &decode), VATTN_OK) << vattn_last_error();
  vattn_backend_release(exportable);
  vattn_backend_release(plain);
  int src = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(prefill, 1000, &src), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(prefill, src, 1000), VATTN_OK);
  SocketPair sp;
  EXPECT_EQ(vattn_cache_send_slot(prefill, sp.fd[0], src, 1000), VATTN_OK) << vattn_last_error();
  int dst = -1;
  EXPECT_EQ(vattn_cache_receive_slot(decode, sp.fd[1], &dst), VATTN_OK) << vattn_last_error();
  EXPECT_GE(dst, 0);
  EXPECT_EQ(vattn_cache_receive_slot(decode, sp.fd[1], nullptr), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_send_slot(nullptr, sp.fd[0], src, 1), VATTN_INVALID_ARGUMENT);
  // Not exportable: a clear error naming the option.
  EXPECT_EQ(vattn_cache_send_slot(decode, sp.fd[0], dst, 1), VATTN_FAILED_PRECONDITION);
  EXPECT_NE(std::string(vattn_last_error()).find("exportable_handles"), std::string::npos);
  vattn_cache_destroy(decode);
  vattn_cache_destroy(prefill);
}

// ---- Bad input ---------------------------------------------------------------

class SlotExportBadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    prefill_ = Cache(Shape(), Host(true));
    decode_ = Cache(Shape(), Host(false));
    ASSERT_NE(prefill_, nullptr);
    ASSERT_NE(decode_, nullptr);
    auto slot = prefill_->AllocSlot(300);
    ASSERT_TRUE(slot.ok());
    src_ = *slot;
    VATTN_ASSERT_OK(prefill_->Grow(src_, 300));
    Fill(*prefill_, src_, 300, 5);
  }
  // What must not change on a refused import.
  struct Snapshot {
    int fds;
    std::int64_t physical, imported, mapped, active, handles, backend_imported;
  };
  Snapshot Take() const {
    const CacheStats s = decode_->Stats();
    const BackendCounters c = decode_->backend()->counters();
    return {OpenFds(), s.physical_bytes, s.imported_bytes, s.mapped_bytes,
            s.active_slots, c.handles, c.imported_bytes};
  }
  void ExpectUnchanged(const Snapshot& before) const {
    const Snapshot now = Take();
    EXPECT_EQ(now.fds, before.fds);
    EXPECT_EQ(now.physical, before.physical);
    EXPECT_EQ(now.imported, before.imported);
    EXPECT_EQ(now.mapped, before.mapped);
    EXPECT_EQ(now.active, before.active);
    EXPECT_EQ(now.handles, before.handles);
    EXPECT_EQ(now.backend_imported, before.backend_imported);
  }
  // A real export of the slot (descriptors owned by the test).
  void Export(SlotExport* e, std::vector<int>* fds) {
    VATTN_ASSERT_OK(prefill_->ExportSlot(src_, 300, e, fds));
  }
  static void CloseAll(const std::vector<int>& fds) {
    for (int fd : fds) ::close(fd);
  }

  std::unique_ptr<KVCache> prefill_;
  std::unique_ptr<KVCache> decode_;
  int src_ = -1;
};

TEST_F(SlotExportBadInputTest, AnotherShapeIsRefusedNamingBoth) {
  KVCacheOptions other = Shape();
  other.num_kv_heads = 4;
  std::unique_ptr<KVCache> wrong = Cache(other, Host(false));
  SocketPair sp;
  const CacheStats before = wrong->Stats();
  const int fds = OpenFds();
  VATTN_ASSERT_OK(SendSlot(sp.fd[0], *prefill_, src_, 300));
  auto slot = ReceiveSlot(sp.fd[1], *wrong);
  VATTN_EXPECT_CODE(slot, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(slot.status().message().find("2 heads"), std::string::npos) << slot.status();
  EXPECT_NE(slot.status().message().find("4 heads"), std::string::npos) << slot.status();
  EXPECT_EQ(OpenFds(), fds);
  EXPECT_EQ(wrong->Stats().active_slots, before.active_slots);
  EXPECT_EQ(wrong->Stats().imported_bytes, 0);
  EXPECT_EQ(wrong->backend()->counters().handles, 0);
}

TEST_F(SlotExportBadInputTest, AClosedDescriptorIsRefusedNamingIt) {
  SlotExport e;
  std::vector<int> fds;
  Export(&e, &fds);
  ASSERT_EQ(fds.size(), 1u);  // 300 tokens x 512 bytes: one 3-granule extent.
  const int closed = fds.back();
  ::close(closed);
  fds.pop_back();
  const Snapshot before = Take();
  const std::vector<int> with_closed = {closed};
  auto slot = decode_->ImportSlot(e, with_closed);
  VATTN_EXPECT_CODE(slot, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(slot.status().message().find("descriptor " + std::to_string(closed)),
            std::string::npos)
      << slot.status();
  ExpectUnchanged(before);
  CloseAll(fds);
}

TEST_F(SlotExportBadInputTest, AForeignDescriptorIsRefused) {
  SlotExport e;
  std::vector<int> fds;
  Export(&e, &fds);
  const int file = ::open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(file, 0);
  std::vector<int> mixed = fds;
  mixed.back() = file;  // The last region of the last extent.
  const Snapshot before = Take();
  auto slot = decode_->ImportSlot(e, mixed);
  VATTN_EXPECT_CODE(slot, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(slot.status().message().find("not a vattn export"), std::string::npos)
      << slot.status();
  ExpectUnchanged(before);
  ::close(file);
  CloseAll(fds);
}

TEST_F(SlotExportBadInputTest, ADescriptionThatDoesNotAddUpIsRefused) {
  SlotExport e;
  std::vector<int> fds;
  Export(&e, &fds);
  const Snapshot before = Take();
  SlotExport too_many_tokens = e;
  too_many_tokens.tokens = 5000;
  VATTN_EXPECT_CODE(decode_->ImportSlot(too_many_tokens, fds),
                    absl::StatusCode::kInvalidArgument);
  SlotExport unbacked = e;
  unbacked.tokens = 600;  // Three granules back 384 tokens.
  VATTN_EXPECT_CODE(decode_->ImportSlot(unbacked, fds), absl::StatusCode::kInvalidArgument);
  SlotExport gap = e;
  gap.extents[0].offset = static_cast<std::int64_t>(kGranularity);
  VATTN_EXPECT_CODE(decode_->ImportSlot(gap, fds), absl::StatusCode::kInvalidArgument);
  std::vector<int> short_fds(fds.begin(), fds.end() - 1);
  auto count = decode_->ImportSlot(e, short_fds);
  VATTN_EXPECT_CODE(count, absl::StatusCode::kInvalidArgument);
  ExpectUnchanged(before);
  CloseAll(fds);
}

TEST_F(SlotExportBadInputTest, NoFreeSlotIsResourceExhausted) {
  for (int i = 0; i < Shape().max_slots; ++i) VATTN_ASSERT_OK(decode_->AllocSlot(1).status());
  SocketPair sp;
  const Snapshot before = Take();
  VATTN_ASSERT_OK(SendSlot(sp.fd[0], *prefill_, src_, 300));
  auto slot = ReceiveSlot(sp.fd[1], *decode_);
  VATTN_EXPECT_CODE(slot, absl::StatusCode::kResourceExhausted);
  ExpectUnchanged(before);
}

TEST_F(SlotExportBadInputTest, ATruncatedMessageIsDataLossAndLeavesNoDescriptor) {
  const Snapshot before = Take();
  {
    // The header alone, then the peer goes.
    SocketPair sp;
    SlotExport e;
    std::vector<int> fds;
    Export(&e, &fds);
    VATTN_ASSERT_OK(SendSlotExport(sp.fd[0], e, fds));
    CloseAll(fds);
    // Read a valid message's header and extents, send them on without the
    // descriptors.
    std::vector<std::uint8_t> bytes(64 + 16 * e.extents.size());
    ASSERT_EQ(::recv(sp.fd[1], bytes.data(), bytes.size(), MSG_WAITALL),
              static_cast<ssize_t>(bytes.size()));
    SocketPair cut;
    ASSERT_EQ(::send(cut.fd[0], bytes.data(), bytes.size(), 0),
              static_cast<ssize_t>(bytes.size()));
    cut.Close(0);
    auto slot = ReceiveSlot(cut.fd[1], *decode_);
    VATTN_EXPECT_CODE(slot, absl::StatusCode::kDataLoss);
    EXPECT_NE(slot.status().message().find("descriptor chunk 0"), std::string::npos)
        << slot.status();
  }
  {
    SocketPair cut;
    ASSERT_EQ(::send(cut.fd[0], "VATTNSLT", 8, 0), 8);
    cut.Close(0);
    auto slot = ReceiveSlot(cut.fd[1], *decode_);
    VATTN_EXPECT_CODE(slot, absl::StatusCode::kDataLoss);
    EXPECT_NE(slot.status().message().find("8 of the 64 bytes"), std::string::npos)
        << slot.status();
  }
  {
    SocketPair junk;
    std::vector<char> bytes(64, 'x');
    ASSERT_EQ(::send(junk.fd[0], bytes.data(), bytes.size(), 0), 64);
    VATTN_EXPECT_CODE(ReceiveSlot(junk.fd[1], *decode_), absl::StatusCode::kInvalidArgument);
  }
  ExpectUnchanged(before);
}

TEST_F(SlotExportBadInputTest, SocketsThatCannotCarryDescriptorsAreRefused) {
  int dgram[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, dgram), 0);
  const CacheStats before = prefill_->Stats();
  auto sent = SendSlot(dgram[0], *prefill_, src_, 300);
  VATTN_EXPECT_CODE(sent, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(sent.message().find("socket " + std::to_string(dgram[0])), std::string::npos)
      << sent;
  // Nothing was exported.
  EXPECT_EQ(prefill_->Stats().exported_slots, before.exported_slots);
  EXPECT_EQ(prefill_->Stats().exported_bytes, 0);
  VATTN_EXPECT_CODE(ReceiveSlot(dgram[1], *decode_), absl::StatusCode::kInvalidArgument);
  const int file = ::open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
  VATTN_EXPECT_CODE(SendSlot(file, *prefill_, src_, 300), absl::StatusCode::kInvalidArgument);
  ::close(file);
  ::close(dgram[0]);
  ::close(dgram[1]);
}

TEST_F(SlotExportBadInputTest, ExportRefusalsLeaveTheExporterAsItWas) {
  SlotExport e;
  std::vector<int> fds;
  const int before = OpenFds();
  VATTN_EXPECT_CODE(prefill_->ExportSlot(src_, 5000, &e, &fds), absl::StatusCode::kOutOfRange);
  VATTN_EXPECT_CODE(prefill_->ExportSlot(src_, 600, &e, &fds), absl::StatusCode::kOutOfRange);
  VATTN_EXPECT_CODE(prefill_->ExportSlot(src_, -1, &e, &fds),
                    absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(prefill_->ExportSlot(9, 1, &e, &fds), absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(prefill_->ExportSlot(src_ + 1, 1, &e, &fds),
                    absl::StatusCode::kFailedPrecondition);
  VATTN_EXPECT_CODE(prefill_->ExportSlot(src_, 1, nullptr, &fds),
                    absl::StatusCode::kInvalidArgument);
  // A backend without exportable handles.
  auto slot = decode_->AllocSlot(10);
  ASSERT_TRUE(slot.ok());
  VATTN_ASSERT_OK(decode_->Grow(*slot, 10));
  auto plain = decode_->ExportSlot(*slot, 10, &e, &fds);
  VATTN_EXPECT_CODE(plain, absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(plain.message().find("exportable_handles"), std::string::npos) << plain;
  EXPECT_TRUE(fds.empty());
  EXPECT_EQ(OpenFds(), before);
  EXPECT_EQ(prefill_->Stats().exported_bytes, 0);
  // An imported extent cannot be passed on.
  std::unique_ptr<KVCache> third = Cache(Shape(), Host(true));
  std::vector<int> real;
  VATTN_ASSERT_OK(prefill_->ExportSlot(src_, 300, &e, &real));
  auto dst = third->ImportSlot(e, real);
  CloseAll(real);
  ASSERT_TRUE(dst.ok()) << dst.status();
  std::vector<int> again;
  VATTN_EXPECT_CODE(third->ExportSlot(*dst, 300, &e, &again),
                    absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(again.empty());
}

TEST_F(SlotExportBadInputTest, AMapFailureDuringImportUndoesEverything) {
  auto fault = FaultInjectionBackend::Create(Host(false));
  ASSERT_TRUE(fault.ok());
  std::shared_ptr<FaultInjectionBackend> backend = *fault;
  KVCacheOptions layer_major = Shape(Layout::kLayerMajor);
  std::unique_ptr<KVCache> prefill = Cache(layer_major, Host(true));
  std::unique_ptr<KVCache> decode = Cache(layer_major, backend);
  VATTN_ASSERT_OK_AND_ASSIGN(int src, prefill->AllocSlot(0));
  VATTN_ASSERT_OK(prefill->Grow(src, 100));
  VATTN_ASSERT_OK(prefill->Grow(src, 600));  // Two extents, 4 regions each.
  SlotExport e;
  std::vector<int> fds;
  VATTN_ASSERT_OK(prefill->ExportSlot(src, 600, &e, &fds));
  ASSERT_EQ(e.extents.size(), 2u);
  const int fds_before = OpenFds();
  // The 6th map: the second extent's second region.
  backend->SetPlan(FaultPlan::FailNth(BackendOp::kMap, 6));
  auto slot = decode->ImportSlot(e, fds);
  VATTN_EXPECT_CODE(slot, absl::StatusCode::kInternal);
  EXPECT_EQ(backend->injected(), 1);
  EXPECT_EQ(OpenFds(), fds_before);
  EXPECT_EQ(backend->counters().handles, 0);
  EXPECT_EQ(backend->counters().mappings, 0);
  EXPECT_EQ(decode->Stats().active_slots, 0);
  EXPECT_EQ(decode->Stats().imported_bytes, 0);
  EXPECT_EQ(decode->Stats().mapped_bytes, 0);
  // And the same export imports once the fault is gone.
  backend->SetPlan({});
  VATTN_ASSERT_OK_AND_ASSIGN(int ok, decode->ImportSlot(e, fds));
  EXPECT_EQ(decode->Stats().imported_bytes, 2 * static_cast<std::int64_t>(kGranularity) * 4);
  VATTN_ASSERT_OK(decode->Free(ok));
  CloseAll(fds);
}

}  // namespace
}  // namespace vattn
