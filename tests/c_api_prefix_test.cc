// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The C API's prefix sharing (vattn/c_api.h, "Prefix sharing") on the Host
// backend: data written before sharing reads the same through every slot
// that shares it, physical bytes do not grow by the shared part, the stats
// and the prefix snapshot mirror the C++ ones, and the error paths (unknown
// and used ids, NULL arguments, struct_size) return their codes and leave
// outputs alone.

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "src/c_api_internal.h"  // The handle's C++ cache, to compare stats.
#include "vattn/c_api.h"
#include "vattn/kv_cache.h"
#include "vattn/options.h"
#include "vattn/stats.h"

namespace vattn {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string LastError() { return vattn_last_error(); }

// 4 layers x 4 heads x 64 dims, float32: 8 KiB a token, 256 tokens per
// 2 MiB granule.
constexpr std::int64_t kTokensPerGranule = 256;

vattn_cache_options Options() {
  vattn_cache_options o;
  vattn_cache_options_default(&o);
  o.num_layers = 4;
  o.num_kv_heads = 4;
  o.head_dim = 64;
  o.dtype = VATTN_DTYPE_FLOAT32;
  o.max_slots = 8;
  o.max_tokens = 4096;
  return o;
}

class CApiPrefixTest : public ::testing::Test {
 protected:
  void SetUp() override { Make(Options()); }
  void TearDown() override { vattn_cache_destroy(cache_); }

  void Make(const vattn_cache_options& o) {
    vattn_cache_destroy(cache_);
    cache_ = nullptr;
    vattn_backend* backend = nullptr;
    ASSERT_EQ(vattn_backend_host(&backend), VATTN_OK) << LastError();
    ASSERT_EQ(vattn_cache_create(&o, backend, &cache_), VATTN_OK) << LastError();
    vattn_backend_release(backend);
  }

  // The value of (slot's request id, layer, K or V, token, element).
  static float Value(int id, int layer, int kv, std::int64_t token, int e) {
    return static_cast<float>(id * 1000003 + layer * 7919 + kv * 104729) +
           static_cast<float>(token) * 0.5f + static_cast<float>(e) * 0.001f;
  }
  float* Element(const vattn_tensor_view& v, int slot, std::int64_t token, int h,
                 int d) {
    return static_cast<float*>(v.data) + slot * v.strides[0] +
           token * v.strides[1] + h * v.strides[2] + d * v.strides[3];
  }
  // Writes tokens [from, to) of every layer's K and V of `slot` with id's
  // values.
  void Write(int slot, int id, std::int64_t from, std::int64_t to) {
    for (int l = 0; l < 4; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        vattn_tensor_view v;
        ASSERT_EQ((kv == 0 ? vattn_cache_k : vattn_cache_v)(cache_, l, &v), VATTN_OK);
        for (std::int64_t t = from; t < to; ++t) {
          for (int h = 0; h < 4; ++h) {
            for (int d = 0; d < 64; d += 9) {
              *Element(v, slot, t, h, d) = Value(id, l, kv, t, h * 64 + d);
            }
          }
        }
      }
    }
  }
  // True when tokens [from, to) of `slot` hold id's values; reports the
  // first difference.
  ::testing::AssertionResult Holds(int slot, int id, std::int64_t from,
                                   std::int64_t to) {
    for (int l = 0; l < 4; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        vattn_tensor_view v;
        if ((kv == 0 ? vattn_cache_k : vattn_cache_v)(cache_, l, &v) != VATTN_OK) {
          return ::testing::AssertionFailure() << LastError();
        }
        for (std::int64_t t = from; t < to; ++t) {
          for (int h = 0; h < 4; ++h) {
            for (int d = 0; d < 64; d += 9) {
              const float want = Value(id, l, kv, t, h * 64 + d);
              const float got = *Element(v, slot, t, h, d);
              if (got != want) {
                return ::testing::AssertionFailure()
                       << "slot " << slot << " layer " << l << " kv " << kv
                       << " token " << t << " head " << h << " dim " << d
                       << ": " << got << " != " << want;
              }
            }
          }
        }
      }
    }
    return ::testing::AssertionSuccess();
  }
  vattn_cache_stats Stats() {
    vattn_cache_stats s;
    s.struct_size = sizeof(s);
    EXPECT_EQ(vattn_cache_get_stats(cache_, &s), VATTN_OK) << LastError();
    return s;
  }
  vattn_slot_info Slot(int slot) {
    vattn_slot_info i;
    i.struct_size = sizeof(i);
    EXPECT_EQ(vattn_cache_get_slot(cache_, slot, &i), VATTN_OK) << LastError();
    return i;
  }

  vattn_cache* cache_ = nullptr;
};

TEST_F(CApiPrefixTest, SharedPrefixReadsTheSameThroughEverySlot) {
  // The prompt's first 512 tokens (two granules) are the system prompt:
  // mapped as their own extent, kept, then shared whole.
  int owner = -1;
  ASSERT_EQ(vattn_cache_alloc_slot_split(cache_, 600, 512, &owner), VATTN_OK)
      << LastError();
  ASSERT_EQ(vattn_cache_grow(cache_, owner, 600), VATTN_OK) << LastError();
  Write(owner, /*id=*/1, 0, 600);
  ASSERT_EQ(vattn_cache_keep_prefix(cache_, owner, 512, 42, nullptr, 0), VATTN_OK)
      << LastError();
  const vattn_cache_stats before = Stats();

  std::vector<int> users;
  for (int i = 0; i < 3; ++i) {
    int user = -1;
    ASSERT_EQ(vattn_cache_alloc_slot_with_prefix(cache_, 42, 512 + 40, 0, nullptr, 0,
                                                 &user),
              VATTN_OK)
        << LastError();
    EXPECT_NE(user, owner);
    EXPECT_EQ(Slot(user).length, 552);
    EXPECT_GE(Slot(user).backed_tokens, 552);
    EXPECT_TRUE(Holds(user, 1, 0, 512));
    Write(user, /*id=*/10 + i, 512, 552);  // Its own message.
    users.push_back(user);
  }
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(Holds(users[static_cast<std::size_t>(i)], 1, 0, 512));
    EXPECT_TRUE(Holds(users[static_cast<std::size_t>(i)], 10 + i, 512, 552));
  }
  EXPECT_TRUE(Holds(owner, 1, 0, 600));

  // Physical memory grew by the users' own tokens only (one granule each),
  // never by the 512 shared tokens (two granules each).
  const vattn_cache_stats after = Stats();
  const std::int64_t granule = 2 << 20;
  EXPECT_LE(after.physical_bytes - before.physical_bytes, 3 * granule);
  EXPECT_EQ(after.prefix_hits - before.prefix_hits, 3);
  EXPECT_GE(after.shared_bytes, 2 * granule);
  EXPECT_GE(after.shared_saved_bytes, 3 * 2 * granule);
  EXPECT_EQ(after.cached_prefixes, 1);

  vattn_prefix_info info;
  info.struct_size = sizeof(info);
  ASSERT_EQ(vattn_cache_get_prefix(cache_, 42, &info), VATTN_OK) << LastError();
  EXPECT_EQ(info.tokens, 512);
  EXPECT_EQ(info.hits, 3);
  EXPECT_GE(info.whole_extents, 1);
  EXPECT_GE(info.users, 3);

  // Dropping the prefix keeps the users' memory; the id is gone.
  ASSERT_EQ(vattn_cache_drop_prefix(cache_, 42), VATTN_OK) << LastError();
  ASSERT_EQ(vattn_cache_free_no_fence(cache_, owner), VATTN_OK) << LastError();
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(Holds(users[static_cast<std::size_t>(i)], 1, 0, 512));
  }
  int slot = -7;
  EXPECT_EQ(vattn_cache_alloc_slot_with_prefix(cache_, 42, 10, 0, nullptr, 0, &slot),
            VATTN_NOT_FOUND);
  EXPECT_EQ(slot, -7);
  EXPECT_EQ(Stats().cached_prefixes, 0);
}

TEST_F(CApiPrefixTest, PartlySharedTailIsCopied) {
  // 300 tokens: one whole granule and a 44-token tail in the next extent.
  int owner = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 400, &owner), VATTN_OK) << LastError();
  ASSERT_EQ(vattn_cache_grow(cache_, owner, 400), VATTN_OK) << LastError();
  Write(owner, 2, 0, 400);
  ASSERT_EQ(vattn_cache_keep_prefix(cache_, owner, 300, 7, nullptr, 1), VATTN_OK)
      << LastError();
  int user = -1;
  ASSERT_EQ(vattn_cache_alloc_slot_with_prefix(cache_, 7, 300, 320, nullptr, 1, &user),
            VATTN_OK)
      << LastError();
  EXPECT_EQ(Slot(user).length, 300);
  EXPECT_GE(Slot(user).backed_tokens, 320);
  EXPECT_TRUE(Holds(user, 2, 0, 300));
  // The user writes after the prefix, in its own copy of the tail's extent:
  // the owner's tokens there stay as they were.
  Write(user, 3, 300, 320);
  EXPECT_TRUE(Holds(user, 3, 300, 320));
  EXPECT_TRUE(Holds(owner, 2, 0, 400));
  const vattn_cache_stats s = Stats();
  EXPECT_GE(s.cow_copied_bytes, (300 - kTokensPerGranule) * 8192);
  EXPECT_GE(s.copy_calls, 1);
}

TEST_F(CApiPrefixTest, ForkSharesEveryToken) {
  int parent = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 700, &parent), VATTN_OK) << LastError();
  ASSERT_EQ(vattn_cache_grow(cache_, parent, 700), VATTN_OK) << LastError();
  Write(parent, 4, 0, 700);
  int child = -1;
  ASSERT_EQ(vattn_cache_fork(cache_, parent, nullptr, 0, &child), VATTN_OK)
      << LastError();
  EXPECT_NE(child, parent);
  EXPECT_EQ(Slot(child).length, 700);
  EXPECT_TRUE(Holds(child, 4, 0, 700));
  // Both decode on independently.
  ASSERT_EQ(vattn_cache_grow(cache_, child, 701), VATTN_OK) << LastError();
  ASSERT_EQ(vattn_cache_grow(cache_, parent, 701), VATTN_OK) << LastError();
  Write(child, 5, 700, 701);
  Write(parent, 6, 700, 701);
  EXPECT_TRUE(Holds(child, 5, 700, 701));
  EXPECT_TRUE(Holds(parent, 6, 700, 701));
  EXPECT_TRUE(Holds(child, 4, 0, 700));
  EXPECT_EQ(Stats().forks, 1);
  // The parent may go first: the child keeps the shared memory.
  ASSERT_EQ(vattn_cache_free_no_fence(cache_, parent), VATTN_OK) << LastError();
  EXPECT_TRUE(Holds(child, 4, 0, 700));
}

TEST_F(CApiPrefixTest, StatsMirrorTheCppStats) {
  int owner = -1;
  ASSERT_EQ(vattn_cache_alloc_slot_split(cache_, 300, 256, &owner), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow_split(cache_, owner, 300, 256), VATTN_OK) << LastError();
  ASSERT_EQ(vattn_cache_keep_prefix(cache_, owner, 280, 1, nullptr, 0), VATTN_OK)
      << LastError();
  int a = -1, b = -1;
  ASSERT_EQ(vattn_cache_alloc_slot_with_prefix(cache_, 1, 290, 0, nullptr, 0, &a),
            VATTN_OK)
      << LastError();
  ASSERT_EQ(vattn_cache_fork(cache_, a, nullptr, 0, &b), VATTN_OK) << LastError();
  const vattn_cache_stats c = Stats();
  const CacheStats s = cache_->cache->Stats();
  EXPECT_EQ(c.shared_bytes, s.shared_bytes);
  EXPECT_EQ(c.shared_saved_bytes, s.shared_saved_bytes);
  EXPECT_EQ(c.cached_prefixes, s.cached_prefixes);
  EXPECT_EQ(c.cached_prefix_bytes, s.cached_prefix_bytes);
  EXPECT_EQ(c.prefix_hits, s.prefix_hits);
  EXPECT_EQ(c.forks, s.forks);
  EXPECT_EQ(c.prefix_evictions, s.prefix_evictions);
  EXPECT_EQ(c.cow_copied_bytes, s.cow_copied_bytes);
  EXPECT_EQ(c.copy_calls, s.copy_calls);
  EXPECT_EQ(c.set_access_calls, s.set_access_calls);
  EXPECT_EQ(c.prefix_hits, 1);
  EXPECT_EQ(c.forks, 1);
  EXPECT_GT(c.shared_bytes, 0);

  const PrefixInfo p = *cache_->cache->GetPrefix(1);
  vattn_prefix_info info;
  info.struct_size = sizeof(info);
  ASSERT_EQ(vattn_cache_get_prefix(cache_, 1, &info), VATTN_OK) << LastError();
  EXPECT_EQ(info.tokens, p.tokens);
  EXPECT_EQ(info.bytes, p.bytes);
  EXPECT_EQ(info.tail_bytes, p.tail_bytes);
  EXPECT_EQ(info.whole_extents, p.whole_extents);
  EXPECT_EQ(info.users, p.users);
  EXPECT_EQ(info.hits, p.hits);
}

TEST_F(CApiPrefixTest, ErrorsNameTheCodeAndLeaveOutputsAlone) {
  int owner = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 100, &owner), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(cache_, owner, 100), VATTN_OK);
  ASSERT_EQ(vattn_cache_keep_prefix(cache_, owner, 64, 5, nullptr, 0), VATTN_OK)
      << LastError();

  // A used id, an unknown one.
  EXPECT_EQ(vattn_cache_keep_prefix(cache_, owner, 32, 5, nullptr, 0),
            VATTN_ALREADY_EXISTS);
  EXPECT_THAT(LastError(), StartsWith("ALREADY_EXISTS: vattn_cache_keep_prefix: "));
  int slot = -7;
  EXPECT_EQ(vattn_cache_alloc_slot_with_prefix(cache_, 6, 10, 0, nullptr, 0, &slot),
            VATTN_NOT_FOUND);
  EXPECT_THAT(LastError(), StartsWith("NOT_FOUND: vattn_cache_alloc_slot_with_prefix: "));
  EXPECT_EQ(slot, -7);
  EXPECT_EQ(vattn_cache_drop_prefix(cache_, 6), VATTN_NOT_FOUND);
  EXPECT_THAT(LastError(), StartsWith("NOT_FOUND: vattn_cache_drop_prefix: "));
  vattn_prefix_info info;
  info.struct_size = sizeof(info);
  info.tokens = -3;
  EXPECT_EQ(vattn_cache_get_prefix(cache_, 6, &info), VATTN_NOT_FOUND);
  EXPECT_EQ(info.tokens, -3);

  // Bad slots and token counts.
  EXPECT_EQ(vattn_cache_keep_prefix(cache_, 99, 10, 8, nullptr, 0),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_keep_prefix(cache_, owner, 0, 8, nullptr, 0),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_keep_prefix(cache_, owner, 101, 8, nullptr, 0),
            VATTN_OUT_OF_RANGE);
  EXPECT_EQ(vattn_cache_alloc_slot_with_prefix(cache_, 5, 0, 0, nullptr, 0, &slot),
            VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_alloc_slot_with_prefix(cache_, 5, 5000, 0, nullptr, 0, &slot),
            VATTN_OUT_OF_RANGE);
  EXPECT_EQ(vattn_cache_fork(cache_, -1, nullptr, 0, &slot), VATTN_INVALID_ARGUMENT);
  int idle = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 0, &idle), VATTN_OK);
  ASSERT_EQ(vattn_cache_free_no_fence(cache_, idle), VATTN_OK);
  EXPECT_EQ(vattn_cache_fork(cache_, idle, nullptr, 0, &slot), VATTN_FAILED_PRECONDITION);
  EXPECT_EQ(vattn_cache_alloc_slot_split(cache_, 10, -1, &slot), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_grow_split(cache_, owner, 120, -1), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(slot, -7);

  // NULL arguments and struct sizes.
  EXPECT_EQ(vattn_cache_keep_prefix(nullptr, owner, 10, 8, nullptr, 0),
            VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), HasSubstr("cache is NULL"));
  EXPECT_EQ(vattn_cache_alloc_slot_with_prefix(cache_, 5, 10, 0, nullptr, 0, nullptr),
            VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), HasSubstr("slot is NULL"));
  EXPECT_EQ(vattn_cache_fork(cache_, owner, nullptr, 0, nullptr), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), HasSubstr("child is NULL"));
  EXPECT_EQ(vattn_cache_drop_prefix(nullptr, 5), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_alloc_slot_split(nullptr, 1, 0, &slot), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_grow_split(nullptr, 0, 1, 0), VATTN_INVALID_ARGUMENT);
  EXPECT_EQ(vattn_cache_get_prefix(cache_, 5, nullptr), VATTN_INVALID_ARGUMENT);
  info.struct_size = sizeof(info) - 8;
  EXPECT_EQ(vattn_cache_get_prefix(cache_, 5, &info), VATTN_INVALID_ARGUMENT);
  EXPECT_THAT(LastError(), HasSubstr("out->struct_size"));
  EXPECT_EQ(slot, -7);

  // Nothing above changed the prefix.
  info.struct_size = sizeof(info);
  ASSERT_EQ(vattn_cache_get_prefix(cache_, 5, &info), VATTN_OK) << LastError();
  EXPECT_EQ(info.tokens, 64);
  EXPECT_EQ(info.hits, 0);
}

TEST_F(CApiPrefixTest, MaxPrefixesIsMirroredAndZeroTurnsKeepingOff) {
  vattn_cache_options o = Options();
  EXPECT_EQ(o.max_prefixes, KVCacheOptions{}.max_prefixes);
  o.max_prefixes = 0;
  Make(o);
  ASSERT_NE(cache_, nullptr);
  EXPECT_EQ(cache_->cache->options().max_prefixes, 0);
  int owner = -1;
  ASSERT_EQ(vattn_cache_alloc_slot(cache_, 10, &owner), VATTN_OK);
  ASSERT_EQ(vattn_cache_grow(cache_, owner, 10), VATTN_OK);
  EXPECT_EQ(vattn_cache_keep_prefix(cache_, owner, 10, 1, nullptr, 0),
            VATTN_RESOURCE_EXHAUSTED);
  int child = -1;
  EXPECT_EQ(vattn_cache_fork(cache_, owner, nullptr, 0, &child), VATTN_OK) << LastError();
}

}  // namespace
}  // namespace vattn
