// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Shared extents (prefix sharing): one set of physical handles mapped into
// several slots and kept by cached prefixes, with a reference count, and the
// ledger that keeps the totals CacheStats reports about them.
#ifndef VATTN_SRC_SHARED_EXTENT_H_
#define VATTN_SRC_SHARED_EXTENT_H_

#include <cstdint>
#include <memory>

#include "absl/container/inlined_vector.h"
#include "vattn/backend.h"

namespace vattn {

// The handles of an extent that several places hold (ExtentOrigin::kShared):
// the slots that map it (`mappings`) and the cached prefixes that keep it
// (`keeps`). The handles go back to the pool when both drop to zero (the
// last reference), never before: an extent is returned only when no slot and
// no cached prefix needs it. Every field is guarded by the cache lock; the
// record is reached through Extent::shared (slots) and the prefix cache.
struct SharedExtent {
  absl::InlinedVector<PhysicalHandle, 2> handles;  // One per region.
  std::int64_t offset = 0;  // Per region; the same in every slot mapping it.
  std::int64_t bytes = 0;   // Per region.
  int mappings = 0;
  int keeps = 0;
  int refs() const { return mappings + keeps; }
};

// The totals over every shared extent of one cache (bytes per region),
// kept as references come and go: O(1) per change. Guarded by the cache
// lock, like the records.
class SharedLedger {
 public:
  // A new record for handles this cache owns, with no reference yet.
  std::shared_ptr<SharedExtent> Make(
      const absl::InlinedVector<PhysicalHandle, 2>& handles,
      std::int64_t offset, std::int64_t bytes) {
    auto shared = std::make_shared<SharedExtent>();
    shared->handles = handles;
    shared->offset = offset;
    shared->bytes = bytes;
    ++records_;
    return shared;
  }
  void AddMapping(SharedExtent& e) { Change(e, +1, 0); }
  void AddKeep(SharedExtent& e) { Change(e, 0, +1); }
  // True when that was the last reference: the caller returns the handles.
  bool DropMapping(SharedExtent& e) { return Change(e, -1, 0); }
  bool DropKeep(SharedExtent& e) { return Change(e, 0, -1); }

  // Bytes of extents mapped in more than one place, or kept and mapped.
  std::int64_t shared_bytes() const { return shared_; }
  // Bytes the slots map beyond each extent's first mapping.
  std::int64_t saved_bytes() const { return saved_; }
  // Bytes of extents some cached prefix keeps.
  std::int64_t kept_bytes() const { return kept_; }
  // Records with at least one reference (for leak checks).
  std::int64_t live_records() const { return records_; }

 private:
  bool Change(SharedExtent& e, int mappings, int keeps) {
    Count(e, -1);
    e.mappings += mappings;
    e.keeps += keeps;
    Count(e, +1);
    if (e.refs() == 0) {
      --records_;
      return true;
    }
    return false;
  }
  void Count(const SharedExtent& e, int sign) {
    // CacheStats::shared_bytes: mapped into more than one place, or kept
    // and mapped; kept by several prefixes but mapped nowhere is not.
    if (e.mappings >= 2 || (e.mappings >= 1 && e.keeps > 0)) {
      shared_ += sign * e.bytes;
    }
    if (e.mappings >= 2) saved_ += sign * (e.mappings - 1) * e.bytes;
    if (e.keeps > 0) kept_ += sign * e.bytes;
  }

  std::int64_t shared_ = 0;
  std::int64_t saved_ = 0;
  std::int64_t kept_ = 0;
  std::int64_t records_ = 0;
};

}  // namespace vattn

#endif  // VATTN_SRC_SHARED_EXTENT_H_
