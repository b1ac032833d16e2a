// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Maps, unmaps and zeroes one extent across a slot's regions, with rollback,
// and runs the two sequences that do so with the cache lock dropped:
//   map:   mark the slot mapping, unlock, acquire handles and map, lock,
//          clear the mark, commit the extent (or nothing, on error);
//   unmap: pop the slot's last extent, unlock, unmap, lock, release its
//          handles to the pool (or restore the extent, on error).
// Those sequences live here and nowhere else, and so does the quarantine:
// an extent whose rollback failed too (some regions may still be mapped)
// leaves the slot's books for the slot's quarantine list, keeps its
// handles, and is unmapped again by RetryQuarantineLocked.
#ifndef VATTN_SRC_EXTENT_MAPPER_H_
#define VATTN_SRC_EXTENT_MAPPER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "src/cache_geometry.h"
#include "src/internal/mutex.h"
#include "src/physical_pool.h"
#include "src/shared_extent.h"
#include "src/slot.h"
#include "vattn/backend.h"
#include "vattn/stream.h"

namespace vattn {

// The cache, as the mapper sees it.
class ExtentMapperOwner {
 public:
  virtual ~ExtentMapperOwner() = default;
  // Handles for one extent of between `minimum` and `preferred` bytes per
  // region (the size chosen goes to *bytes), one per region. Called without
  // the cache lock; may take it (to reclaim memory).
  virtual absl::StatusOr<std::vector<PhysicalHandle>> AcquireHandles(
      std::int64_t minimum, std::int64_t preferred, std::int64_t* bytes) = 0;
  // The slot's operation in flight, or its extents, changed. Called with
  // the cache lock held.
  virtual void SlotOpChanged(int slot, const Slot& s) = 0;
  virtual void SlotExtentsChanged(int slot, const Slot& s) = 0;
};

// Constant after construction; the driver-call counters are atomic. The
// *Locked sequences require the cache lock passed in, and drop it around
// driver calls; the others are called without it.
class ExtentMapper {
 public:
  ExtentMapper(Backend* backend, PhysicalPool* pool,
               const CacheGeometry* geometry, DevicePtr base,
               bool zero_new_extents, internal::CondVar* slot_cv,
               ExtentMapperOwner* owner)
      : backend_(backend),
        pool_(pool),
        geo_(geometry),
        base_(base),
        zero_new_(zero_new_extents),
        slot_cv_(slot_cv),
        owner_(owner) {}

  // ---- Sequences around the cache lock `mu` (held on entry and exit).
  // Maps one new extent of `preferred` bytes per region (or, under budget
  // pressure, `minimum`) at the slot's end (after every extent it holds)
  // and appends it, backing. The slot must not be busy; it is marked
  // mapping meanwhile, and waiters on slot_cv are woken after. The slot's
  // quarantine is retried first: while it is not empty, its unmap error is
  // returned and nothing is mapped. On error nothing is mapped or held,
  // except an extent whose rollback failed: that one is quarantined.
  // With a prefix boundary (Slot::split_bytes) above the slot's mapped end,
  // the extent ends at the boundary (both sizes are capped there).
  absl::Status MapNextLocked(internal::Mutex& mu, int slot, Slot& s,
                             std::int64_t preferred, std::int64_t minimum)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Maps handles the caller already holds (extent.handles, one per region)
  // at extent.offset of every region (read-only when extent.read_only) and
  // appends the extent to the slot's books, backing; extent.offset must be
  // the slot's mapped end (InvalidArgument otherwise). A kShared extent
  // gains a mapping reference when it commits. Same busy-marking, lock
  // dropping and quarantine rules as MapNextLocked. On error nothing is
  // mapped and the handles stay the caller's, except when the rollback
  // failed too: then the extent is quarantined (it holds a mapping
  // reference until its unmap succeeds). Never zeroes the memory.
  absl::Status MapExistingLocked(internal::Mutex& mu, int slot, Slot& s,
                                 Extent extent)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // The one place that decides where an extent's handles go once a slot
  // (or a prefix home) no longer maps it: kOwn to the pool; kShared drops
  // one mapping reference and the last reference pools the handles;
  // kExported and kImported are destroyed (Backend::Destroy). Call it with
  // the cache lock held (it reads the shared records); only kExported and
  // kImported make driver calls.
  void LetGoLocked(Extent extent);
  // Drops a cached prefix's reference to a shared extent; the last
  // reference pools its handles. Cache lock held.
  void DropKeepLocked(SharedExtent& shared);
  // Makes the slot's extent `index` (backing, not busy elsewhere; the slot
  // is marked busy by the caller) shared in place: a kOwn extent gets a
  // record (one mapping: this slot's) and is set read-only in every region
  // (SetAccess, with the lock dropped; a failure sets back what it changed
  // and leaves the extent as it was). Returns the record.
  absl::StatusOr<std::shared_ptr<SharedExtent>> ShareLocked(
      internal::Mutex& mu, int slot, Slot& s, std::size_t index)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // What UnmapLastLocked does with an extent whose unmap failed but whose
  // rollback mapped it back whole.
  enum class OnCleanFailure { kRestore, kQuarantine };
  // Unmaps the slot's last extent and releases its handles to the pool;
  // returns its size per region. The caller has marked the slot busy. On
  // error the extent is quarantined if its state is unknown, else restored
  // on the slot's books (or quarantined, as `on_failure` says).
  absl::StatusOr<std::int64_t> UnmapLastLocked(
      internal::Mutex& mu, int slot, Slot& s,
      OnCleanFailure on_failure = OnCleanFailure::kRestore)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Unmaps every extent of the slot; with kQuarantine a failure moves the
  // extent to quarantine and goes on with the next one, with kRestore the
  // first error stops it. Returns the first error.
  absl::Status UnmapAllLocked(internal::Mutex& mu, int slot, Slot& s,
                              OnCleanFailure on_failure = OnCleanFailure::kRestore)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  // Unmaps again the regions of the slot's quarantined extents that may
  // still be mapped; an extent fully unmapped goes back to the pool.
  // Returns the bytes per region given back, or the first error (then the
  // rest stays in quarantine). The caller has marked the slot busy.
  absl::StatusOr<std::int64_t> RetryQuarantineLocked(internal::Mutex& mu,
                                                     int slot, Slot& s)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);

  // ---- Driver work, without the cache lock.
  // Zeroes [offset, offset + bytes) of every region of the slot.
  absl::Status Zero(int slot, std::int64_t offset, std::int64_t bytes);
  // Copies [offset, offset + bytes) of every region of slot `src` to the
  // same range of slot `dst` (CopyDeviceToDevice, ordered on `stream`).
  absl::Status Copy(int dst, int src, std::int64_t offset, std::int64_t bytes,
                    Stream stream);
  // SetAccess of the extent's regions [0, regions) of `slot` to `access`;
  // stops at the first error.
  absl::Status SetAccessRegions(int slot, const Extent& extent, int regions,
                                MapAccess access);
  // Maps (unmaps) the extent in every region of `slot` (a slot or a prefix
  // home), with rollback: see the private helpers' contract below.
  absl::Status MapExtent(int slot, const Extent& extent,
                         std::vector<char>* left_mapped) {
    return MapRegions(slot, extent, left_mapped);
  }
  absl::Status UnmapExtent(int slot, const Extent& extent,
                           std::vector<char>* left_mapped) {
    return UnmapRegions(slot, extent, left_mapped);
  }
  // Unmaps the regions of `q` at `slot` (a slot or a prefix home) flagged
  // as maybe mapped, clearing each flag whose region is now unmapped (or
  // was never mapped: InvalidArgument). Returns the first other error.
  // Lock not held.
  absl::Status UnmapQuarantined(int slot, QuarantinedExtent& q);

  // Prefix homes: `count` pseudo-slots numbered from `first` (max_slots),
  // laid out like slots (region-major, one stride each) in a reservation
  // of their own at `base`. Set once, before any home is used, under the
  // cache lock.
  void SetHomes(int first, DevicePtr base, int count) {
    first_home_ = first;
    home_base_ = base;
    homes_.store(count, std::memory_order_release);
  }

  // Shared extents' totals (guarded by the cache lock).
  SharedLedger& ledger() { return ledger_; }
  const SharedLedger& ledger() const { return ledger_; }

  std::int64_t map_calls() const {
    return map_calls_.load(std::memory_order_relaxed);
  }
  std::int64_t unmap_calls() const {
    return unmap_calls_.load(std::memory_order_relaxed);
  }
  std::int64_t set_access_calls() const {
    return set_access_calls_.load(std::memory_order_relaxed);
  }
  std::int64_t copy_calls() const {
    return copy_calls_.load(std::memory_order_relaxed);
  }
  // Bytes per region copied by Copy.
  std::int64_t copied_bytes() const {
    return copied_bytes_.load(std::memory_order_relaxed);
  }

 private:
  DevicePtr Address(int slot, int region, std::int64_t offset) const {
    // Only slots past max_slots read the home fields, and only after the
    // cache published them (the acquire pairs with SetHomes' release).
    const int homes = homes_.load(std::memory_order_acquire);
    if (homes > 0 && slot >= first_home_) {
      const std::int64_t home = slot - first_home_;
      return home_base_ +
             static_cast<DevicePtr>(
                 (static_cast<std::int64_t>(region) * homes + home) *
                     geo_->region_stride() +
                 offset);
    }
    return base_ +
           static_cast<DevicePtr>(geo_->RegionOffset(slot, region) + offset);
  }

  // Maps the extent's handles in every region (and zeroes them if asked).
  // On error unmaps what it mapped; *left_mapped is empty when that worked,
  // else it flags the regions that may still be mapped.
  absl::Status MapRegions(int slot, const Extent& extent,
                          std::vector<char>* left_mapped);
  // Unmaps the extent in every region. On error maps back what it unmapped;
  // *left_mapped is empty when that worked (the extent is whole), else it
  // flags the regions that may still be mapped.
  absl::Status UnmapRegions(int slot, const Extent& extent,
                            std::vector<char>* left_mapped);
  // Moves an extent to the slot's quarantine (mu held).
  void Quarantine(int slot, Slot& s, Extent extent, std::vector<char> mapped);

  Backend* const backend_;
  PhysicalPool* const pool_;
  const CacheGeometry* const geo_;
  const DevicePtr base_;
  const bool zero_new_;
  internal::CondVar* const slot_cv_;
  ExtentMapperOwner* const owner_;
  std::atomic<std::int64_t> map_calls_{0};
  std::atomic<std::int64_t> unmap_calls_{0};
  std::atomic<std::int64_t> set_access_calls_{0};
  std::atomic<std::int64_t> copy_calls_{0};
  std::atomic<std::int64_t> copied_bytes_{0};
  // Prefix homes (SetHomes): written once, published by the release store
  // of homes_.
  int first_home_ = 0;
  DevicePtr home_base_ = 0;
  std::atomic<int> homes_{0};
  SharedLedger ledger_;  // Guarded by the cache lock.
};

}  // namespace vattn

#endif  // VATTN_SRC_EXTENT_MAPPER_H_
