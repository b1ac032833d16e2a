// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Placement on plain data: slots described by their state, operation in
// flight and extent sizes, no backend.

#include "src/placement.h"

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"
#include "vattn/backend.h"
#include "vattn/kv_cache.h"

namespace vattn {
namespace {

constexpr std::int64_t kG = 2 << 20;  // One granule.

std::vector<Extent> Extents(std::initializer_list<std::int64_t> granules) {
  std::vector<Extent> out;
  std::int64_t offset = 0;
  for (std::int64_t g : granules) {
    Extent e;
    e.offset = offset;
    e.bytes = g * kG;
    offset += e.bytes;
    out.push_back(e);
  }
  return out;
}

// A slot that held extents and was freed.
void Idle(Placement& p, int slot, std::initializer_list<std::int64_t> granules) {
  const std::vector<Extent> e = Extents(granules);
  p.OnSlotActive(slot);
  p.OnExtentsChanged(slot, e, static_cast<int>(e.size()));
  p.OnSlotIdle(slot);
}

bool AllDone(int) { return true; }

TEST(AcquisitionOrderTest, PreferredThenMinimumAndReclaimedSizesInBetween) {
  const AcquisitionOrder order{2 * kG, 8 * kG};
  EXPECT_EQ(order.WithoutReclaim(), (std::vector<std::int64_t>{8 * kG, 2 * kG}));
  EXPECT_EQ((AcquisitionOrder{kG, kG}.WithoutReclaim()),
            (std::vector<std::int64_t>{kG}));
  EXPECT_FALSE(order.TakeAsIs(kG));
  EXPECT_TRUE(order.TakeAsIs(2 * kG));
  EXPECT_TRUE(order.TakeAsIs(4 * kG));
  EXPECT_TRUE(order.TakeAsIs(8 * kG));
  EXPECT_FALSE(order.TakeAsIs(16 * kG));
}

TEST(PlacementTest, ANewRequestTakesTheIdleSlotThatMapsMostOfItsHint) {
  Placement p(4);
  Idle(p, 0, {1});
  Idle(p, 1, {4});
  Idle(p, 2, {2});
  // slot 3: fresh, maps nothing.
  bool wait = true;
  EXPECT_EQ(p.ChooseSlotFor(2 * kG, 8 * kG, &wait), 2);  // Exact fit.
  EXPECT_FALSE(wait);
  EXPECT_EQ(p.ChooseSlotFor(4 * kG, 8 * kG, &wait), 1);
  // A hint of one granule: slot 0 fits exactly, slots 1 and 2 waste more.
  EXPECT_EQ(p.ChooseSlotFor(kG, 8 * kG, &wait), 0);
}

TEST(PlacementTest, SlotsWastingMoreThanTheLimitAreAvoided) {
  Placement p(2);
  Idle(p, 0, {64});  // One huge first extent.
  // slot 1 fresh: a small request must not take 64 granules for 1.
  bool wait = false;
  EXPECT_EQ(p.ChooseSlotFor(kG, 8 * kG, &wait), 1);
  // With a limit that allows it, the slot that maps the hint wins.
  EXPECT_EQ(p.ChooseSlotFor(kG, 64 * kG, &wait), 0);
}

TEST(PlacementTest, ActiveAndBusySlotsAreNotPlacedAndBusyOnesAreWaitedFor) {
  Placement p(2);
  p.OnSlotActive(0);
  Idle(p, 1, {1});
  p.OnSlotOp(1, SlotOp::kUnmapping);
  bool wait = false;
  EXPECT_EQ(p.ChooseSlotFor(kG, 8 * kG, &wait), -1);
  EXPECT_TRUE(wait);
  p.OnSlotOp(1, SlotOp::kNone);
  EXPECT_EQ(p.ChooseSlotFor(kG, 8 * kG, &wait), 1);
  p.OnSlotActive(1);
  EXPECT_EQ(p.ChooseSlotFor(kG, 8 * kG, &wait), -1);
  EXPECT_FALSE(wait) << "every slot active: nothing to wait for";
}

TEST(PlacementTest, ReclamationTakesTheLeastRecentlyIdledSlotFirst) {
  Placement p(3);
  Idle(p, 2, {1});
  Idle(p, 0, {1});
  Idle(p, 1, {1});
  bool wait = true;
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait), 2);
  EXPECT_FALSE(wait);
  p.OnExtentsChanged(2, {}, 0);  // Its only extent went back.
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait), 0);
}

TEST(PlacementTest, ReclamationPrefersSlotsWhoseFencesCompleted) {
  Placement p(3);
  Idle(p, 0, {1});  // Oldest, but its GPU work still runs.
  Idle(p, 1, {1});
  bool wait = false;
  EXPECT_EQ(p.ChooseVictim([](int s) { return s != 0; }, &wait), 1);
  // Nothing else left: the fenced slot, which the cache must wait for.
  p.OnExtentsChanged(1, {}, 0);
  EXPECT_EQ(p.ChooseVictim([](int s) { return s != 0; }, &wait), 0);
}

TEST(PlacementTest, ActiveSlotsGiveOnlySurplusLargestFirstAfterIdleSlots) {
  Placement p(3);
  const std::vector<Extent> e = Extents({1, 1, 4});
  p.OnSlotActive(0);
  p.OnExtentsChanged(0, e, 3);  // Everything backs the request.
  p.OnSlotActive(1);
  p.OnExtentsChanged(1, e, 1);  // 5 granules of surplus.
  p.OnSlotActive(2);
  p.OnExtentsChanged(2, e, 2);  // 4 granules of surplus.
  bool wait = false;
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait), 1);
  Idle(p, 0, {1});  // An idle slot goes before any surplus.
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait), 0);
}

TEST(PlacementTest, AGrowThatMustTakeMemoryBackTakesTheLastExtentThatFitsIt) {
  Placement p(4);
  Idle(p, 0, {1});     // Least recently idled.
  Idle(p, 1, {2, 4});  // Last extent 4 granules.
  Idle(p, 2, {4});
  Idle(p, 3, {8});
  bool wait = true;
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait), 0) << "no size asked: LRU";
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait, 4 * kG), 1)
      << "two fit exactly: the least recently idled";
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait, 3 * kG), 1)
      << "the smallest that covers the need";
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait, 5 * kG), 3)
      << "only one covers it";
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait, 9 * kG), 3)
      << "none covers it: the largest";
  EXPECT_EQ(p.ChooseVictim([](int s) { return s != 1; }, &wait, 4 * kG), 2)
      << "fences pending on slot 1";
  EXPECT_EQ(p.ChooseVictim([](int s) { return s != 3; }, &wait, 9 * kG), 2)
      << "the largest has fences pending: the next largest, newest first";
  p.OnSlotOp(1, SlotOp::kUnmapping);  // Busy: not a candidate.
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait, 4 * kG), 2);
  p.OnSlotOp(1, SlotOp::kNone);
  p.OnExtentsChanged(1, Extents({2}), 1);  // Its 4 went back.
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait, 2 * kG), 1)
      << "indexed by its new last extent";
  p.OnSlotActive(3);  // Taken by a request: its extents back it.
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait, 9 * kG), 2)
      << "an active slot's backing extents are never taken";
}

TEST(PlacementTest, NoVictimWaitsOnlyForSlotsBeingUnmappedOrZeroed) {
  Placement p(2);
  Idle(p, 0, {1});
  p.OnSlotOp(0, SlotOp::kMapping);  // May itself wait for memory.
  bool wait = true;
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait), -1);
  EXPECT_FALSE(wait);
  p.OnSlotOp(0, SlotOp::kZeroing);
  EXPECT_EQ(p.ChooseVictim(AllDone, &wait), -1);
  EXPECT_TRUE(wait);
}

TEST(ReuseWasteLimitTest, GenerousWithMemoryToSpareTightWhenShort) {
  // Memory to spare: the hint's own size, or one decode extent.
  EXPECT_EQ(ReuseWasteLimit(96 * kG, 4 * kG, kG, false), 96 * kG);
  EXPECT_EQ(ReuseWasteLimit(kG, 4 * kG, kG, false), 4 * kG);
  // Short: a quarter of the hint, at most one decode extent, at least a
  // granule.
  EXPECT_EQ(ReuseWasteLimit(96 * kG, 4 * kG, kG, true), 4 * kG);
  EXPECT_EQ(ReuseWasteLimit(8 * kG, 4 * kG, kG, true), 2 * kG);
  EXPECT_EQ(ReuseWasteLimit(kG, 4 * kG, kG, true), kG);
}

TEST(PlacementTest, WhenShortASmallRequestTakesAFreshSlotNotALargeOne) {
  Placement p(2);
  Idle(p, 0, {96});  // A long request's prompt extent.
  bool wait = false;
  EXPECT_EQ(p.ChooseSlotFor(8 * kG, ReuseWasteLimit(8 * kG, 4 * kG, kG, false),
                            &wait),
            1)
      << "88 granules of waste exceed even the generous limit";
  EXPECT_EQ(p.ChooseSlotFor(64 * kG,
                            ReuseWasteLimit(64 * kG, 4 * kG, kG, false), &wait),
            0);
  EXPECT_EQ(p.ChooseSlotFor(64 * kG,
                            ReuseWasteLimit(64 * kG, 4 * kG, kG, true), &wait),
            1);
}

TEST(PlacementTest, TotalsFollowEveryChange) {
  Placement p(3);
  Idle(p, 0, {1, 2});
  Idle(p, 1, {4});
  EXPECT_EQ(p.idle_slots_with_memory(), 2);
  EXPECT_EQ(p.idle_bytes(), 7 * kG);
  EXPECT_EQ(p.surplus_bytes(), 0);
  p.OnSlotActive(0);
  p.OnExtentsChanged(0, Extents({1, 2}), 1);
  EXPECT_EQ(p.idle_slots_with_memory(), 1);
  EXPECT_EQ(p.idle_bytes(), 4 * kG);
  EXPECT_EQ(p.surplus_bytes(), 2 * kG);
  p.OnSlotOp(0, SlotOp::kUnmapping);  // Busy slots still count.
  p.OnExtentsChanged(0, Extents({1}), 1);
  p.OnSlotOp(0, SlotOp::kNone);
  EXPECT_EQ(p.surplus_bytes(), 0);
  p.OnExtentsChanged(1, {}, 0);
  EXPECT_EQ(p.idle_slots_with_memory(), 0);
  EXPECT_EQ(p.idle_bytes(), 0);
}

// The policy as a full scan over plain data (the implementation before the
// index): the index must decide exactly as it does while every kind of
// candidate fits within Placement::kMaxProbes.
class ScanModel {
 public:
  struct Slot {
    bool active = false;
    SlotOp op = SlotOp::kNone;
    std::uint64_t idle_seq = 0;
    int backing = 0;
    std::vector<std::int64_t> bytes;
    std::int64_t Surplus() const {
      std::int64_t s = 0;
      for (std::size_t i = static_cast<std::size_t>(backing); i < bytes.size();
           ++i) {
        s += bytes[i];
      }
      return active ? s : 0;
    }
  };
  explicit ScanModel(int n) : slots(static_cast<std::size_t>(n)) {}

  int ChooseSlotFor(std::int64_t want, std::int64_t limit, bool* wait) const {
    int best = -1;
    std::int64_t best_gain = 0, best_waste = 0, best_held = 0;
    *wait = false;
    for (int i = 0; i < static_cast<int>(slots.size()); ++i) {
      const Slot& e = slots[static_cast<std::size_t>(i)];
      if (e.active) continue;
      if (e.op != SlotOp::kNone) {
        *wait = true;
        continue;
      }
      std::int64_t through = 0;
      for (std::int64_t b : e.bytes) {
        if (through >= want) break;
        through += b;
      }
      const std::int64_t waste = through > want ? through - want : 0;
      const std::int64_t gain = waste > limit ? -1 : std::min(through, want);
      std::int64_t held = 0;
      for (std::int64_t b : e.bytes) held += b;
      if (best < 0 || gain > best_gain ||
          (gain == best_gain &&
           (waste < best_waste || (waste == best_waste && held < best_held)))) {
        best = i;
        best_gain = gain;
        best_waste = waste;
        best_held = held;
      }
    }
    if (best >= 0) *wait = false;
    return best;
  }

  int ChooseVictim(const std::vector<bool>& done, bool* wait,
                   std::int64_t need = 0) const {
    int idle_ready = -1, idle_oldest = -1, surplus_ready = -1, surplus_any = -1;
    *wait = false;
    auto at = [this](int i) -> const Slot& {
      return slots[static_cast<std::size_t>(i)];
    };
    if (need > 0) {
      // Idle, not busy, fences done: the smallest last extent >= need
      // (oldest first), else the largest (newest first).
      int covering = -1, largest = -1;
      for (int i = 0; i < static_cast<int>(slots.size()); ++i) {
        const Slot& e = at(i);
        if (e.bytes.empty() || e.active || e.op != SlotOp::kNone ||
            !done[static_cast<std::size_t>(i)]) {
          continue;
        }
        const std::int64_t last = e.bytes.back();
        if (last >= need) {
          if (covering < 0 || last < at(covering).bytes.back() ||
              (last == at(covering).bytes.back() &&
               e.idle_seq < at(covering).idle_seq)) {
            covering = i;
          }
        }
        if (largest < 0 || last > at(largest).bytes.back() ||
            (last == at(largest).bytes.back() &&
             e.idle_seq > at(largest).idle_seq)) {
          largest = i;
        }
      }
      if (covering >= 0) return covering;
      if (largest >= 0) return largest;
    }
    for (int i = 0; i < static_cast<int>(slots.size()); ++i) {
      const Slot& e = at(i);
      if (e.bytes.empty()) continue;
      if (e.op != SlotOp::kNone) {
        *wait = *wait || (!e.active && e.op != SlotOp::kMapping);
        continue;
      }
      if (e.active && e.Surplus() == 0) continue;
      const bool ready = done[static_cast<std::size_t>(i)];
      if (!e.active) {
        if (idle_oldest < 0 || e.idle_seq < at(idle_oldest).idle_seq) {
          idle_oldest = i;
        }
        if (ready && (idle_ready < 0 || e.idle_seq < at(idle_ready).idle_seq)) {
          idle_ready = i;
        }
      } else {
        if (surplus_any < 0 || e.Surplus() > at(surplus_any).Surplus()) {
          surplus_any = i;
        }
        if (ready &&
            (surplus_ready < 0 || e.Surplus() > at(surplus_ready).Surplus())) {
          surplus_ready = i;
        }
      }
    }
    for (int v : {idle_ready, surplus_ready, idle_oldest, surplus_any}) {
      if (v >= 0) {
        *wait = false;
        return v;
      }
    }
    return -1;
  }

  std::vector<Slot> slots;
  std::uint64_t seq = 0;
};

std::vector<Extent> ExtentsOfBytes(const std::vector<std::int64_t>& bytes) {
  std::vector<Extent> out;
  std::int64_t offset = 0;
  for (std::int64_t b : bytes) {
    Extent e;
    e.offset = offset;
    e.bytes = b;
    offset += b;
    out.push_back(e);
  }
  return out;
}

TEST(PlacementTest, IndexDecidesAsAFullScanOnRandomSequences) {
  constexpr int kSlots = Placement::kMaxProbes;  // Every candidate probed.
  const unsigned seed = 20261201;
  std::mt19937 rng(seed);
  auto pick = [&rng](int n) {
    return std::uniform_int_distribution<int>(0, n - 1)(rng);
  };
  Placement p(kSlots);
  ScanModel m(kSlots);
  for (int step = 0; step < 20000; ++step) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed << " step " << step);
    const int i = pick(kSlots);
    ScanModel::Slot& s = m.slots[static_cast<std::size_t>(i)];
    switch (pick(6)) {
      case 0:  // A request takes the slot (backing some prefix).
        if (s.active || s.op != SlotOp::kNone) break;
        s.active = true;
        p.OnSlotActive(i);
        s.backing = pick(static_cast<int>(s.bytes.size()) + 1);
        p.OnExtentsChanged(i, ExtentsOfBytes(s.bytes), s.backing);
        break;
      case 1:  // Freed.
        if (!s.active) break;
        s.active = false;
        s.idle_seq = ++m.seq;
        p.OnSlotIdle(i);
        s.backing = static_cast<int>(s.bytes.size());
        p.OnExtentsChanged(i, ExtentsOfBytes(s.bytes), s.backing);
        break;
      case 2: {  // An operation starts or ends.
        const SlotOp ops[] = {SlotOp::kNone, SlotOp::kNone, SlotOp::kMapping,
                              SlotOp::kUnmapping, SlotOp::kZeroing};
        s.op = ops[pick(5)];
        p.OnSlotOp(i, s.op);
        break;
      }
      case 3:  // An extent appended (backing when active).
        s.bytes.push_back((1 + pick(8)) * kG);
        if (s.active) {
          s.backing = static_cast<int>(s.bytes.size());
        } else {
          s.backing = static_cast<int>(s.bytes.size());
        }
        p.OnExtentsChanged(i, ExtentsOfBytes(s.bytes), s.backing);
        break;
      case 4:  // The last extent taken back.
        if (s.bytes.empty()) break;
        s.bytes.pop_back();
        s.backing = std::min(s.backing, static_cast<int>(s.bytes.size()));
        p.OnExtentsChanged(i, ExtentsOfBytes(s.bytes), s.backing);
        break;
      case 5:  // Surplus adopted.
        if (!s.active || s.backing >= static_cast<int>(s.bytes.size())) break;
        ++s.backing;
        p.OnExtentsChanged(i, ExtentsOfBytes(s.bytes), s.backing);
        break;
    }
    const std::int64_t want = (1 + pick(24)) * kG;
    const std::int64_t limit = pick(3) * 4 * kG;
    bool wait_p = false, wait_m = false;
    ASSERT_EQ(p.ChooseSlotFor(want, limit, &wait_p),
              m.ChooseSlotFor(want, limit, &wait_m))
        << "want " << want / kG << " limit " << limit / kG << [&m] {
             std::string out;
             for (const ScanModel::Slot& e : m.slots) {
               out += "\n active " + std::to_string(e.active) + " op " +
                      std::to_string(static_cast<int>(e.op)) + " backing " +
                      std::to_string(e.backing) + " :";
               for (std::int64_t b : e.bytes) out += " " + std::to_string(b / kG);
             }
             return out;
           }();
    ASSERT_EQ(wait_p, wait_m);
    std::vector<bool> done(static_cast<std::size_t>(kSlots));
    for (int k = 0; k < kSlots; ++k) {
      done[static_cast<std::size_t>(k)] = pick(3) != 0;
    }
    ASSERT_EQ(p.ChooseVictim([&done](int k) {
                return static_cast<bool>(done[static_cast<std::size_t>(k)]);
              },
                             &wait_p),
              m.ChooseVictim(done, &wait_m));
    ASSERT_EQ(wait_p, wait_m);
    const std::int64_t need = pick(2) == 0 ? 0 : (1 + pick(9)) * kG;
    ASSERT_EQ(p.ChooseVictim([&done](int k) {
                return static_cast<bool>(done[static_cast<std::size_t>(k)]);
              },
                             &wait_p, need),
              m.ChooseVictim(done, &wait_m, need))
        << "need " << need / kG;
    ASSERT_EQ(wait_p, wait_m);
    std::int64_t idle_bytes = 0, surplus = 0;
    int idle_with_memory = 0;
    for (const ScanModel::Slot& e : m.slots) {
      std::int64_t held = 0;
      for (std::int64_t b : e.bytes) held += b;
      if (!e.active && held > 0) {
        ++idle_with_memory;
        idle_bytes += held;
      }
      surplus += e.Surplus();
    }
    ASSERT_EQ(p.idle_slots_with_memory(), idle_with_memory);
    ASSERT_EQ(p.idle_bytes(), idle_bytes);
    ASSERT_EQ(p.surplus_bytes(), surplus);
  }
}

TEST(PlacementTest, BeyondTheProbesTheLeastHoldingCandidatesAreAsked) {
  // More slots than probes, all holding more than the hint with too much
  // waste in their first extents except the one that holds the most: the
  // index asks only the kMaxProbes + 1 least-holding ones, so it falls back
  // to a slot holding less than the hint (documented bound).
  const int n = Placement::kMaxProbes + 3;
  Placement p(n + 1);
  for (int i = 0; i < n - 1; ++i) Idle(p, i, {40 + i});
  Idle(p, n - 1, {10, 100});  // Reaches 10 granules: waste 0 for 10.
  Idle(p, n, {2});
  bool wait = false;
  EXPECT_EQ(p.ChooseSlotFor(10 * kG, 4 * kG, &wait), n);
  // Among few enough candidates the exact fit is found.
  Placement q(3);
  Idle(q, 0, {40});
  Idle(q, 1, {10, 100});
  Idle(q, 2, {2});
  EXPECT_EQ(q.ChooseSlotFor(10 * kG, 4 * kG, &wait), 1);
}

// Through the cache: a slot a long request left (one 12-granule extent) is
// offered to a request of 8 granules. With memory to spare it is reused (no
// driver call; the request will likely decode into the excess). When the
// budget cannot back the hint without taking memory back, 4 granules of
// excess would sit idle while others wait: the request takes a fresh slot,
// and its Grow takes the long request's memory back.
int PlaceAfterALongRequest(std::size_t budget_granules, CacheStats* calls) {
  auto host = MakeHostBackend();
  EXPECT_TRUE(host.ok());
  KVCacheOptions o;
  o.num_layers = 1;
  o.num_kv_heads = 8;
  o.head_dim = 128;  // 4 KiB per token: a 2 MiB granule holds 512 tokens.
  o.max_extent_bytes = 2 * kG;
  o.max_slots = 2;
  o.max_tokens = 64 * 512;
  o.memory_budget_bytes = budget_granules * kG;
  auto cache = KVCache::Create(o, *host);
  EXPECT_TRUE(cache.ok()) << cache.status();
  if (!cache.ok()) return -2;
  KVCache& c = **cache;
  auto a = c.AllocSlot(12 * 512);
  EXPECT_TRUE(a.ok());
  EXPECT_TRUE(c.Grow(*a, 12 * 512).ok());
  EXPECT_TRUE(c.Free(*a).ok());
  const CacheStats before = c.Stats();
  auto b = c.AllocSlot(8 * 512);
  EXPECT_TRUE(b.ok());
  EXPECT_TRUE(c.Grow(*b, 8 * 512).ok());
  const CacheStats after = c.Stats();
  calls->map_calls = after.map_calls - before.map_calls;
  calls->unmap_calls = after.unmap_calls - before.unmap_calls;
  return *b == *a ? 1 : 0;
}

TEST(KVCachePlacementTest, ReusesALargeSlotOnlyWithMemoryToSpare) {
  CacheStats calls;
  EXPECT_EQ(PlaceAfterALongRequest(64, &calls), 1);
  EXPECT_EQ(calls.map_calls, 0);
  EXPECT_EQ(PlaceAfterALongRequest(16, &calls), 0)
      << "memory is short: the 8-granule request must not take 12";
  EXPECT_EQ(calls.unmap_calls, 1) << "the long request's extent comes back";
  EXPECT_EQ(calls.map_calls, 1);
}

}  // namespace
}  // namespace vattn
