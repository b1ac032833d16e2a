// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Placement policy: which idle slot a new request takes, which slot gives up
// an extent when memory is short, and in which order handle sizes are tried.
// Pure policy on plain data: the cache tells it what changed, asks it what
// to do, and does it. No backend, no lock, no driver call.
#ifndef VATTN_SRC_PLACEMENT_H_
#define VATTN_SRC_PLACEMENT_H_

#include <cstdint>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/types/span.h"
#include "src/slot.h"

namespace vattn {

// Handle sizes per region to try for one extent, before and while taking
// memory from idle slots. `minimum` is what the call needs; `preferred` the
// growth extent (>= minimum).
struct AcquisitionOrder {
  std::int64_t minimum = 0;
  std::int64_t preferred = 0;
  // Without taking memory from anyone, try `preferred`, then `minimum`: a
  // larger extent is speculative and never evicts idle slots.
  std::vector<std::int64_t> WithoutReclaim() const;
  // A reclaimed extent of this size is mapped as it is (unmap + map, no
  // destroy and no create); otherwise the pool makes room for `minimum`.
  bool TakeAsIs(std::int64_t reclaimed) const {
    return reclaimed >= minimum && reclaimed <= preferred;
  }
};

// An index of the cache's slots for the two placement decisions. The cache
// calls the On* methods whenever a slot's state, operation in flight or
// extents change (under the cache lock, so calls are serialized), and the
// Choose* methods to decide. Not thread-safe: the caller serializes.
class Placement {
 public:
  explicit Placement(int max_slots);

  // ---- What changed.
  // The slot now holds a request (it can no longer be placed; its surplus
  // can be reclaimed).
  void OnSlotActive(int slot);
  // The slot's request ended. Idle slots are reclaimed least recently
  // idled first.
  void OnSlotIdle(int slot);
  // The operation in flight on the slot changed (busy slots are skipped).
  void OnSlotOp(int slot, SlotOp op);
  // The slot's extents (in offset order) or how many of them back its
  // request changed.
  void OnExtentsChanged(int slot, absl::Span<const Extent> extents,
                        int backing_extents);

  // ---- Decisions.
  // The idle slot a new request needing `want_bytes` per region takes: the
  // one that already maps most of it, among those where the extent
  // covering it would hold at most `waste_limit` beyond it (a slot holding
  // nothing wastes nothing); ties go to the smaller waste. -1 when no idle
  // slot is free; then *wait says whether one is busy and worth waiting for.
  int ChooseSlotFor(std::int64_t want_bytes, std::int64_t waste_limit,
                    bool* wait) const;
  // The slot that gives up its last extent when memory is short, in order:
  // the least recently idled slot whose fences completed; the active slot
  // with the largest surplus whose fences completed; then the same two that
  // must wait on the GPU. Active slots' backing extents are never taken.
  // `fences_done(slot)` says (and may refresh) whether a slot's fences have
  // completed. -1 when no slot can give; then *wait says whether an idle
  // slot is being unmapped or zeroed (its memory is about to come free).
  int ChooseVictim(absl::FunctionRef<bool(int)> fences_done, bool* wait) const;

 private:
  struct Entry {
    bool active = false;
    SlotOp op = SlotOp::kNone;
    std::uint64_t idle_seq = 0;  // Order of OnSlotIdle, for LRU.
    int backing_extents = 0;
    std::int64_t mapped_bytes = 0;
    std::int64_t surplus_bytes = 0;
    std::vector<std::int64_t> extent_bytes;
  };
  std::vector<Entry> slots_;
  std::uint64_t idle_seq_ = 0;
};

}  // namespace vattn

#endif  // VATTN_SRC_PLACEMENT_H_
