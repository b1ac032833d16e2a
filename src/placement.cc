// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/placement.h"

#include <algorithm>
#include <atomic>
#include <iterator>
#include <limits>

namespace vattn {

std::vector<std::int64_t> AcquisitionOrder::WithoutReclaim() const {
  if (preferred == minimum) return {minimum};
  return {preferred, minimum};
}

std::int64_t ReuseWasteLimit(std::int64_t want, std::int64_t max_extent,
                             std::int64_t granule, bool memory_short) {
  if (!memory_short) return std::max(max_extent, want);
  return std::max(granule, std::min(max_extent, want / 4));
}

std::uint64_t Placement::NextIdleSeq() {
  static std::atomic<std::uint64_t> seq{0};
  return seq.fetch_add(1, std::memory_order_relaxed) + 1;
}

Placement::Placement(int max_slots)
    : slots_(static_cast<std::size_t>(max_slots)) {
  for (int i = 0; i < max_slots; ++i) Index(i);
}

void Placement::Unindex(int slot) {
  const Entry& e = At(slot);
  const std::int64_t held = e.mapped_bytes();
  if (!e.active) {
    if (!e.ends.empty()) {
      --idle_with_memory_;
      idle_bytes_ -= held;
    }
    if (e.op == SlotOp::kNone) {
      placeable_.erase({held, slot});
      if (!e.ends.empty()) {
        lru_.erase({e.idle_seq, slot});
        by_last_.erase({LastBytes(e), e.idle_seq, slot});
      }
    } else {
      --idle_busy_;
      if (!e.ends.empty() && e.op != SlotOp::kMapping) --idle_freeing_;
    }
  } else if (e.surplus_bytes > 0) {
    surplus_total_ -= e.surplus_bytes;
    if (e.op == SlotOp::kNone) surplus_.erase({-e.surplus_bytes, slot});
  }
}

void Placement::Index(int slot) {
  Entry& e = At(slot);
  const std::int64_t held = e.mapped_bytes();
  // Only an active slot has surplus: an idle one's extents all back it.
  e.surplus_bytes = 0;
  if (e.active) {
    const int backing = std::clamp(e.backing_extents, 0,
                                   static_cast<int>(e.ends.size()));
    e.surplus_bytes =
        held - (backing == 0 ? 0 : e.ends[static_cast<std::size_t>(backing - 1)]);
  }
  if (!e.active) {
    if (!e.ends.empty()) {
      ++idle_with_memory_;
      idle_bytes_ += held;
    }
    if (e.op == SlotOp::kNone) {
      placeable_.insert({held, slot});
      if (!e.ends.empty()) {
        lru_.insert({e.idle_seq, slot});
        by_last_.insert({LastBytes(e), e.idle_seq, slot});
      }
    } else {
      ++idle_busy_;
      if (!e.ends.empty() && e.op != SlotOp::kMapping) ++idle_freeing_;
    }
  } else if (e.surplus_bytes > 0) {
    surplus_total_ += e.surplus_bytes;
    if (e.op == SlotOp::kNone) surplus_.insert({-e.surplus_bytes, slot});
  }
}

void Placement::OnSlotActive(int slot) {
  Unindex(slot);
  At(slot).active = true;
  Index(slot);
}

void Placement::OnSlotIdle(int slot) {
  Unindex(slot);
  Entry& e = At(slot);
  e.active = false;
  e.idle_seq = NextIdleSeq();
  Index(slot);
}

void Placement::OnSlotOp(int slot, SlotOp op) {
  if (At(slot).op == op) return;
  Unindex(slot);
  At(slot).op = op;
  Index(slot);
}

void Placement::OnExtentsChanged(int slot, absl::Span<const Extent> extents,
                                 int backing_extents) {
  Unindex(slot);
  Entry& e = At(slot);
  // Extents change only at the end: keep the common prefix (checked by its
  // last end; a mismatch there means a rebuild), then append the rest.
  std::size_t keep = std::min(e.ends.size(), extents.size());
  if (keep > 0) {
    const Extent& last = extents[keep - 1];
    if (last.offset + last.bytes != e.ends[keep - 1]) keep = 0;
  }
  e.ends.resize(keep);
  for (std::size_t i = keep; i < extents.size(); ++i) {
    e.ends.push_back(extents[i].offset + extents[i].bytes);
  }
  e.backing_extents = backing_extents;
  Index(slot);
}

std::int64_t Placement::CoverWaste(const Entry& e, std::int64_t want) const {
  auto it = std::lower_bound(e.ends.begin(), e.ends.end(), want);
  return it == e.ends.end() ? 0 : *it - want;
}

int Placement::ChooseSlotFor(std::int64_t want_bytes, std::int64_t waste_limit,
                             bool* wait) const {
  *wait = false;
  if (placeable_.empty()) {
    *wait = idle_busy_ > 0;
    return -1;
  }
  // Slots holding at least the hint, least first: the one whose covering
  // extent wastes least, within the limit (0 is as good as it gets).
  int over = -1;
  std::int64_t over_waste = std::numeric_limits<std::int64_t>::max();
  int probes = 0;
  for (auto it = placeable_.lower_bound({want_bytes, -1});
       it != placeable_.end() && probes <= kMaxProbes; ++it, ++probes) {
    const std::int64_t waste = CoverWaste(At(it->second), want_bytes);
    if (waste < over_waste) {  // Ties: the first, which holds least.
      over = it->second;
      over_waste = waste;
    }
    if (waste == 0) break;
  }
  if (over >= 0 && over_waste <= waste_limit) return over;
  // The slot holding most below the hint (the lowest index among equals).
  auto below = placeable_.lower_bound({want_bytes, -1});
  if (below != placeable_.begin()) {
    const std::int64_t held = std::prev(below)->first;
    return placeable_.lower_bound({held, -1})->second;
  }
  return over;
}

int Placement::ChooseVictim(absl::FunctionRef<bool(int)> fences_done,
                            bool* wait, std::int64_t need) const {
  *wait = false;
  int probes = 0;
  if (need > 0) {
    // The smallest last extent that covers the need: one unmap frees it.
    for (auto it = by_last_.lower_bound({need, 0, -1});
         it != by_last_.end() && probes <= kMaxProbes; ++it, ++probes) {
      if (fences_done(it->slot)) return it->slot;
    }
    // None does: the largest, so that the fewest unmaps add up to it.
    probes = 0;
    for (auto it = by_last_.rbegin();
         it != by_last_.rend() && probes <= kMaxProbes; ++it, ++probes) {
      if (fences_done(it->slot)) return it->slot;
    }
    probes = 0;
  }
  for (auto it = lru_.begin(); it != lru_.end() && probes <= kMaxProbes;
       ++it, ++probes) {
    if (fences_done(it->second)) return it->second;
  }
  probes = 0;
  for (auto it = surplus_.begin(); it != surplus_.end() && probes <= kMaxProbes;
       ++it, ++probes) {
    if (fences_done(it->second)) return it->second;
  }
  if (!lru_.empty()) return lru_.begin()->second;
  if (!surplus_.empty()) return surplus_.begin()->second;
  // Memory another thread is taking back (or zeroing) comes free soon; a
  // slot being mapped may itself be waiting for memory.
  *wait = idle_freeing_ > 0;
  return -1;
}

}  // namespace vattn
