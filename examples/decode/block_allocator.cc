// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "block_allocator.h"

#include <algorithm>
#include <cassert>

namespace vdecode {

BlockAllocator::BlockAllocator(std::int32_t num_blocks)
    : num_blocks_(std::max<std::int32_t>(num_blocks, 0)) {
  free_.reserve(static_cast<std::size_t>(num_blocks_));
  // Block 0 on top, so a fresh pool hands out ascending ids.
  for (std::int32_t b = num_blocks_ - 1; b >= 0; --b) free_.push_back(b);
}

std::int32_t BlockAllocator::Allocate() {
  if (free_.empty()) return -1;
  const std::int32_t b = free_.back();
  free_.pop_back();
  peak_used_ = std::max(peak_used_, used());
  return b;
}

void BlockAllocator::Free(std::int32_t block) {
  assert(block >= 0 && block < num_blocks_);
  assert(static_cast<std::int32_t>(free_.size()) < num_blocks_);
  free_.push_back(block);
}

}  // namespace vdecode
