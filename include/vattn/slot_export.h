// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Zero-copy handoff of a request between two processes on one machine (or
// one GPU): the prefill process exports the extents that back a slot's
// tokens, the decode process maps the same physical memory into a slot of
// its own cache and decodes on, growing the slot with its own extents.
//
//   // prefill (backend made with exportable_handles):
//   vattn::SendSlot(sock, *cache, slot, prompt_tokens);
//   cache->Free(slot);                      // the memory lives on in decode
//   // decode (a cache of the same shape):
//   int slot = *vattn::ReceiveSlot(sock, *cache);   // length = prompt_tokens
//   cache->Step({{slot, prompt_tokens + 1}});        // its own extents now
//
// KVCache::ExportSlot / ImportSlot (kv_cache.h) do the cache's part; the
// helpers here carry a SlotExport and its file descriptors over a connected
// AF_UNIX stream socket (SCM_RIGHTS). Lifetime: the physical memory lives
// while either side maps or holds it (the kernel's file references on the
// Host backend, the driver's on CUDA); each side destroys its own handles
// when its slot lets go of them. Budgets: exported extents stay the
// exporter's physical bytes until it frees the slot (CacheStats::
// exported_bytes), imported ones are not the importer's physical bytes nor
// in its budget (CacheStats::imported_bytes).
#ifndef VATTN_SLOT_EXPORT_H_
#define VATTN_SLOT_EXPORT_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "vattn/export.h"
#include "vattn/options.h"

namespace vattn {

class KVCache;

// What describes an exported slot besides the file descriptors: the
// exporting cache's shape (an importer must have the same), the tokens
// handed over, and the extents that back them. A value type.
struct SlotExport {
  // ---- The exporter's shape: ImportSlot refuses any difference.
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kFloat16;
  Layout layout = Layout::kTokenMajor;
  std::int64_t granularity = 0;  // The backend's.
  int num_regions = 0;           // 1 token-major, 2 x layers layer-major.

  // Tokens [0, tokens) of the slot; the importing slot's length.
  std::int64_t tokens = 0;
  // The extents that back them, in offset order from 0 (whole extents: one
  // cannot be split, so they may back more than `tokens`). Offsets and
  // sizes are per region, in bytes.
  struct Piece {
    std::int64_t offset = 0;
    std::int64_t bytes = 0;
  };
  std::vector<Piece> extents;

  // File descriptors that go with it: one per extent and region,
  // extent-major (extent i, region r is fds[i * num_regions + r]).
  std::size_t num_fds() const {
    return extents.size() * static_cast<std::size_t>(num_regions);
  }
  // "4 layers x 2 heads x 64 dim float16, token-major, granularity 2097152"
  VATTN_EXPORT std::string ShapeString() const;
};

// Exports tokens [0, tokens) of `slot` of `cache` (KVCache::ExportSlot) and
// sends the description and its file descriptors over `sock`, a connected
// AF_UNIX SOCK_STREAM socket: a versioned little-endian header, the
// extents, then the descriptors in chunks of at most 253 (SCM_MAX_FD). The
// descriptors this call made are closed before it returns, sent or not.
// Blocks until everything is written (the peer's ReceiveSlot reads it).
// Errors: those of ExportSlot (nothing sent then); InvalidArgument for a
// socket that is not a connected AF_UNIX stream socket (named by its
// descriptor); Unavailable when the peer has gone (EPIPE, ECONNRESET); the
// extents stay marked exported after a failed send (the peer may hold some).
// Thread-safe as the cache is; two threads must not send on one socket at
// once.
VATTN_EXPORT absl::Status SendSlot(int sock, KVCache& cache, int slot,
                                   std::int64_t tokens);

// Receives one SendSlot message from `sock` and imports it into a free slot
// of `cache` (KVCache::ImportSlot); returns the slot, whose length is the
// exported tokens. Every descriptor received is closed before it returns,
// on success too (the backend keeps its own references). Errors: those of
// ImportSlot (another shape, no free slot, a descriptor that is not an
// export); InvalidArgument for a socket that is not an AF_UNIX stream
// socket or a message that is not a vattn slot export (bad magic, version,
// sizes); DataLoss for a message cut short (the peer closed the socket
// mid-message). Nothing is imported on error, and the message is consumed
// as far as it was read. Blocks until a whole message has arrived (no
// timeout: close the peer to unblock it). Thread-safe as the cache is; two
// threads must not receive on one socket at once.
VATTN_EXPORT absl::StatusOr<int> ReceiveSlot(int sock, KVCache& cache);

// The two halves of the wire format, for engines with their own transport
// of the description (the descriptors still go over `sock`).
// SendSlotExport writes `e` and `fds` (e.num_fds() of them; the caller
// keeps and closes them). ReceiveSlotExport reads one message; on success
// the received descriptors are appended to *fds and the caller owns them;
// on error none are left open.
VATTN_EXPORT absl::Status SendSlotExport(int sock, const SlotExport& e,
                                         absl::Span<const int> fds);
VATTN_EXPORT absl::StatusOr<SlotExport> ReceiveSlotExport(
    int sock, std::vector<int>* fds);

// The wire format's version (the header's second field).
inline constexpr std::uint32_t kSlotExportWireVersion = 1;

}  // namespace vattn

#endif  // VATTN_SLOT_EXPORT_H_
