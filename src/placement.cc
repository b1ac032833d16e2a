// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/placement.h"

#include <algorithm>

namespace vattn {

std::vector<std::int64_t> AcquisitionOrder::WithoutReclaim() const {
  if (preferred == minimum) return {minimum};
  return {preferred, minimum};
}

Placement::Placement(int max_slots)
    : slots_(static_cast<std::size_t>(max_slots)) {}

void Placement::OnSlotActive(int slot) {
  slots_[static_cast<std::size_t>(slot)].active = true;
}

void Placement::OnSlotIdle(int slot) {
  Entry& e = slots_[static_cast<std::size_t>(slot)];
  e.active = false;
  e.idle_seq = ++idle_seq_;
}

void Placement::OnSlotOp(int slot, SlotOp op) {
  slots_[static_cast<std::size_t>(slot)].op = op;
}

void Placement::OnExtentsChanged(int slot, absl::Span<const Extent> extents,
                                 int backing_extents) {
  Entry& e = slots_[static_cast<std::size_t>(slot)];
  e.extent_bytes.clear();
  e.mapped_bytes = 0;
  e.surplus_bytes = 0;
  for (std::size_t i = 0; i < extents.size(); ++i) {
    e.extent_bytes.push_back(extents[i].bytes);
    e.mapped_bytes += extents[i].bytes;
    if (static_cast<int>(i) >= backing_extents) {
      e.surplus_bytes += extents[i].bytes;
    }
  }
  e.backing_extents = backing_extents;
}

int Placement::ChooseSlotFor(std::int64_t want_bytes, std::int64_t waste_limit,
                             bool* wait) const {
  int best = -1;
  std::int64_t best_gain = 0;
  std::int64_t best_waste = 0;
  *wait = false;
  for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
    const Entry& e = slots_[static_cast<std::size_t>(i)];
    if (e.active) continue;
    if (e.op != SlotOp::kNone) {
      *wait = true;
      continue;
    }
    // The request adopts extents through the one that covers the hint.
    std::int64_t through = 0;
    for (std::int64_t bytes : e.extent_bytes) {
      if (through >= want_bytes) break;
      through += bytes;
    }
    const std::int64_t waste = through > want_bytes ? through - want_bytes : 0;
    const std::int64_t gain =
        waste > waste_limit ? -1 : std::min(through, want_bytes);
    if (best < 0 || gain > best_gain ||
        (gain == best_gain && waste < best_waste)) {
      best = i;
      best_gain = gain;
      best_waste = waste;
    }
  }
  if (best >= 0) *wait = false;
  return best;
}

int Placement::ChooseVictim(absl::FunctionRef<bool(int)> fences_done,
                            bool* wait) const {
  int idle_ready = -1;
  int idle_oldest = -1;
  int surplus_ready = -1;
  int surplus_any = -1;
  *wait = false;
  auto at = [this](int i) -> const Entry& {
    return slots_[static_cast<std::size_t>(i)];
  };
  for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
    const Entry& e = at(i);
    if (e.extent_bytes.empty()) continue;
    if (e.op != SlotOp::kNone) {
      // Memory another thread is taking back (or zeroing) comes free soon;
      // one mapping may itself be waiting for memory.
      *wait = *wait || (!e.active && e.op != SlotOp::kMapping);
      continue;
    }
    if (e.active && e.surplus_bytes == 0) continue;  // All of it backs.
    const bool ready = fences_done(i);
    if (!e.active) {
      if (idle_oldest < 0 || e.idle_seq < at(idle_oldest).idle_seq) {
        idle_oldest = i;
      }
      if (ready && (idle_ready < 0 || e.idle_seq < at(idle_ready).idle_seq)) {
        idle_ready = i;
      }
    } else {
      if (surplus_any < 0 || e.surplus_bytes > at(surplus_any).surplus_bytes) {
        surplus_any = i;
      }
      if (ready && (surplus_ready < 0 ||
                    e.surplus_bytes > at(surplus_ready).surplus_bytes)) {
        surplus_ready = i;
      }
    }
  }
  for (int victim : {idle_ready, surplus_ready, idle_oldest, surplus_any}) {
    if (victim >= 0) {
      *wait = false;
      return victim;
    }
  }
  return -1;
}

}  // namespace vattn
