// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Prefix sharing (issue 13) on the Host backend: KeepPrefix,
// AllocSlotWithPrefix, DropPrefix, Fork, the read-only mappings, budget
// accounting, reclamation and fault injection.

#include <cstdint>
#include <cstring>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn {
namespace {

constexpr std::size_t kGranule = std::size_t{64} << 10;

// 2 layers x 2 (K,V) x 2 heads x 64 dims x 2 bytes = 1 KiB per token: 64
// tokens per 64 KiB granule.
KVCacheOptions SmallOptions() {
  KVCacheOptions o;
  o.num_layers = 2;
  o.num_kv_heads = 2;
  o.head_dim = 64;
  o.dtype = DType::kFloat16;
  o.max_slots = 8;
  o.max_tokens = 1024;
  o.max_extent_tokens = 64;
  o.memory_budget_bytes = 64 * kGranule;
  o.max_prefixes = 4;
  return o;
}

std::shared_ptr<Backend> Host() {
  HostBackendOptions h;
  h.granularity = kGranule;
  h.physical_limit_bytes = std::size_t{256} << 20;
  auto b = MakeHostBackend(h);
  EXPECT_TRUE(b.ok()) << b.status();
  return *b;
}

// Token-major: a slot's tokens [t0, t1) are one contiguous range of
// bytes_per_token each, starting at K(0)'s element (slot, t0, 0, 0).
DevicePtr TokenAddress(const KVCache& cache, int slot, std::int64_t t) {
  return cache.K(0).ElementAddress(slot, t, 0, 0);
}

std::uint8_t Pattern(std::uint32_t tag, std::int64_t t, std::size_t i) {
  return static_cast<std::uint8_t>(tag * 131 + t * 7 + i * 13);
}

absl::Status Write(KVCache& cache, int slot, std::int64_t t0, std::int64_t t1,
                   std::uint32_t tag) {
  const auto bpt = static_cast<std::size_t>(cache.bytes_per_token());
  std::vector<std::uint8_t> buf(bpt * static_cast<std::size_t>(t1 - t0));
  for (std::int64_t t = t0; t < t1; ++t) {
    for (std::size_t i = 0; i < bpt; ++i) {
      buf[static_cast<std::size_t>(t - t0) * bpt + i] = Pattern(tag, t, i);
    }
  }
  return cache.backend()->CopyToDevice(TokenAddress(cache, slot, t0),
                                       buf.data(), buf.size());
}

// True when tokens [t0, t1) of the slot hold `tag`'s pattern.
bool Holds(const KVCache& cache, int slot, std::int64_t t0, std::int64_t t1,
           std::uint32_t tag) {
  const auto bpt = static_cast<std::size_t>(cache.bytes_per_token());
  std::vector<std::uint8_t> buf(bpt * static_cast<std::size_t>(t1 - t0));
  if (!cache.backend()
           ->CopyFromDevice(buf.data(), TokenAddress(cache, slot, t0),
                            buf.size())
           .ok()) {
    return false;
  }
  for (std::int64_t t = t0; t < t1; ++t) {
    for (std::size_t i = 0; i < bpt; ++i) {
      if (buf[static_cast<std::size_t>(t - t0) * bpt + i] != Pattern(tag, t, i)) {
        ADD_FAILURE() << "slot " << slot << " token " << t << " byte " << i
                      << " does not hold tag " << tag;
        return false;
      }
    }
  }
  return true;
}

// A request of `tokens` tokens written with `tag`, its first extent ending
// at `split` tokens (0: none).
int Prefill(KVCache& cache, std::int64_t tokens, std::uint32_t tag,
            std::int64_t split = 0) {
  absl::StatusOr<int> slot = cache.AllocSlot(0, split);
  EXPECT_TRUE(slot.ok()) << slot.status();
  EXPECT_TRUE(cache.Grow(*slot, tokens).ok());
  EXPECT_TRUE(Write(cache, *slot, 0, tokens, tag).ok());
  return *slot;
}

TEST(PrefixSharingTest, SharersReadThePrefixAndPhysicalGrowsByTheTailOnly) {
  auto backend = Host();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache,
                             KVCache::Create(SmallOptions(), backend));
  // 300 tokens, split at 256: one 4-granule extent, then the rest.
  const int owner = Prefill(*cache, 300, 1, /*split=*/256);
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo info, cache->GetSlot(owner));
  EXPECT_EQ(info.extents, 2);
  VATTN_ASSERT_OK(cache->KeepPrefix(owner, 300, 42));
  VATTN_ASSERT_OK_AND_ASSIGN(PrefixInfo prefix, cache->GetPrefix(42));
  EXPECT_EQ(prefix.whole_extents, 1);
  EXPECT_EQ(prefix.tail_bytes, static_cast<std::int64_t>(kGranule));

  const CacheStats before = cache->Stats();
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlotWithPrefix(42, 300));
  const CacheStats after_a = cache->Stats();
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache->AllocSlotWithPrefix(42, 300));
  const CacheStats after_b = cache->Stats();
  EXPECT_TRUE(Holds(*cache, a, 0, 300, 1));
  EXPECT_TRUE(Holds(*cache, b, 0, 300, 1));
  EXPECT_TRUE(Holds(*cache, owner, 0, 300, 1));
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo ai, cache->GetSlot(a));
  EXPECT_TRUE(ai.active);
  EXPECT_EQ(ai.length, 300);
  EXPECT_GE(ai.backed_tokens, 300);

  // Each sharer adds its tail extent only: one granule.
  EXPECT_EQ(after_a.physical_bytes - before.physical_bytes,
            static_cast<std::int64_t>(kGranule));
  EXPECT_EQ(after_b.physical_bytes - after_a.physical_bytes,
            static_cast<std::int64_t>(kGranule));
  // Driver calls per shared request: one map of the shared extent, one of
  // the tail, one copy (the issue's <= 3).
  EXPECT_EQ(after_b.map_calls - after_a.map_calls, 2);
  EXPECT_EQ(after_b.copy_calls - after_a.copy_calls, 1);
  EXPECT_EQ(after_b.set_access_calls, after_a.set_access_calls);
  EXPECT_EQ(after_b.prefix_hits, 2);
  // 44 tokens of tail copied per sharer (and once by KeepPrefix).
  EXPECT_EQ(after_b.cow_copied_bytes, 3 * 44 * cache->bytes_per_token());
  // The 4-granule extent is mapped three times and counted once.
  EXPECT_EQ(after_b.shared_bytes, static_cast<std::int64_t>(4 * kGranule));
  EXPECT_EQ(after_b.shared_saved_bytes,
            static_cast<std::int64_t>(2 * 4 * kGranule));
  EXPECT_EQ(after_b.cached_prefixes, 1);
  EXPECT_EQ(after_b.cached_prefix_bytes,
            static_cast<std::int64_t>(5 * kGranule));
  EXPECT_EQ(after_b.physical_bytes,
            static_cast<std::int64_t>(backend->counters().physical_bytes));
}

TEST(PrefixSharingTest, WithoutTheSplitThePrefixIsCopied) {
  auto backend = Host();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache,
                             KVCache::Create(SmallOptions(), backend));
  const int owner = Prefill(*cache, 300, 3);  // One 5-granule extent.
  VATTN_ASSERT_OK(cache->KeepPrefix(owner, 300, 7));
  VATTN_ASSERT_OK_AND_ASSIGN(PrefixInfo prefix, cache->GetPrefix(7));
  EXPECT_EQ(prefix.whole_extents, 0);
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlotWithPrefix(7, 300));
  EXPECT_TRUE(Holds(*cache, a, 0, 300, 3));
  EXPECT_EQ(cache->Stats().shared_bytes, 0);
}

TEST(PrefixSharingTest, SharedTokensAreReadOnlyForEverySlotThatMapsThem) {
  auto backend = Host();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache,
                             KVCache::Create(SmallOptions(), backend));
  const int owner = Prefill(*cache, 300, 1, 256);
  VATTN_ASSERT_OK(cache->KeepPrefix(owner, 300, 1));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlotWithPrefix(1, 300));
  for (int slot : {owner, a}) {
    VATTN_EXPECT_CODE(Write(*cache, slot, 10, 11, 9),
                      absl::StatusCode::kPermissionDenied);
    VATTN_EXPECT_CODE(
        backend->Zero(TokenAddress(*cache, slot, 0), kGranule),
        absl::StatusCode::kPermissionDenied);
  }
  // The tail is the slot's own: writable, and private to it.
  VATTN_EXPECT_OK(Write(*cache, a, 256, 300, 5));
  EXPECT_TRUE(Holds(*cache, a, 256, 300, 5));
  EXPECT_TRUE(Holds(*cache, owner, 256, 300, 1));
  // Growing and writing past the prefix works as before.
  VATTN_ASSERT_OK(cache->Grow(a, 400));
  VATTN_EXPECT_OK(Write(*cache, a, 300, 400, 6));
  EXPECT_TRUE(Holds(*cache, a, 0, 256, 1));
}

TEST(PrefixSharingTest, FreeingTheOwnerFirstKeepsTheSharersIntact) {
  auto backend = Host();
  KVCacheOptions o = SmallOptions();
  o.defer_reclaim = false;  // Free unmaps at once.
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, backend));
  const int owner = Prefill(*cache, 300, 2, 256);
  VATTN_ASSERT_OK(cache->KeepPrefix(owner, 300, 5));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlotWithPrefix(5, 300));
  VATTN_ASSERT_OK(cache->Free(owner));
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo oi, cache->GetSlot(owner));
  EXPECT_EQ(oi.mapped_bytes, 0);
  EXPECT_TRUE(Holds(*cache, a, 0, 300, 2));
  // The prefix survives its owner too.
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache->AllocSlotWithPrefix(5, 300));
  EXPECT_TRUE(Holds(*cache, b, 0, 300, 2));
  VATTN_ASSERT_OK(cache->Free(a));
  VATTN_ASSERT_OK(cache->Free(b));
  VATTN_ASSERT_OK(cache->DropPrefix(5));
  const CacheStats st = cache->Stats();
  EXPECT_EQ(st.mapped_bytes, 0);
  EXPECT_EQ(st.shared_bytes, 0);
  EXPECT_EQ(st.cached_prefix_bytes, 0);
  EXPECT_EQ(st.physical_bytes, st.pooled_bytes);  // Everything is pooled.
}

TEST(PrefixSharingTest, ShorterSharesAndLongerRequests) {
  auto backend = Host();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache,
                             KVCache::Create(SmallOptions(), backend));
  const int owner = Prefill(*cache, 300, 4, 256);
  VATTN_ASSERT_OK(cache->KeepPrefix(owner, 300, 9));
  VATTN_ASSERT_OK(cache->Free(owner));
  // Shares 100 tokens: the cut falls inside the shared extent, whose tokens
  // are copied from a temporary mapping.
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlotWithPrefix(9, 100));
  EXPECT_TRUE(Holds(*cache, a, 0, 100, 4));
  VATTN_EXPECT_OK(Write(*cache, a, 100, 101, 8));  // Its own memory.
  // Asks for more than the prefix: the rest is backed, the prefix shared.
  VATTN_ASSERT_OK_AND_ASSIGN(int b, cache->AllocSlotWithPrefix(9, 500, 600));
  EXPECT_TRUE(Holds(*cache, b, 0, 300, 4));
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo bi, cache->GetSlot(b));
  EXPECT_EQ(bi.length, 500);
  EXPECT_GE(bi.backed_tokens, 600);
  VATTN_EXPECT_OK(Write(*cache, b, 300, 600, 8));
}

TEST(PrefixSharingTest, ForkSharesEveryToken) {
  auto backend = Host();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache,
                             KVCache::Create(SmallOptions(), backend));
  VATTN_ASSERT_OK_AND_ASSIGN(int parent, cache->AllocSlot());
  // Decode-style growth: several extents.
  for (std::int64_t t = 50; t <= 400; t += 50) {
    VATTN_ASSERT_OK(cache->Grow(parent, t));
  }
  VATTN_ASSERT_OK(Write(*cache, parent, 0, 400, 11));
  const CacheStats before = cache->Stats();
  VATTN_ASSERT_OK_AND_ASSIGN(int child, cache->Fork(parent));
  const CacheStats after = cache->Stats();
  VATTN_ASSERT_OK_AND_ASSIGN(SlotInfo ci, cache->GetSlot(child));
  EXPECT_EQ(ci.length, 400);
  EXPECT_TRUE(Holds(*cache, child, 0, 400, 11));
  EXPECT_EQ(after.forks, 1);
  EXPECT_GT(after.shared_bytes, 0);
  // Sharing costs less than a copy of the parent.
  EXPECT_LT(after.physical_bytes - before.physical_bytes,
            400 * cache->bytes_per_token());
  // Both grow independently past the fork.
  VATTN_ASSERT_OK(cache->Grow(parent, 500));
  VATTN_ASSERT_OK(cache->Grow(child, 500));
  VATTN_ASSERT_OK(Write(*cache, parent, 400, 500, 12));
  VATTN_ASSERT_OK(Write(*cache, child, 400, 500, 13));
  EXPECT_TRUE(Holds(*cache, parent, 400, 500, 12));
  EXPECT_TRUE(Holds(*cache, child, 400, 500, 13));
  EXPECT_TRUE(Holds(*cache, child, 0, 400, 11));
}

TEST(PrefixSharingTest, DropPrefixInUseKeepsTheSharers) {
  auto backend = Host();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache,
                             KVCache::Create(SmallOptions(), backend));
  const int owner = Prefill(*cache, 300, 6, 256);
  VATTN_ASSERT_OK(cache->KeepPrefix(owner, 300, 3));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlotWithPrefix(3, 300));
  VATTN_ASSERT_OK(cache->DropPrefix(3));
  VATTN_EXPECT_CODE(cache->AllocSlotWithPrefix(3, 300),
                    absl::StatusCode::kNotFound);
  VATTN_EXPECT_CODE(cache->DropPrefix(3), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Holds(*cache, a, 0, 300, 6));
  VATTN_ASSERT_OK(cache->Free(owner));
  EXPECT_TRUE(Holds(*cache, a, 0, 300, 6));
  // The owner's slot, reused by a plain request, is writable everywhere.
  VATTN_ASSERT_OK_AND_ASSIGN(int c, cache->AllocSlot(300));
  VATTN_ASSERT_OK(cache->Grow(c, 300));
  VATTN_EXPECT_OK(Write(*cache, c, 0, 300, 7));
  EXPECT_TRUE(Holds(*cache, a, 0, 300, 6));
}

TEST(PrefixSharingTest, Errors) {
  auto backend = Host();
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache,
                             KVCache::Create(SmallOptions(), backend));
  const int owner = Prefill(*cache, 100, 1);
  VATTN_EXPECT_CODE(cache->KeepPrefix(owner, 0, 1),
                    absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(cache->KeepPrefix(owner, 101, 1),
                    absl::StatusCode::kOutOfRange);
  VATTN_EXPECT_CODE(cache->KeepPrefix(99, 10, 1),
                    absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(cache->KeepPrefix(owner + 1, 10, 1),
                    absl::StatusCode::kFailedPrecondition);
  VATTN_ASSERT_OK(cache->KeepPrefix(owner, 100, 1));
  VATTN_EXPECT_CODE(cache->KeepPrefix(owner, 50, 1),
                    absl::StatusCode::kAlreadyExists);
  VATTN_EXPECT_CODE(cache->AllocSlotWithPrefix(2, 10),
                    absl::StatusCode::kNotFound);
  VATTN_EXPECT_CODE(cache->AllocSlotWithPrefix(1, 0),
                    absl::StatusCode::kInvalidArgument);
  VATTN_EXPECT_CODE(cache->AllocSlotWithPrefix(1, 2000),
                    absl::StatusCode::kOutOfRange);
  VATTN_EXPECT_CODE(cache->Fork(owner + 1),
                    absl::StatusCode::kFailedPrecondition);
  VATTN_EXPECT_CODE(cache->GetPrefix(2), absl::StatusCode::kNotFound);
  VATTN_EXPECT_CODE(cache->AllocSlot(0, -1),
                    absl::StatusCode::kInvalidArgument);
  // max_prefixes (4): the least recently used unused prefix makes room.
  for (std::uint64_t id = 2; id <= 5; ++id) {
    VATTN_ASSERT_OK(cache->KeepPrefix(owner, 50, id));
  }
  EXPECT_EQ(cache->Stats().cached_prefixes, 4);
  VATTN_EXPECT_CODE(cache->GetPrefix(1), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache->Stats().prefix_evictions, 1);
}

TEST(PrefixSharingTest, PressureEvictsUnusedPrefixesNeverMemoryInUse) {
  auto backend = Host();
  KVCacheOptions o = SmallOptions();
  o.memory_budget_bytes = 16 * kGranule;
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, backend));
  // Prefix 1 (in use by `a`) and prefix 2 (unused): 5 + 5 granules kept.
  const int o1 = Prefill(*cache, 300, 1, 256);
  VATTN_ASSERT_OK(cache->KeepPrefix(o1, 300, 1));
  VATTN_ASSERT_OK_AND_ASSIGN(int a, cache->AllocSlotWithPrefix(1, 300));
  VATTN_ASSERT_OK(cache->Free(o1, kNoFence));
  const int o2 = Prefill(*cache, 300, 2, 256);
  VATTN_ASSERT_OK(cache->KeepPrefix(o2, 300, 2));
  VATTN_ASSERT_OK(cache->Free(o2, kNoFence));
  // A request that needs nearly everything left.
  VATTN_ASSERT_OK_AND_ASSIGN(int big, cache->AllocSlot());
  VATTN_ASSERT_OK(cache->Grow(big, 640));  // 10 granules.
  const CacheStats st = cache->Stats();
  EXPECT_LE(st.physical_bytes, st.budget_bytes);
  EXPECT_GE(st.prefix_evictions, 1);
  VATTN_EXPECT_CODE(cache->GetPrefix(2), absl::StatusCode::kNotFound);
  // In use: kept, and its sharer intact.
  VATTN_ASSERT_OK(cache->GetPrefix(1).status());
  EXPECT_TRUE(Holds(*cache, a, 0, 300, 1));
  // More than what is left: refused, memory in use untouched.
  VATTN_ASSERT_OK_AND_ASSIGN(int huge, cache->AllocSlot());
  VATTN_EXPECT_CODE(cache->Grow(huge, 1024),
                    absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(Holds(*cache, a, 0, 300, 1));
}

// Threads sharing, forking, stepping and freeing while another keeps and
// drops prefixes, with the map-ahead thread on and a tight budget (for
// ThreadSanitizer; the data checks hold whatever the interleaving).
TEST(PrefixSharingTest, ConcurrentSharingStaysConsistent) {
  auto backend = Host();
  KVCacheOptions o = SmallOptions();
  o.map_ahead_tokens = 32;
  o.memory_budget_bytes = 48 * kGranule;
  VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, backend));
  const int owner = Prefill(*cache, 200, 1, 128);
  VATTN_ASSERT_OK(cache->KeepPrefix(owner, 200, 1));
  std::atomic<bool> stop{false};
  std::thread keeper([&] {
    for (int i = 0; i < 200 && !stop.load(); ++i) {
      const std::uint64_t id = 100 + static_cast<std::uint64_t>(i % 3);
      (void)cache->KeepPrefix(owner, 64 + i % 100, id);
      (void)cache->DropPrefix(100 + static_cast<std::uint64_t>((i + 1) % 3));
    }
  });
  std::vector<std::thread> users;
  for (int t = 0; t < 2; ++t) {
    users.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) {
        absl::StatusOr<int> slot = cache->AllocSlotWithPrefix(1, 200);
        if (!slot.ok()) continue;
        EXPECT_TRUE(Holds(*cache, *slot, 0, 200, 1));
        StepRequest r{*slot, 201 + i % 50};
        if (cache->Step(absl::MakeConstSpan(&r, 1)).ok()) {
          EXPECT_TRUE(Write(*cache, *slot, 200, r.tokens, 2 + t).ok());
        }
        if (i % 4 == 0) {
          absl::StatusOr<int> child = cache->Fork(*slot);
          if (child.ok()) {
            EXPECT_TRUE(Holds(*cache, *child, 0, 200, 1));
            EXPECT_TRUE(cache->Free(*child).ok());
          }
        }
        EXPECT_TRUE(cache->Free(*slot).ok());
      }
    });
  }
  for (std::thread& u : users) u.join();
  stop = true;
  keeper.join();
  EXPECT_TRUE(Holds(*cache, owner, 0, 200, 1));
  const CacheStats st = cache->Stats();
  EXPECT_LE(st.physical_bytes, st.budget_bytes);
  VATTN_EXPECT_OK(cache->WaitForBackgroundIdle());
}

// Every backend call of KeepPrefix, AllocSlotWithPrefix, Fork and the
// release of a sharer, failed in turn: the call fails cleanly (books,
// budget, backend objects as before) or succeeds; nothing leaks.
TEST(PrefixSharingTest, FaultAtEveryCallIndexIsConsistentAndLeakFree) {
  auto host = Host();
  for (int op = 0; op < 4; ++op) {
    std::int64_t calls = 0;  // Backend calls the operation made.
    for (std::int64_t nth = 1;; ++nth) {
      SCOPED_TRACE(::testing::Message() << "op " << op << " call " << nth);
      VATTN_ASSERT_OK_AND_ASSIGN(auto fault,
                                 FaultInjectionBackend::Create(host));
      bool injected = false;
      {
        KVCacheOptions o = SmallOptions();
        // A sharer's Free unmaps at once (its shared extent drops one
        // reference, its tail goes to the pool).
        if (op == 3) o.defer_reclaim = false;
        VATTN_ASSERT_OK_AND_ASSIGN(auto cache, KVCache::Create(o, fault));
        const int owner = Prefill(*cache, 300, 1, 256);
        int sharer = -1;
        if (op >= 2) {
          VATTN_ASSERT_OK(cache->KeepPrefix(owner, 300, 1));
        }
        if (op == 3) {
          VATTN_ASSERT_OK_AND_ASSIGN(sharer, cache->AllocSlotWithPrefix(1, 300));
        }
        const CacheStats before = cache->Stats();
        const BackendCounters bc = fault->counters();
        fault->SetPlan(FaultPlan::FailNthAny(nth));
        absl::Status status;
        switch (op) {
          case 0:
            status = cache->KeepPrefix(owner, 300, 1);
            break;
          case 1:
            status = cache->Fork(owner).status();
            break;
          case 2:
            status = cache->AllocSlotWithPrefix(1, 300).status();
            break;
          case 3:
            status = cache->Free(sharer, kNoFence);
            break;
        }
        injected = fault->injected() > 0;
        fault->SetPlan({});
        // A Free whose unmap fails frees the slot all the same (its memory
        // is reclaimed later): only the leak checks below apply to it.
        if (!status.ok() && op != 3) {
          const CacheStats after = cache->Stats();
          // A handle created for the call may stay pooled (as after a
          // failed Grow): what is held outside the pool is unchanged.
          EXPECT_EQ(after.physical_bytes - after.pooled_bytes,
                    before.physical_bytes - before.pooled_bytes);
          EXPECT_EQ(after.mapped_bytes, before.mapped_bytes);
          EXPECT_EQ(after.active_slots, before.active_slots);
          EXPECT_EQ(after.cached_prefixes, before.cached_prefixes);
          EXPECT_EQ(after.shared_bytes, before.shared_bytes);
          EXPECT_EQ(fault->counters().mappings, bc.mappings);
          EXPECT_EQ(fault->counters().handles -
                        (after.pooled_bytes - before.pooled_bytes) /
                            static_cast<std::int64_t>(kGranule),
                    bc.handles);
        }
        // Whatever happened, the data reads back and the owner's own
        // memory past the prefix is writable.
        EXPECT_TRUE(Holds(*cache, owner, 0, 300, 1));
        if (sharer >= 0 && op != 3) {
          EXPECT_TRUE(Holds(*cache, sharer, 0, 300, 1));
        }
        VATTN_EXPECT_OK(Write(*cache, owner, 299, 300, 1));
        // Retrying succeeds.
        if (!status.ok() && op == 0) {
          VATTN_EXPECT_OK(cache->KeepPrefix(owner, 300, 1));
        }
      }
      EXPECT_TRUE(fault->counters().Empty());
      if (!injected) break;  // Past the last call: every index was tried.
      calls = nth;
      ASSERT_LT(nth, 64) << "the sweep does not end";
    }
    // Every operation makes backend calls to fail (SetAccess, maps, the
    // unmaps of the sharer's Free).
    EXPECT_GE(calls, 2) << "op " << op;
  }
  EXPECT_TRUE(host->counters().Empty());
}

}  // namespace
}  // namespace vattn
