// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// A cache whose memory_budget_bytes is 0 takes the backend's
// default_budget_bytes (the CUDA backend's free memory less its margin,
// issue 11 item 3), and the backend's physical memory only when the backend
// names no default. On the CPU, through a wrapper that states capabilities.

#include <cstddef>
#include <memory>
#include <utility>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/vattn.h"

namespace vattn {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

class StatedCapsBackend : public BackendWrapper {
 public:
  StatedCapsBackend(std::shared_ptr<Backend> inner, BackendCapabilities caps)
      : BackendWrapper(std::move(inner), std::move(caps)) {}
  ~StatedCapsBackend() override { ReleaseAllForShutdown(); }
};

KVCacheOptions SmallOptions() {
  KVCacheOptions o;
  o.num_layers = 2;
  o.num_kv_heads = 2;
  o.head_dim = 64;
  o.max_slots = 2;
  o.max_tokens = 256;
  return o;
}

TEST(KVCacheDefaultBudgetTest, ZeroBudgetTakesTheBackendsDefault) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> host, MakeHostBackend());
  BackendCapabilities caps = host->capabilities();
  caps.name = "stated(host)";
  caps.physical_memory_bytes = 64 * kMiB;
  caps.default_budget_bytes = 6 * kMiB;
  auto backend = std::make_shared<StatedCapsBackend>(host, caps);
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> cache,
                             KVCache::Create(SmallOptions(), backend));
  EXPECT_EQ(cache->Stats().budget_bytes, static_cast<std::int64_t>(6 * kMiB));
}

TEST(KVCacheDefaultBudgetTest, WithoutADefaultThePhysicalMemory) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> host, MakeHostBackend());
  BackendCapabilities caps = host->capabilities();
  caps.name = "stated(host)";
  caps.physical_memory_bytes = 64 * kMiB;
  caps.default_budget_bytes = 0;
  auto backend = std::make_shared<StatedCapsBackend>(host, caps);
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> cache,
                             KVCache::Create(SmallOptions(), backend));
  EXPECT_EQ(cache->Stats().budget_bytes, static_cast<std::int64_t>(64 * kMiB));
}

TEST(KVCacheDefaultBudgetTest, AnExplicitBudgetWins) {
  VATTN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<Backend> host, MakeHostBackend());
  BackendCapabilities caps = host->capabilities();
  caps.name = "stated(host)";
  caps.default_budget_bytes = 6 * kMiB;
  auto backend = std::make_shared<StatedCapsBackend>(host, caps);
  KVCacheOptions o = SmallOptions();
  o.memory_budget_bytes = 10 * kMiB;
  VATTN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KVCache> cache,
                             KVCache::Create(o, backend));
  EXPECT_EQ(cache->Stats().budget_bytes, static_cast<std::int64_t>(10 * kMiB));
}

}  // namespace
}  // namespace vattn
