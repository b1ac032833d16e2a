// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The harness the prefix-sharing tests share (prefix_model_test.cc,
// prefix_fault_test.cc): a Host-backed cache (optionally behind a fault-
// injection wrapper), a reference model of what every slot and cached
// prefix holds, and Verify(), which checks the model against the cache and
// against the kernel's view of the mappings (mapping_oracle.h).
//
// Every token a request writes gets a pattern derived from a write tag (one
// per write), in every byte of every region, so what each slot reads is
// predictable; sharing (KeepPrefix, AllocSlotWithPrefix, Fork) copies tags
// in the model.
#ifndef VATTN_TESTS_SUPPORT_PREFIX_HARNESS_H_
#define VATTN_TESTS_SUPPORT_PREFIX_HARNESS_H_

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tests/support/mapping_oracle.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn::testing::prefix {

using ::vattn::testing::MappingSnapshot;

inline constexpr std::size_t kGranularity = std::size_t{64} << 10;

// The 8-byte word `w` of token `t` in region `r`, written with `tag`. Word 0
// holds the tag and the token in clear, so a mismatch says whose data is
// there; the others are mixed so that a copy of the wrong range shows.
inline std::uint64_t Word(std::uint32_t tag, std::int64_t t, int r, std::int64_t w) {
  if (w == 0) {
    return (std::uint64_t{tag} << 32) | static_cast<std::uint32_t>(t);
  }
  std::uint64_t x = (std::uint64_t{tag} << 32) ^
                    (static_cast<std::uint64_t>(t) << 12) ^
                    (static_cast<std::uint64_t>(r) << 6) ^
                    static_cast<std::uint64_t>(w);
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct ModelSlot {
  bool active = false;
  std::int64_t length = 0;
  // Tag of each token written (index = token); may run past `length` after
  // a Shrink (the memory keeps the data).
  std::vector<std::uint32_t> tags;
  // Tokens [0, frozen) are shared with a prefix or another slot, or kept
  // as a prefix: this request never writes them again.
  std::int64_t frozen = 0;
};

struct ModelPrefix {
  std::vector<std::uint32_t> tags;
};

struct Config {
  Layout layout = Layout::kTokenMajor;
  std::int64_t budget_granules = 24;  // Per region.
  bool zero_on_reuse = false;
  bool defer_reclaim = true;
  int max_prefixes = 64;
  // Look-ahead of the map-ahead thread (0: none). With the thread, Verify
  // first waits for it to be idle, and ResourceExhausted is not judged (the
  // thread may hold memory for a map in flight).
  std::int64_t map_ahead_tokens = 0;
};

class Harness {
 public:
  // The cache runs on a fault-injection wrapper over a Host backend;
  // counters are read from the Host backend itself.
  Harness(const Config& cfg, std::uint64_t seed, FaultPlan plan = {})
      : cfg_(cfg), rng_(seed) {
    HostBackendOptions ho;
    ho.granularity = kGranularity;
    auto host = MakeHostBackend(ho);
    EXPECT_TRUE(host.ok()) << host.status();
    inner_ = *host;
    auto fault = FaultInjectionBackend::Create(inner_, std::move(plan));
    EXPECT_TRUE(fault.ok()) << fault.status();
    fault_ = *fault;
    opts_.num_layers = 2;
    opts_.num_kv_heads = 2;
    opts_.head_dim = 16;
    opts_.dtype = DType::kFloat16;
    opts_.max_slots = 6;
    opts_.layout = cfg.layout;
    // Token-major: 256 B per token, 256 tokens per granule. Layer-major:
    // 64 B per token and region (4 regions), 1024 tokens per granule.
    opts_.max_tokens = cfg.layout == Layout::kTokenMajor ? 2048 : 6144;
    opts_.max_extent_bytes = 2 * kGranularity;
    opts_.zero_on_reuse = cfg.zero_on_reuse;
    opts_.defer_reclaim = cfg.defer_reclaim;
    opts_.max_prefixes = cfg.max_prefixes;
    opts_.map_ahead_tokens = cfg.map_ahead_tokens;
    opts_.memory_budget_bytes = static_cast<std::size_t>(
        cfg.budget_granules * Regions()) * kGranularity;
    model_.resize(static_cast<std::size_t>(opts_.max_slots));
  }

  absl::Status Open() {
    auto cache = KVCache::Create(opts_, fault_);
    if (!cache.ok()) return cache.status();
    cache_ = std::move(*cache);
    return absl::OkStatus();
  }
  void Close() { cache_.reset(); }

  KVCache& cache() { return *cache_; }
  Backend& backend() { return *inner_; }
  FaultInjectionBackend& fault() { return *fault_; }
  KVCacheOptions& mutable_opts() { return opts_; }
  std::mt19937_64& rng() { return rng_; }
  const KVCacheOptions& opts() const { return opts_; }
  bool map_ahead() const { return cfg_.map_ahead_tokens > 0; }
  std::vector<ModelSlot>& model() { return model_; }
  std::map<std::uint64_t, ModelPrefix>& prefixes() { return prefixes_; }
  // Evictions the model has noticed (a call returned NotFound for a prefix
  // it held).
  std::int64_t evictions() const { return evictions_; }
  void NoteEviction() { ++evictions_; }
  // Physical memory a known defect leaves unaccounted (neither mapped,
  // pooled, quarantined nor kept): Verify and the teardown checks allow it.
  void TolerateLostBytes(std::int64_t bytes) { tolerated_lost_bytes_ = bytes; }
  std::int64_t tolerated_lost_bytes() const { return tolerated_lost_bytes_; }
  // Physical bytes the books place nowhere (see Verify).
  std::int64_t UnplacedBytes() {
    const CacheStats st = cache_->Stats();
    absl::StatusOr<MappingSnapshot> all = SnapshotAll();
    if (!all.ok()) return -1;
    return st.physical_bytes - (all->DistinctBytes() + st.pooled_bytes +
                                st.quarantined_bytes + st.cached_prefix_bytes);
  }

  int Regions() const {
    return opts_.layout == Layout::kTokenMajor ? 1 : 2 * opts_.num_layers;
  }
  // Bytes of one token in one region.
  std::int64_t TokenBytes() const {
    return cache_->bytes_per_token() / Regions();
  }
  std::int64_t TokensPerGranule() const {
    return static_cast<std::int64_t>(kGranularity) / TokenBytes();
  }
  // Bytes, all regions, that back `tokens` of a slot.
  std::int64_t NeedBytes(std::int64_t tokens) const {
    const std::int64_t g = static_cast<std::int64_t>(kGranularity);
    return (tokens * TokenBytes() + g - 1) / g * g * Regions();
  }
  std::int64_t Budget() const {
    return static_cast<std::int64_t>(opts_.memory_budget_bytes);
  }
  // Address of token t of region r of a slot.
  DevicePtr TokenAddress(int slot, int r, std::int64_t t) const {
    // The token-major view's slot stride covers the one region; layer-major
    // regions are K/V of each layer: use the views so that the test relies
    // on the documented layout only.
    const int layer = r / 2;
    const TensorView v =
        Regions() == 1 ? cache_->K(0) : (r % 2 == 0 ? cache_->K(layer)
                                                    : cache_->V(layer));
    return v.ElementAddress(slot, t, 0, 0);
  }

  // A new write tag for `what` (kept for messages).
  std::uint32_t NewTag(std::string what) {
    tag_what_.push_back(std::move(what));
    return static_cast<std::uint32_t>(tag_what_.size());
  }
  std::string TagWhat(std::uint32_t tag) const {
    if (tag == 0) return "nothing (zeros)";
    if (tag > tag_what_.size()) return absl::StrFormat("unknown tag %d", tag);
    return absl::StrFormat("tag %d (%s)", tag, tag_what_[tag - 1]);
  }

  // Writes tokens [from, to) of an active slot with a new tag, through the
  // backend's copy calls (a read-only mapping there is an error, not a
  // crash). The model's frozen tokens are never written.
  void Write(int slot, std::int64_t from, std::int64_t to, const char* why) {
    ModelSlot& m = model_[static_cast<std::size_t>(slot)];
    from = std::max(from, m.frozen);
    if (from >= to) return;
    const std::uint32_t tag = NewTag(absl::StrFormat(
        "slot %d tokens [%d, %d), %s", slot, from, to, why));
    if (static_cast<std::int64_t>(m.tags.size()) < to) {
      m.tags.resize(static_cast<std::size_t>(to), 0);
    }
    const std::int64_t words = TokenBytes() / 8;
    std::vector<std::uint64_t> buf(static_cast<std::size_t>((to - from) * words));
    for (int r = 0; r < Regions(); ++r) {
      for (std::int64_t t = from; t < to; ++t) {
        for (std::int64_t w = 0; w < words; ++w) {
          buf[static_cast<std::size_t>((t - from) * words + w)] =
              Word(tag, t, r, w);
        }
      }
      const absl::Status s = inner_->CopyToDevice(
          TokenAddress(slot, r, from), buf.data(),
          buf.size() * sizeof(std::uint64_t));
      ASSERT_TRUE(s.ok()) << "writing slot " << slot << " tokens [" << from
                          << ", " << to << ") region " << r << " (" << why
                          << "): " << s;
    }
    for (std::int64_t t = from; t < to; ++t) {
      m.tags[static_cast<std::size_t>(t)] = tag;
    }
  }

  // Checks that tokens [0, length) of the slot read `tags`.
  void CheckData(int slot, const std::vector<std::uint32_t>& tags,
                 std::int64_t length, const std::string& whose) {
    const std::int64_t words = TokenBytes() / 8;
    std::vector<std::uint64_t> buf(static_cast<std::size_t>(length * words));
    for (int r = 0; r < Regions() && length > 0; ++r) {
      const absl::Status s = inner_->CopyFromDevice(
          buf.data(), TokenAddress(slot, r, 0),
          buf.size() * sizeof(std::uint64_t));
      ASSERT_TRUE(s.ok()) << "reading " << whose << " region " << r << ": "
                          << s;
      for (std::int64_t t = 0; t < length; ++t) {
        const std::uint32_t tag = tags[static_cast<std::size_t>(t)];
        for (std::int64_t w = 0; w < words; ++w) {
          const std::uint64_t got = buf[static_cast<std::size_t>(t * words + w)];
          if (got == Word(tag, t, r, w)) continue;
          const std::uint64_t head = buf[static_cast<std::size_t>(t * words)];
          FAIL() << whose << " token " << t << " region " << r << " word "
                 << w << ": expected " << TagWhat(tag) << ", word 0 holds "
                 << (head == 0 ? std::string("zero")
                               : absl::StrFormat(
                                     "token %d of %s",
                                     static_cast<std::uint32_t>(head),
                                     TagWhat(static_cast<std::uint32_t>(
                                         head >> 32))));
        }
      }
    }
  }

  // The slots' mappings (the cache's reservation).
  // The cache's state, for failure messages.
  std::string Dump() const {
    const CacheStats st = cache_->Stats();
    std::string out = absl::StrFormat(
        "\n  physical %d (budget %d) mapped %d saved %d pooled %d shared %d "
        "quarantined %d cached prefixes %d (%d bytes) evictions %d "
        "reclaimed %d",
        st.physical_bytes, st.budget_bytes, st.mapped_bytes,
        st.shared_saved_bytes, st.pooled_bytes, st.shared_bytes,
        st.quarantined_bytes, st.cached_prefixes, st.cached_prefix_bytes,
        st.prefix_evictions, st.reclaimed_bytes);
    for (int s = 0; s < opts_.max_slots; ++s) {
      absl::StatusOr<SlotInfo> i = cache_->GetSlot(s);
      if (!i.ok()) continue;
      const ModelSlot& m = model_[static_cast<std::size_t>(s)];
      out += absl::StrFormat(
          "\n  slot %d: %s length %d backed %d mapped %d adopted %d extents "
          "%d (model: frozen %d)",
          s, i->active ? "active" : "idle", i->length, i->backed_tokens,
          i->mapped_bytes, i->adopted_bytes, i->extents, m.frozen);
    }
    for (const auto& [id, p] : prefixes_) {
      absl::StatusOr<PrefixInfo> i = cache_->GetPrefix(id);
      if (!i.ok()) {
        out += absl::StrFormat("\n  prefix %d: %s", id, i.status().ToString());
        continue;
      }
      out += absl::StrFormat(
          "\n  prefix %d: %d tokens, %d bytes (tail %d), %d whole extents, "
          "%d users",
          id, i->tokens, i->bytes, i->tail_bytes, i->whole_extents, i->users);
    }
    return out;
  }

  // ---- Calls that keep the model in step (no faults expected in Write).
  // A request of `tokens` tokens, written, mapped one granule per Grow (so a
  // granule boundary is an extent boundary).
  absl::StatusOr<int> Request(std::int64_t tokens) {
    absl::StatusOr<int> slot = cache_->AllocSlot(0);
    if (!slot.ok()) return slot.status();
    ModelSlot& m = model_[static_cast<std::size_t>(*slot)];
    m = ModelSlot{};
    m.active = true;
    const std::int64_t step = TokensPerGranule();
    while (m.length < tokens) {
      const std::int64_t t = std::min(tokens, m.length + step);
      const absl::Status s = cache_->Grow(*slot, t);
      if (!s.ok()) return s;
      const std::int64_t old = m.length;
      m.length = t;
      Write(*slot, old, t, "Request");
      if (::testing::Test::HasFatalFailure()) {
        return absl::InternalError("write failed");
      }
    }
    return slot;
  }
  absl::Status Keep(int slot, std::int64_t tokens, std::uint64_t id) {
    const absl::Status s = cache_->KeepPrefix(slot, tokens, id);
    if (!s.ok()) return s;
    ModelSlot& m = model_[static_cast<std::size_t>(slot)];
    ModelPrefix p;
    p.tags.assign(m.tags.begin(), m.tags.begin() + tokens);
    prefixes_[id] = std::move(p);
    m.frozen = std::max(m.frozen, tokens);
    return s;
  }
  // AllocSlotWithPrefix, then the request writes its tokens past the prefix.
  absl::StatusOr<int> Share(std::uint64_t id, std::int64_t tokens,
                            std::int64_t expected = 0) {
    absl::StatusOr<int> slot = cache_->AllocSlotWithPrefix(id, tokens, expected);
    if (!slot.ok()) return slot;
    ++hits_;
    ModelSlot& m = model_[static_cast<std::size_t>(*slot)];
    const std::vector<std::uint32_t>& ptags = prefixes_[id].tags;
    const std::int64_t shared =
        std::min<std::int64_t>(tokens, static_cast<std::int64_t>(ptags.size()));
    EXPECT_FALSE(m.active) << "slot " << *slot << " handed out twice";
    m = ModelSlot{};
    m.active = true;
    m.length = tokens;
    m.tags.assign(ptags.begin(), ptags.begin() + shared);
    m.frozen = shared;
    Write(*slot, shared, tokens, "after prefix");
    return slot;
  }
  absl::StatusOr<int> ForkSlot(int src) {
    absl::StatusOr<int> child = cache_->Fork(src);
    if (!child.ok()) return child;
    ModelSlot& s = model_[static_cast<std::size_t>(src)];
    ModelSlot& c = model_[static_cast<std::size_t>(*child)];
    EXPECT_FALSE(c.active) << "slot " << *child << " handed out twice";
    c = ModelSlot{};
    c.active = true;
    c.length = s.length;
    c.tags.assign(s.tags.begin(), s.tags.begin() + s.length);
    c.frozen = s.length;
    s.frozen = std::max(s.frozen, s.length);
    return child;
  }
  // Free: on error the slot is freed all the same (kv_cache.h).
  absl::Status FreeSlot(int slot) {
    const absl::Status s = cache_->Free(slot);
    absl::StatusOr<SlotInfo> info = cache_->GetSlot(slot);
    if (info.ok() && !info->active) {
      model_[static_cast<std::size_t>(slot)].active = false;
    }
    return s;
  }
  absl::Status Drop(std::uint64_t id) {
    const absl::Status s = cache_->DropPrefix(id);
    if (s.ok()) prefixes_.erase(id);
    return s;
  }
  // Grows an active slot and writes the new tokens.
  absl::Status GrowAndWrite(int slot, std::int64_t tokens) {
    const absl::Status s = cache_->Grow(slot, tokens);
    if (!s.ok()) return s;
    ModelSlot& m = model_[static_cast<std::size_t>(slot)];
    if (tokens > m.length) {
      const std::int64_t old = m.length;
      m.length = tokens;
      Write(slot, old, tokens, "GrowAndWrite");
    }
    return s;
  }
  // Frees every slot and drops every prefix the model holds (a prefix the
  // cache evicted meanwhile may be NotFound).
  void FreeAllAndDrop() {
    for (int s = 0; s < opts_.max_slots; ++s) {
      if (model_[static_cast<std::size_t>(s)].active) {
        VATTN_EXPECT_OK(FreeSlot(s));
      }
    }
    std::vector<std::uint64_t> ids;
    for (const auto& [id, p] : prefixes_) ids.push_back(id);
    for (std::uint64_t id : ids) {
      const absl::Status s = cache_->DropPrefix(id);
      if (s.code() == absl::StatusCode::kNotFound) {
        ++evictions_;  // Evicted meanwhile (Verify checks the count).
        prefixes_.erase(id);
      } else if (s.ok()) {
        prefixes_.erase(id);
      } else {
        EXPECT_GT(tolerated_lost_bytes_, 0) << "DropPrefix(" << id << "): " << s;
      }
    }
  }
  // With every slot freed and every prefix dropped, every byte is idle:
  // Trim(0) gives it all back and nothing stays shared (a reference leaked
  // by sharing would keep its extent).
  void ExpectAllIdleAndTrimmable() {
    absl::StatusOr<std::size_t> trimmed = cache_->Trim(0);
    EXPECT_TRUE(trimmed.ok() || tolerated_lost_bytes_ > 0) << trimmed.status();
    const CacheStats st = cache_->Stats();
    EXPECT_LE(st.physical_bytes, tolerated_lost_bytes_) << Dump();
    if (tolerated_lost_bytes_ > 0) return;  // A known defect's leftovers.
    EXPECT_EQ(st.shared_bytes, 0) << Dump();
    EXPECT_EQ(st.shared_saved_bytes, 0) << Dump();
    EXPECT_EQ(st.cached_prefixes, 0) << Dump();
    EXPECT_EQ(st.cached_prefix_bytes, 0) << Dump();
    EXPECT_LE(inner_->counters().physical_bytes, tolerated_lost_bytes_);
    if (tolerated_lost_bytes_ == 0) {
      EXPECT_EQ(inner_->counters().mappings, 0);
    }
  }

  absl::StatusOr<MappingSnapshot> Snapshot() const {
    const MemoryRange res = cache_->Reservation();
    return MappingSnapshot::Take(res.address, res.bytes, kGranularity);
  }
  // Every Host-backend mapping of the process (the slots', and the cached
  // prefixes' tails in their own reservation); one backend lives at a time.
  static absl::StatusOr<MappingSnapshot> SnapshotAll() {
    return MappingSnapshot::Take(0, ~std::uintptr_t{0} >> 1, kGranularity);
  }

  // What nothing may take back, at most: distinct physical bytes mapped at
  // the backed tokens of active slots, plus all the memory of prefixes that
  // active slots use (an in-use prefix is never evicted; its extents some
  // slot maps count twice here, which only makes the bound looser).
  std::int64_t PinnedBytes(const MappingSnapshot& snap) {
    std::int64_t in_use = 0;
    for (const auto& [id, p] : prefixes_) {
      absl::StatusOr<PrefixInfo> info = cache_->GetPrefix(id);
      if (info.ok() && info->users > 0) in_use += info->bytes;
    }
    return DistinctBackedBytes(snap) + in_use;
  }
  std::int64_t DistinctBackedBytes(const MappingSnapshot& snap) {
    std::map<std::pair<std::uint64_t, std::uint64_t>, bool> seen;
    for (int s = 0; s < opts_.max_slots; ++s) {
      auto info = cache_->GetSlot(s);
      if (!info.ok() || !info->active) continue;
      for (int r = 0; r < Regions(); ++r) {
        for (std::int64_t t = 0; t < info->backed_tokens;
             t += TokensPerGranule()) {
          const auto phys = snap.PhysicalOf(TokenAddress(s, r, t));
          if (phys.first != 0) seen[phys] = true;
        }
      }
    }
    return static_cast<std::int64_t>(seen.size() * kGranularity);
  }

  // Everything the model knows, against the cache and the kernel.
  void Verify(const char* after, bool check_data) {
    SCOPED_TRACE(after);
    if (cfg_.map_ahead_tokens > 0) (void)cache_->WaitForBackgroundIdle();
    const CacheStats st = cache_->Stats();
    const BackendCounters c = inner_->counters();
    // One read of /proc/self/maps: everything, and the slots' part of it.
    VATTN_ASSERT_OK_AND_ASSIGN(MappingSnapshot all, SnapshotAll());
    const MemoryRange res = cache_->Reservation();
    const MappingSnapshot snap = all.Within(res.address, res.bytes);
    std::int64_t active = 0;
    for (int s = 0; s < opts_.max_slots; ++s) {
      const ModelSlot& m = model_[static_cast<std::size_t>(s)];
      VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache_->GetSlot(s));
      ASSERT_EQ(info.active, m.active) << "slot " << s;
      if (!m.active) continue;
      ++active;
      ASSERT_EQ(info.length, m.length) << "slot " << s;
      ASSERT_GE(info.backed_tokens, m.length) << "slot " << s;
      for (int r = 0; r < Regions(); ++r) {
        // Backed means mapped (not reclaimed from under the request), and
        // what the request may still write is writable.
        const std::string unmapped = snap.CheckMapped(
            TokenAddress(s, r, 0),
            static_cast<std::size_t>(info.backed_tokens * TokenBytes()),
            /*writable=*/false);
        ASSERT_EQ(unmapped, "") << "slot " << s << " region " << r
                                << " backs " << info.backed_tokens
                                << " tokens";
        if (info.backed_tokens > m.frozen) {
          const std::string read_only = snap.CheckMapped(
              TokenAddress(s, r, m.frozen),
              static_cast<std::size_t>((info.backed_tokens - m.frozen) *
                                       TokenBytes()),
              /*writable=*/true);
          ASSERT_EQ(read_only, "")
              << "slot " << s << " region " << r << ": tokens ["
              << m.frozen << ", " << info.backed_tokens
              << ") are the request's own and must be writable";
        }
      }
      if (check_data) {
        ASSERT_NO_FATAL_FAILURE(CheckData(s, m.tags, m.length,
                                          absl::StrFormat("slot %d", s)));
      }
    }
    ASSERT_EQ(st.active_slots, active);
    // Aliased memory is read-only wherever it is mapped.
    ASSERT_EQ(all.WritableAlias(), "")
        << Dump();
    // Physical bytes: the backend's books, the cache's, the kernel's.
    ASSERT_EQ(st.physical_bytes, c.physical_bytes)
        << Dump();
    ASSERT_LE(st.physical_bytes, Budget())
        << Dump();
    ASSERT_LE(st.peak_physical_bytes, Budget())
        << Dump();
    ASSERT_EQ(c.mapped_bytes, all.MappedBytes())
        << "the backend's mapped bytes against /proc/self/maps"
        << Dump();
    // mapped_bytes counts every mapping into slots; less what sharing saved
    // it is the physical memory the slots map (each granule once).
    std::int64_t slot_mapped = 0;
    for (int s = 0; s < opts_.max_slots; ++s) {
      VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache_->GetSlot(s));
      slot_mapped += info.mapped_bytes;
    }
    ASSERT_EQ(st.mapped_bytes, slot_mapped) << "Stats against GetSlot"
        << Dump();
    // A quarantined extent may still be mapped in some of its regions.
    const std::int64_t q = st.quarantined_bytes;
    ASSERT_GE(snap.MappedBytes(), st.mapped_bytes)
        << "Stats().mapped_bytes against /proc/self/maps"
        << Dump();
    ASSERT_LE(snap.MappedBytes(), st.mapped_bytes + q)
        << "Stats().mapped_bytes against /proc/self/maps"
        << Dump();
    ASSERT_GE(snap.DistinctBytes(), st.mapped_bytes - st.shared_saved_bytes)
        << "mapped - shared_saved against the distinct physical granules "
           "the kernel shows mapped in the slots"
        << Dump();
    ASSERT_LE(snap.DistinctBytes(), st.mapped_bytes - st.shared_saved_bytes + q)
        << "mapped - shared_saved against the distinct physical granules "
           "the kernel shows mapped in the slots"
        << Dump();
    // Every physical byte is mapped somewhere (once), pooled, quarantined,
    // or kept by a cached prefix.
    const std::int64_t placed = all.DistinctBytes() + st.pooled_bytes;
    ASSERT_LE(placed, st.physical_bytes)
        << "mapped (each physical granule once) + pooled + quarantined"
        << Dump();
    ASSERT_LE(st.physical_bytes,
              placed + q + st.cached_prefix_bytes + tolerated_lost_bytes_)
        << "physical memory neither mapped, pooled, quarantined nor kept"
        << Dump();
    // shared_bytes: at least what is mapped at several places, at most
    // what is mapped read-only (shared memory is mapped read-only).
    ASSERT_GE(st.shared_bytes, snap.AliasedBytes())
        << Dump();
    ASSERT_LE(st.shared_bytes, snap.ReadOnlyDistinctBytes())
        << Dump();
    ASSERT_GE(st.prefix_hits, hits_)
        << Dump();
    ASSERT_GE(st.prefix_evictions, evictions_)
        << Dump();
    // The model learns of an eviction when a call returns NotFound.
    ASSERT_EQ(st.cached_prefixes + (st.prefix_evictions - evictions_),
              static_cast<std::int64_t>(prefixes_.size()))
        << "cached prefixes against the model"
        << Dump();
    ASSERT_GE(c.reservations, 1)
        << Dump();
    ASSERT_LE(c.reservations, 2);  // The slots', the prefixes' tails.
  }


  // Checks every cached prefix the model knows by mapping it into a new
  // slot (when one is free and the budget allows), then frees that slot.
  std::int64_t hits_ = 0;

 private:
  Config cfg_;
  std::mt19937_64 rng_;
  std::shared_ptr<Backend> inner_;
  std::shared_ptr<FaultInjectionBackend> fault_;
  KVCacheOptions opts_;
  std::unique_ptr<KVCache> cache_;
  std::vector<ModelSlot> model_;
  std::map<std::uint64_t, ModelPrefix> prefixes_;
  std::vector<std::string> tag_what_;
  std::int64_t evictions_ = 0;  // Evictions the model has noticed.
  std::int64_t tolerated_lost_bytes_ = 0;

};
}  // namespace vattn::testing::prefix

#endif  // VATTN_TESTS_SUPPORT_PREFIX_HARNESS_H_
