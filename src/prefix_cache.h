// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The books of a cache's cached prefixes (KVCache::KeepPrefix): which
// shared extents each keeps, its copied tail and the home it is mapped in,
// who uses it, and the LRU order eviction follows. Plain data: no backend,
// no lock of its own (the cache's lock guards it), no driver call; the cache
// (prefix_sharing.cc) does the mapping and decides.
//
// A prefix's tokens [0, tokens) live in two parts:
//   whole  - extents of the slot it was kept from (shared records, one
//            reference each, kept), contiguous from offset 0 to whole_end;
//   tail   - the tokens [whole_end, tokens) that only partly filled the
//            next extent, copied once into an extent of the prefix's own,
//            mapped in a "home": a pseudo-slot numbered past max_slots in a
//            reservation of its own, so the copy a new request makes from it
//            always has a mapped source. No tail (the prefix ends on an
//            extent's end): no home.
#ifndef VATTN_SRC_PREFIX_CACHE_H_
#define VATTN_SRC_PREFIX_CACHE_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "src/shared_extent.h"
#include "src/slot.h"
#include "vattn/backend.h"

namespace vattn {

struct CachedPrefix {
  std::uint64_t id = 0;
  std::int64_t tokens = 0;
  std::vector<std::shared_ptr<SharedExtent>> whole;  // Offset order, from 0.
  std::int64_t whole_end = 0;  // Per region: where the tail starts.
  int home = -1;               // Home index (0-based) when there is a tail.
  Extent tail;                 // kOwn, mapped at the home (offset whole_end).
  std::int64_t tail_tokens_bytes = 0;  // Per region: bytes of tokens in it.
  std::vector<FenceId> fences;  // Copies into or out of the home in flight.
  int users = 0;               // Active slots started from it.
  int busy = 0;                // Threads copying from its home (lock dropped).
  std::int64_t hits = 0;
  std::uint64_t lru = 0;       // Larger: used more recently.
};

// Not thread-safe: the cache's lock guards it.
class PrefixCache {
 public:
  void Init(int max_slots, int max_prefixes) {
    slot_user_.assign(static_cast<std::size_t>(max_slots), std::nullopt);
    free_homes_.clear();
    for (int h = max_prefixes - 1; h >= 0; --h) free_homes_.push_back(h);
    max_prefixes_ = max_prefixes;
  }
  int max_prefixes() const { return max_prefixes_; }
  std::size_t size() const { return by_id_.size(); }

  CachedPrefix* Find(std::uint64_t id) {
    auto it = by_id_.find(id);
    return it == by_id_.end() ? nullptr : it->second.get();
  }
  const CachedPrefix* Find(std::uint64_t id) const {
    auto it = by_id_.find(id);
    return it == by_id_.end() ? nullptr : it->second.get();
  }
  // Adds a prefix (its id unused) as the most recently used.
  CachedPrefix& Add(std::unique_ptr<CachedPrefix> p) {
    CachedPrefix& ref = *p;
    ref.lru = ++clock_;
    lru_.emplace(ref.lru, ref.id);
    tail_bytes_ += ref.tail.bytes;
    by_id_.emplace(ref.id, std::move(p));
    return ref;
  }
  // Removes it from the books and returns it (the caller gives back its
  // memory and home).
  std::unique_ptr<CachedPrefix> Remove(std::uint64_t id) {
    auto it = by_id_.find(id);
    if (it == by_id_.end()) return nullptr;
    std::unique_ptr<CachedPrefix> p = std::move(it->second);
    by_id_.erase(it);
    lru_.erase(p->lru);
    tail_bytes_ -= p->tail.bytes;
    return p;
  }
  void Touch(CachedPrefix& p) {
    lru_.erase(p.lru);
    p.lru = ++clock_;
    lru_.emplace(p.lru, p.id);
  }
  // The least recently used prefix no active request uses and no thread
  // copies from, or nullptr.
  CachedPrefix* EvictionCandidate() {
    for (const auto& [seq, id] : lru_) {
      CachedPrefix* p = Find(id);
      if (p != nullptr && p->users == 0 && p->busy == 0) return p;
    }
    return nullptr;
  }
  std::vector<std::uint64_t> Ids() const {
    std::vector<std::uint64_t> ids;
    for (const auto& [seq, id] : lru_) ids.push_back(id);
    return ids;
  }

  // Homes.
  std::optional<int> TakeHome() {
    if (free_homes_.empty()) return std::nullopt;
    const int h = free_homes_.back();
    free_homes_.pop_back();
    return h;
  }
  void GiveHome(int h) { free_homes_.push_back(h); }

  // Which prefix an active slot was started from (for `users`).
  std::optional<std::uint64_t>& UserOf(int slot) {
    return slot_user_[static_cast<std::size_t>(slot)];
  }

  // Bytes per region of every cached prefix's tail.
  std::int64_t tail_bytes() const { return tail_bytes_; }
  // A cached prefix let go of its tail (unmapped from its home) before it
  // is Removed: Remove then finds no tail to subtract.
  void ForgetTail(std::int64_t bytes) { tail_bytes_ -= bytes; }

  // Tails whose unmap (or a failed map's rollback) failed twice at their
  // home: their state is unknown, so the home stays taken and the handles
  // stay out of the pool until every region that may be mapped is unmapped
  // (retried as slots' quarantines are; counted in the cache's quarantine
  // totals). Guarded by the cache lock.
  struct QuarantinedTail {
    int home = -1;
    QuarantinedExtent q;
  };
  std::vector<QuarantinedTail>& quarantine() { return quarantine_; }

 private:
  absl::flat_hash_map<std::uint64_t, std::unique_ptr<CachedPrefix>> by_id_;
  absl::btree_map<std::uint64_t, std::uint64_t> lru_;  // lru seq -> id.
  std::uint64_t clock_ = 0;
  std::vector<int> free_homes_;
  std::vector<std::optional<std::uint64_t>> slot_user_;
  std::int64_t tail_bytes_ = 0;
  int max_prefixes_ = 0;
  std::vector<QuarantinedTail> quarantine_;
};

// Moves a tail whose state at its home is unknown to the prefix cache's
// quarantine (`left`: the regions that may be mapped; empty: all) and counts
// it in the cache's quarantine totals. `CacheImpl` is KVCache::Impl (a
// template only because that type is private); its lock is held.
template <typename CacheImpl>
void QuarantineTailLocked(CacheImpl& m, int home, Extent tail,
                          std::vector<char> left)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {  // The caller holds m.mu.
  if (left.empty()) left.assign(static_cast<std::size_t>(m.geo.num_regions()), 1);
  ++m.totals.quarantined;
  m.totals.quarantined_bytes += tail.bytes;
  PrefixCache::QuarantinedTail t;
  t.home = home;
  t.q.extent = std::move(tail);
  t.q.mapped = std::move(left);
  m.prefixes.quarantine().push_back(std::move(t));
}

// Unmaps again the regions of quarantined tails that may still be mapped; a
// tail fully unmapped goes back to the pool and its home is free again.
// Returns the bytes per region given back. Lock held (dropped meanwhile:
// the entries are out of the list, so nobody else sees them).
template <typename CacheImpl>
std::int64_t RetryTailQuarantineLocked(CacheImpl& m)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {  // The caller holds m.mu.
  std::vector<PrefixCache::QuarantinedTail>& list = m.prefixes.quarantine();
  if (list.empty()) return 0;
  std::vector<PrefixCache::QuarantinedTail> entries;
  entries.swap(list);
  m.mu.Unlock();
  for (PrefixCache::QuarantinedTail& t : entries) {
    (void)m.mapper->UnmapQuarantined(m.HomeSlot(t.home), t.q);
  }
  m.mu.Lock();
  std::int64_t freed = 0;
  for (PrefixCache::QuarantinedTail& t : entries) {
    if (std::find(t.q.mapped.begin(), t.q.mapped.end(), 1) != t.q.mapped.end()) {
      m.prefixes.quarantine().push_back(std::move(t));
      continue;
    }
    --m.totals.quarantined;
    m.totals.quarantined_bytes -= t.q.extent.bytes;
    freed += t.q.extent.bytes;
    m.mapper->LetGoLocked(std::move(t.q.extent));
    m.prefixes.GiveHome(t.home);
  }
  return freed;
}

}  // namespace vattn

#endif  // VATTN_SRC_PREFIX_CACHE_H_
