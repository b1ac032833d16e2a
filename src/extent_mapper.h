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
#include "src/slot.h"
#include "vattn/backend.h"

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
  absl::Status MapNextLocked(internal::Mutex& mu, int slot, Slot& s,
                             std::int64_t preferred, std::int64_t minimum)
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

  std::int64_t map_calls() const {
    return map_calls_.load(std::memory_order_relaxed);
  }
  std::int64_t unmap_calls() const {
    return unmap_calls_.load(std::memory_order_relaxed);
  }

 private:
  DevicePtr Address(int slot, int region, std::int64_t offset) const {
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
};

}  // namespace vattn

#endif  // VATTN_SRC_EXTENT_MAPPER_H_
