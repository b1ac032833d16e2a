// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// KVCache::SlotRanges and Reservation: a slot's tokens, and the whole
// reservation, as the virtual ranges a transfer engine registers and moves. Pure geometry over the slot's books; no backend call.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "src/cache_geometry.h"
#include "src/kv_cache_impl.h"
#include "src/slot.h"
#include "vattn/kv_cache.h"
#include "vattn/status.h"

namespace vattn {

absl::StatusOr<std::vector<MemoryRange>> KVCache::SlotRanges(
    int slot, std::int64_t tokens) const {
  const Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  VATTN_RETURN_IF_ERROR(m.CheckTokens(tokens));
  std::int64_t backed = 0;
  {
    internal::MutexLock lock(&m.mu);
    VATTN_RETURN_IF_ERROR(m.CheckActiveLocked(slot));
    const Slot& s = m.slots[static_cast<std::size_t>(slot)];
    backed = m.geo.BackedTokens(s.backing_bytes());
  }
  if (tokens > backed) {
    return absl::OutOfRangeError(absl::StrFormat(
        "SlotRanges: slot %d backs %d tokens, %d asked (Grow it first)", slot,
        backed, tokens));
  }
  std::vector<MemoryRange> ranges;
  if (tokens == 0) return ranges;
  const auto bytes = static_cast<std::size_t>(tokens * m.geo.token_bytes());
  ranges.reserve(static_cast<std::size_t>(m.geo.num_regions()));
  // Region r is K (r even) or V (r odd) of layer r / 2 in layer-major; the
  // single region of token-major holds them all, token after token.
  for (int r = 0; r < m.geo.num_regions(); ++r) {
    ranges.push_back(MemoryRange{
        m.base + static_cast<DevicePtr>(m.geo.RegionOffset(slot, r)), bytes});
  }
  return ranges;
}

MemoryRange KVCache::Reservation() const {
  return MemoryRange{impl_->base, impl_->geo.reserved_bytes()};
}

}  // namespace vattn
