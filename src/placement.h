// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Placement policy: which idle slot a new request takes, which slot gives up
// an extent when memory is short, and in which order handle sizes are tried.
// Pure policy on plain data: the cache tells it what changed, asks it what
// to do, and does it. No backend, no lock, no driver call.
//
// Both decisions run on every AllocSlot and every reclaimed extent, under
// the cache lock, so they are index look-ups, not scans:
//   placeable_  idle, not busy slots ordered by what they hold (bytes per
//               region): best fit for a hint is a lower_bound;
//   lru_        idle, not busy slots holding extents, least recently idled
//               first: reclamation's first choice is begin();
//   by_last_    the same slots by the size of their last extent: a Grow
//               that must take memory back takes the one that fits it;
//   surplus_    active, not busy slots with surplus, largest first.
// Each slot also keeps the end offset of each of its extents (ascending), so
// "how far does the extent covering the hint reach" is a binary search.
// A change costs O(log n) (n slots) plus O(1) per extent added or removed:
// extents change only at a slot's end (Slot::Append, PopLast, Restore).
#ifndef VATTN_SRC_PLACEMENT_H_
#define VATTN_SRC_PLACEMENT_H_

#include <cstdint>
#include <set>
#include <utility>
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

// How much a reused slot may hold past a new request's hint, in the extent
// that covers the hint (bytes per region; that extent cannot be split, so
// the excess stays with the request for its life). `want` is what the hint
// needs, `max_extent` the decode growth extent. With memory to spare the
// request usually decodes into the excess, so up to max(max_extent, want)
// is accepted. When memory is short (`memory_short`: the budget is nearly
// all held) the excess is memory a waiting request could use: the limit
// drops to one growth extent past the hint, capped at a quarter of it and
// at least one granule, so a small request takes a fresh slot (or a small
// one) rather than a large one whose memory would then sit idle.
std::int64_t ReuseWasteLimit(std::int64_t want, std::int64_t max_extent,
                             std::int64_t granule, bool memory_short);

// An index of the cache's slots for the two placement decisions. The cache
// calls the On* methods whenever a slot's state, operation in flight or
// extents change (under the cache lock, so calls are serialized), and the
// Choose* methods to decide. Not thread-safe: the caller serializes.
class Placement {
 public:
  // How many candidates a decision examines beyond the index's first
  // answer (slots whose covering extent wastes too much; slots whose
  // fences are still pending). Bounds each decision to O(log n).
  static constexpr int kMaxProbes = 8;

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
  // The slot's extents (in offset order, contiguous from offset 0) or how
  // many of them back its request changed. Extents may only have been
  // added or removed at the end since the last call for this slot.
  void OnExtentsChanged(int slot, absl::Span<const Extent> extents,
                        int backing_extents);

  // ---- Decisions. O(log n + kMaxProbes * log extents).
  // The idle slot a new request needing `want_bytes` per region takes, in
  // order: among the (up to kMaxProbes + 1) idle slots holding the least at
  // or above want_bytes, the one whose extent covering want_bytes reaches
  // least past it, if that is at most `waste_limit`; else the idle slot
  // holding most below want_bytes (a slot holding nothing wastes nothing);
  // else the examined slot wasting least. Ties go to the slot holding least
  // (less surplus left to reclaim), then to the lower slot index.
  // -1 when no idle slot is free; then *wait says whether one is busy and
  // worth waiting for.
  int ChooseSlotFor(std::int64_t want_bytes, std::int64_t waste_limit,
                    bool* wait) const;
  // The slot that gives up its last extent when memory is short, in order:
  // the least recently idled slot whose fences completed; the active slot
  // with the largest surplus whose fences completed; then the oldest idle
  // slot and the largest surplus, whose GPU work must be waited for. Only
  // the first kMaxProbes + 1 candidates of each kind are asked
  // `fences_done(slot)` (which says, and may refresh, whether a slot's
  // fences have completed). Active slots' backing extents are never taken.
  // -1 when no slot can give; then *wait says whether an idle slot is being
  // unmapped or zeroed (its memory is about to come free).
  // With need > 0 (bytes per region a Grow must take back), an idle slot
  // is chosen by the size of its last extent instead of by age: the
  // smallest that is at least `need` (one unmap covers it, and an extent of
  // the size the Grow maps moves over as it is: unmap + map, instead of
  // unmap + destroy + create + map), else the largest (the fewest unmaps
  // add up to it); fences completed. Ties go to the least recently idled
  // among covering extents, to the most recently idled among the largest.
  int ChooseVictim(absl::FunctionRef<bool(int)> fences_done, bool* wait,
                   std::int64_t need = 0) const;

  // ---- Totals, kept as they change (O(1)).
  // Idle slots holding at least one extent.
  int idle_slots_with_memory() const { return idle_with_memory_; }
  // Bytes per region held by idle slots, and active slots' surplus.
  std::int64_t idle_bytes() const { return idle_bytes_; }
  std::int64_t surplus_bytes() const { return surplus_total_; }
  // The idle sequence of the least recently idled slot holding extents
  // that is not busy (~0 when none). Sequences come from one process-wide
  // counter (NextIdleSeq), so they order idle slots across caches: the
  // memory arbiter's global LRU (src/memory_arbiter.h).
  std::uint64_t OldestIdleSeq() const {
    return lru_.empty() ? ~std::uint64_t{0} : lru_.begin()->first;
  }
  // The next idle sequence number (from 1; thread-safe).
  static std::uint64_t NextIdleSeq();

 private:
  struct Entry {
    bool active = false;
    SlotOp op = SlotOp::kNone;
    std::uint64_t idle_seq = 0;  // Order of OnSlotIdle, for LRU.
    int backing_extents = 0;
    std::int64_t surplus_bytes = 0;
    // End offset of each extent, ascending; back() is what the slot holds.
    std::vector<std::int64_t> ends;
    std::int64_t mapped_bytes() const { return ends.empty() ? 0 : ends.back(); }
  };
  Entry& At(int slot) { return slots_[static_cast<std::size_t>(slot)]; }
  const Entry& At(int slot) const {
    return slots_[static_cast<std::size_t>(slot)];
  }
  // Take the slot out of (put it back into) every index and total, as its
  // entry says now. Every change is Unindex, edit the entry, Index.
  void Unindex(int slot);
  void Index(int slot);
  // How far past `want` the extent covering `want` reaches (0 when the slot
  // holds less than want).
  std::int64_t CoverWaste(const Entry& e, std::int64_t want) const;

  std::vector<Entry> slots_;
  // (bytes held, slot) of idle, not busy slots.
  std::set<std::pair<std::int64_t, int>> placeable_;
  // (idle_seq, slot) of idle, not busy slots holding extents.
  std::set<std::pair<std::uint64_t, int>> lru_;
  // (last extent's bytes, idle_seq, slot) of the same slots as lru_.
  struct FitKey {
    std::int64_t last_bytes;
    std::uint64_t idle_seq;
    int slot;
    bool operator<(const FitKey& o) const {
      if (last_bytes != o.last_bytes) return last_bytes < o.last_bytes;
      if (idle_seq != o.idle_seq) return idle_seq < o.idle_seq;
      return slot < o.slot;
    }
  };
  std::set<FitKey> by_last_;
  static std::int64_t LastBytes(const Entry& e) {
    if (e.ends.empty()) return 0;
    return e.ends.size() == 1 ? e.ends[0] : e.ends.back() - e.ends[e.ends.size() - 2];
  }
  // (-surplus bytes, slot) of active, not busy slots with surplus.
  std::set<std::pair<std::int64_t, int>> surplus_;
  int idle_busy_ = 0;      // Idle slots with an operation in flight.
  int idle_freeing_ = 0;   // ... unmapping or zeroing, holding extents.
  int idle_with_memory_ = 0;
  std::int64_t idle_bytes_ = 0;
  std::int64_t surplus_total_ = 0;
};

}  // namespace vattn

#endif  // VATTN_SRC_PLACEMENT_H_
