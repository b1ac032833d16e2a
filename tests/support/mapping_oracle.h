// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// An independent view of what the Host backend has mapped, read from the
// kernel (/proc/self/maps) rather than from vattn's own books: which
// addresses of a reservation are backed, by which physical memory (memfd
// inode and offset), and with which protection. Tests of prefix sharing use
// it to re-count physical bytes with every aliased granule counted once,
// and to check that memory mapped at several places is read-only at each.
// Linux only; Host backend only (its handles are memfd ranges).
#ifndef VATTN_TESTS_SUPPORT_MAPPING_ORACLE_H_
#define VATTN_TESTS_SUPPORT_MAPPING_ORACLE_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace vattn::testing {

// One granule of virtual memory inside the reservation that the kernel maps
// to a memfd.
struct MappedGranule {
  std::uintptr_t va = 0;
  std::uint64_t inode = 0;       // The memfd.
  std::uint64_t file_offset = 0;  // Where in it.
  bool writable = false;
};

// A snapshot of the memfd-backed mappings inside [base, base + bytes),
// split into granules of `granularity` bytes.
class MappingSnapshot {
 public:
  // Reads /proc/self/maps. Internal: the file cannot be read or parsed.
  static absl::StatusOr<MappingSnapshot> Take(std::uintptr_t base,
                                              std::size_t bytes,
                                              std::size_t granularity);

  // The part of this snapshot inside [base, base + bytes) (no new read).
  MappingSnapshot Within(std::uintptr_t base, std::size_t bytes) const;

  const std::vector<MappedGranule>& granules() const { return granules_; }
  std::size_t granularity() const { return granularity_; }

  // Bytes of virtual memory mapped (aliases counted at each address).
  std::int64_t MappedBytes() const;
  // Bytes of physical memory mapped somewhere (each memfd granule once).
  std::int64_t DistinctBytes() const;
  // Bytes of physical memory mapped at two or more addresses (once each).
  std::int64_t AliasedBytes() const;
  // Bytes of physical memory mapped read-only somewhere (once each).
  std::int64_t ReadOnlyDistinctBytes() const;
  // Physical memory mapped at two or more addresses with write access at
  // one of them (a write there would change another request's data): a
  // description of the first such granule, or "" when there is none.
  std::string WritableAlias() const;

  // Every granule of [va, va + bytes) is mapped (with write access too
  // when `writable`); else a description of the first that is not.
  std::string CheckMapped(std::uintptr_t va, std::size_t bytes,
                          bool writable) const;
  // The granule holding `va`, or nullptr when it is not mapped.
  const MappedGranule* Find(std::uintptr_t va) const;
  // Physical identity (inode, offset) of the granule holding `va`.
  std::pair<std::uint64_t, std::uint64_t> PhysicalOf(std::uintptr_t va) const;
  // How many addresses map the physical granule behind `va` (0: unmapped).
  int AliasCount(std::uintptr_t va) const;

 private:
  std::size_t granularity_ = 0;
  std::vector<MappedGranule> granules_;  // In address order.
  // (inode, offset) -> number of addresses mapping it, any writable.
  std::map<std::pair<std::uint64_t, std::uint64_t>, std::pair<int, bool>>
      physical_;
};

}  // namespace vattn::testing

#endif  // VATTN_TESTS_SUPPORT_MAPPING_ORACLE_H_
