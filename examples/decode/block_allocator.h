// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The paged baseline's allocator: a fixed pool of equal blocks handed out
// from a free list (vLLM's BlockAllocator, without prefix sharing). Not
// thread-safe: the decode loop owns it.
#ifndef VATTN_EXAMPLES_DECODE_BLOCK_ALLOCATOR_H_
#define VATTN_EXAMPLES_DECODE_BLOCK_ALLOCATOR_H_

#include <cstdint>
#include <vector>

namespace vdecode {

class BlockAllocator {
 public:
  explicit BlockAllocator(std::int32_t num_blocks);
  // A free block id, or -1 when the pool is exhausted.
  std::int32_t Allocate();
  // Returns a block taken by Allocate (not checked for double frees beyond
  // a debug assertion).
  void Free(std::int32_t block);

  std::int32_t num_blocks() const { return num_blocks_; }
  std::int32_t used() const {
    return num_blocks_ - static_cast<std::int32_t>(free_.size());
  }
  std::int32_t peak_used() const { return peak_used_; }

 private:
  std::int32_t num_blocks_;
  std::int32_t peak_used_ = 0;
  std::vector<std::int32_t> free_;  // A stack: the last freed is reused first.
};

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_BLOCK_ALLOCATOR_H_
