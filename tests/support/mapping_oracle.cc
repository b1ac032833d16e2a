// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.

#include "tests/support/mapping_oracle.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace vattn::testing {

absl::StatusOr<MappingSnapshot> MappingSnapshot::Take(std::uintptr_t base,
                                                      std::size_t bytes,
                                                      std::size_t granularity) {
  if (granularity == 0) {
    return absl::InvalidArgumentError("MappingSnapshot: granularity 0");
  }
  std::ifstream maps("/proc/self/maps");
  if (!maps) return absl::InternalError("cannot open /proc/self/maps");
  MappingSnapshot snap;
  snap.granularity_ = granularity;
  const std::uintptr_t end = base + bytes;
  std::string line;
  while (std::getline(maps, line)) {
    // start-end perms offset dev inode [path]
    std::uintptr_t lo = 0;
    std::uintptr_t hi = 0;
    char perms[8] = {};
    std::uint64_t offset = 0;
    char dev[32] = {};
    std::uint64_t inode = 0;
    int path_at = 0;
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " %7s %" SCNx64
                                  " %31s %" SCNu64 " %n",
                    &lo, &hi, perms, &offset, dev, &inode, &path_at) < 6) {
      return absl::InternalError("cannot parse /proc/self/maps line: " + line);
    }
    if (hi <= base || lo >= end) continue;
    const std::string path = path_at > 0 ? line.substr(
                                               static_cast<std::size_t>(path_at))
                                         : std::string();
    if (path.find("memfd:vattn") == std::string::npos) continue;
    if (perms[0] != 'r') continue;  // PROT_NONE over a memfd: not usable.
    const bool writable = perms[1] == 'w';
    // Clip to the reservation; mappings are granule-aligned there.
    const std::uintptr_t from = std::max(lo, base);
    const std::uintptr_t to = std::min(hi, end);
    for (std::uintptr_t va = from; va < to; va += granularity) {
      MappedGranule g;
      g.va = va;
      g.inode = inode;
      g.file_offset = offset + (va - lo);
      g.writable = writable;
      snap.granules_.push_back(g);
      auto& [count, any_writable] = snap.physical_[{g.inode, g.file_offset}];
      ++count;
      any_writable = any_writable || writable;
    }
  }
  std::sort(snap.granules_.begin(), snap.granules_.end(),
            [](const MappedGranule& a, const MappedGranule& b) {
              return a.va < b.va;
            });
  return snap;
}

MappingSnapshot MappingSnapshot::Within(std::uintptr_t base,
                                        std::size_t bytes) const {
  MappingSnapshot out;
  out.granularity_ = granularity_;
  for (const MappedGranule& g : granules_) {
    if (g.va < base || g.va >= base + bytes) continue;
    out.granules_.push_back(g);
    auto& [count, any_writable] = out.physical_[{g.inode, g.file_offset}];
    ++count;
    any_writable = any_writable || g.writable;
  }
  return out;
}

std::int64_t MappingSnapshot::MappedBytes() const {
  return static_cast<std::int64_t>(granules_.size() * granularity_);
}

std::int64_t MappingSnapshot::DistinctBytes() const {
  return static_cast<std::int64_t>(physical_.size() * granularity_);
}

std::int64_t MappingSnapshot::AliasedBytes() const {
  std::int64_t n = 0;
  for (const auto& [key, v] : physical_) n += v.first >= 2 ? 1 : 0;
  return n * static_cast<std::int64_t>(granularity_);
}

std::int64_t MappingSnapshot::ReadOnlyDistinctBytes() const {
  std::map<std::pair<std::uint64_t, std::uint64_t>, bool> read_only;
  for (const MappedGranule& g : granules_) {
    if (!g.writable) read_only[{g.inode, g.file_offset}] = true;
  }
  return static_cast<std::int64_t>(read_only.size() * granularity_);
}

std::string MappingSnapshot::WritableAlias() const {
  for (const MappedGranule& g : granules_) {
    const auto& [count, any_writable] = physical_.at({g.inode, g.file_offset});
    if (count >= 2 && any_writable) {
      return absl::StrFormat(
          "memfd inode %d offset %#x is mapped at %d addresses, writable at "
          "one of them (%#x is %s)",
          g.inode, g.file_offset, count, g.va,
          g.writable ? "read-write" : "read-only");
    }
  }
  return "";
}

const MappedGranule* MappingSnapshot::Find(std::uintptr_t va) const {
  const std::uintptr_t g = va - va % granularity_;
  auto it = std::lower_bound(
      granules_.begin(), granules_.end(), g,
      [](const MappedGranule& m, std::uintptr_t v) { return m.va < v; });
  if (it == granules_.end() || it->va != g) return nullptr;
  return &*it;
}

std::string MappingSnapshot::CheckMapped(std::uintptr_t va, std::size_t bytes,
                                         bool writable) const {
  if (bytes == 0) return "";
  const std::uintptr_t first = va - va % granularity_;
  for (std::uintptr_t g = first; g < va + bytes; g += granularity_) {
    const MappedGranule* m = Find(g);
    if (m == nullptr) {
      return absl::StrFormat("%#x (granule %#x of [%#x, +%d)) is not mapped",
                             std::max(g, va), g, va, bytes);
    }
    if (writable && !m->writable) {
      return absl::StrFormat("%#x (granule %#x of [%#x, +%d)) is read-only",
                             std::max(g, va), g, va, bytes);
    }
  }
  return "";
}

std::pair<std::uint64_t, std::uint64_t> MappingSnapshot::PhysicalOf(
    std::uintptr_t va) const {
  const MappedGranule* m = Find(va);
  if (m == nullptr) return {0, 0};
  return {m->inode, m->file_offset};
}

int MappingSnapshot::AliasCount(std::uintptr_t va) const {
  const MappedGranule* m = Find(va);
  if (m == nullptr) return 0;
  return physical_.at({m->inode, m->file_offset}).first;
}

}  // namespace vattn::testing
