// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Placement on plain data: slots described by their state, operation in
// flight and extent sizes, no backend.

#include "src/placement.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

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

}  // namespace
}  // namespace vattn
