// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// One slot of a KV cache: its state, the operation in flight on it, and the
// extents mapped into it.
#ifndef VATTN_SRC_SLOT_H_
#define VATTN_SRC_SLOT_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "src/shared_extent.h"
#include "vattn/backend.h"

namespace vattn {

// Who owns an extent's handles, and so what happens when a slot lets go of
// it (ExtentMapper::LetGoLocked is the one place that decides).
enum class ExtentOrigin : std::uint8_t {
  kOwn,       // This cache's pool (the only case before): pooled on release.
  kShared,    // Mapped at several places (prefix sharing): the handles live
              // in a refcounted record (`shared`); a slot letting go drops
              // one reference, the last one pools the handles.
  kExported,  // Handed to another process: destroyed on release, never
              // pooled, reused, adopted as surplus, zeroed or reclaimed
              // into the pool.
  kImported,  // Another process's memory: destroyed (released) on release;
              // the kernel/driver keeps it alive while the peer maps it.
};

// One physical extent: the same byte range [offset, offset + bytes) of every
// region of a slot, one handle per region, each mapped whole. The kOwn case
// allocates nothing beyond the handles (no record is made for it).
struct Extent {
  std::int64_t offset = 0;
  std::int64_t bytes = 0;  // Per region.
  absl::InlinedVector<PhysicalHandle, 2> handles;
  ExtentOrigin origin = ExtentOrigin::kOwn;
  bool read_only = false;  // Mapped (or set) with MapAccess::kReadOnly.
  std::shared_ptr<SharedExtent> shared;  // kShared only.
};

// An extent whose mapping state a failed unmap (or failed rollback) left
// unknown: `mapped[r]` says whether region r may still be mapped. It backs
// nothing and blocks its range until every region is unmapped; then its
// handles go back to the pool.
struct QuarantinedExtent {
  Extent extent;
  std::vector<char> mapped;  // Per region.
};

// A slot holds a request (kActive) or not (kIdle); an idle slot may still
// hold the extents its last request left (deferred reclamation).
enum class SlotState : std::uint8_t { kIdle, kActive };

// What a thread is doing to the slot's extents with the cache lock dropped.
// Any operation but kNone makes the slot busy: others wait (or skip it).
enum class SlotOp : std::uint8_t {
  kNone,
  kMapping,    // Adding an extent; the thread may itself wait for memory.
  kUnmapping,  // Taking extents back (reclamation, Free without deferral).
  kZeroing,    // zero_on_reuse, or waiting on the slot's fences first.
  kExporting,  // ExportSlot making descriptors of the slot's extents.
};

// A field Step's fast path reads (and, for the length, writes) without
// the cache lock. Other writers hold the lock; the release store after an
// extent is committed lets a lock-free reader that sees the new size rely on
// the mapping behind it.
template <typename T>
class LockFree {
 public:
  T Get() const { return value_.load(std::memory_order_acquire); }
  void Set(T v) { value_.store(v, std::memory_order_release); }

 private:
  std::atomic<T> value_{};
};

// The books of one slot. The cache guards every member with its lock,
// except the LockFree<> ones, which Step's fast path may read without it.
// Byte counts are per region (multiply by the number of regions for all
// tensors):
//   mapped_bytes  - every extent the slot holds, backing or not;
//   backing_bytes - the first `backing_extents` of them: what the request
//                   may touch. The rest is surplus an earlier request left:
//                   still mapped, taken by the request without a driver call
//                   when it grows into it, reclaimable meanwhile. An idle
//                   slot's extents all count as backing.
// One cache line (or more) per slot, the fast path's fields first, so the
// thread working on one slot does not slow Step's writes to the next.
class alignas(64) Slot {
 public:
  // ---- Read by Step without the lock.
  bool active() const { return state_.Get() == SlotState::kActive; }
  std::int64_t length() const { return length_.Get(); }
  std::int64_t hint() const { return hint_.Get(); }
  std::int64_t backing_bytes() const { return backing_bytes_.Get(); }
  // Step raises its own slots' lengths without the lock.
  void set_length(std::int64_t tokens) { length_.Set(tokens); }

  // ---- Under the cache lock.
  SlotState state() const { return state_.Get(); }
  SlotOp op() const { return op_; }
  bool busy() const { return op_ != SlotOp::kNone; }
  void set_op(SlotOp op) { op_ = op; }
  std::int64_t mapped_bytes() const { return mapped_bytes_; }
  std::int64_t surplus_bytes() const { return mapped_bytes_ - backing_bytes(); }
  int backing_extents() const { return backing_extents_; }
  bool has_surplus() const {
    return backing_extents_ < static_cast<int>(extents_.size());
  }
  const std::vector<Extent>& extents() const { return extents_; }
  std::vector<FenceId>& fences() { return fences_; }
  std::vector<QuarantinedExtent>& quarantine() { return quarantine_; }
  const std::vector<QuarantinedExtent>& quarantine() const {
    return quarantine_;
  }
  // Some request may have written the slot's memory since it was last
  // cleared: every request that was handed backed tokens (by its hint, a
  // Grow, a Step or the map-ahead thread) counts, written or not, so
  // zero_on_reuse clears it before the next request.
  bool written() const { return written_; }
  // Changes each time a request takes the slot, so a thread that dropped
  // the lock can tell that the request it served has gone.
  std::uint64_t request() const { return request_; }
  // The request's prefix boundary (AllocSlot/Grow's split_at_tokens), in
  // bytes per region rounded down to the granularity: an extent mapped
  // below it ends at it, so the prefix can be shared whole. 0: none.
  std::int64_t split_bytes() const { return split_bytes_; }
  void set_split_bytes(std::int64_t bytes) { split_bytes_ = bytes; }
  // Some extent of the slot is shared (kShared) or read-only: memory a new
  // request placed here must not write.
  bool holds_shared() const {
    for (const Extent& e : extents_) {
      if (e.origin != ExtentOrigin::kOwn || e.read_only) return true;
    }
    return false;
  }
  // The extent at `index` became shared (and read-only) in place: its
  // mapping did not move, only its books.
  Extent& MutableExtent(std::size_t index) { return extents_[index]; }

  // A new request takes the slot: it backs the extents up to the one that
  // covers `backed_bytes` (an extent cannot be split).
  void Activate(std::int64_t hint, std::int64_t backed_bytes) {
    int n = 0;
    std::int64_t bytes = 0;
    while (n < static_cast<int>(extents_.size()) && bytes < backed_bytes) {
      bytes += extents_[static_cast<std::size_t>(n)].bytes;
      ++n;
    }
    backing_extents_ = n;
    backing_bytes_.Set(bytes);
    written_ = false;  // AllocSlot cleared it first when it had to.
    split_bytes_ = 0;
    ++request_;
    length_.Set(0);
    hint_.Set(hint);
    state_.Set(SlotState::kActive);
  }
  // The request ended: every extent counts as backing again.
  void Deactivate() {
    if (backing_bytes() > 0) written_ = true;
    state_.Set(SlotState::kIdle);
    length_.Set(0);
    hint_.Set(0);
    split_bytes_ = 0;
    backing_extents_ = static_cast<int>(extents_.size());
    backing_bytes_.Set(mapped_bytes_);
  }
  // Backs the next surplus extent (no driver call). False when none is left.
  bool AdoptNext() {
    if (!has_surplus()) return false;
    backing_bytes_.Set(backing_bytes() +
                       extents_[static_cast<std::size_t>(backing_extents_)].bytes);
    ++backing_extents_;
    return true;
  }
  // Appends a newly mapped extent after every extent the slot holds; the
  // backing extents are a prefix, so any surplus before it backs the slot
  // too from now on. The release store of backing_bytes publishes the lot
  // to Step's fast path.
  void Append(Extent extent) {
    mapped_bytes_ += extent.bytes;
    extents_.push_back(std::move(extent));
    backing_extents_ = static_cast<int>(extents_.size());
    backing_bytes_.Set(mapped_bytes_);
  }
  // Takes the last extent off the books (an idle slot's, or an active
  // slot's surplus); *was_backing says whether it backed the slot, for
  // Restore.
  Extent PopLast(bool* was_backing) {
    Extent extent = std::move(extents_.back());
    extents_.pop_back();
    mapped_bytes_ -= extent.bytes;
    *was_backing = backing_extents_ > static_cast<int>(extents_.size());
    if (*was_backing) {
      --backing_extents_;
      backing_bytes_.Set(backing_bytes() - extent.bytes);
    }
    return extent;
  }
  void Restore(Extent extent, bool was_backing) {
    mapped_bytes_ += extent.bytes;
    if (was_backing) {
      ++backing_extents_;
      backing_bytes_.Set(backing_bytes() + extent.bytes);
    }
    extents_.push_back(std::move(extent));
  }

 private:
  // ---- Step's fast path.
  LockFree<SlotState> state_;
  LockFree<std::int64_t> length_;  // Logical tokens.
  LockFree<std::int64_t> hint_;    // AllocSlot's expected_tokens.
  LockFree<std::int64_t> backing_bytes_;
  // ---- The cache lock.
  SlotOp op_ = SlotOp::kNone;
  bool written_ = false;
  std::uint64_t request_ = 0;
  std::int64_t split_bytes_ = 0;
  int backing_extents_ = 0;
  std::int64_t mapped_bytes_ = 0;
  std::vector<Extent> extents_;  // In offset order.
  std::vector<FenceId> fences_;  // GPU work that may still read the memory.
  std::vector<QuarantinedExtent> quarantine_;
};

}  // namespace vattn

#endif  // VATTN_SRC_SLOT_H_
