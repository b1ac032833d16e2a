// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Zero-copy handoff of a slot between processes (vattn/slot_export.h):
// KVCache::ExportSlot / ImportSlot over the extent books, and the wire
// format SendSlot / ReceiveSlot use over an AF_UNIX stream socket.
//
// Wire format, version 1, every integer little-endian:
//   header (64 bytes)  "VATTNSLT", u32 version, u32 header bytes (64),
//                      u32 num_layers, u32 num_kv_heads, u32 head_dim,
//                      u32 dtype, u32 layout, u32 num_regions,
//                      u64 granularity, u64 tokens, u64 extent count
//   extents            extent count x (u64 offset, u64 bytes), per region
//   fd chunks          ceil(fds / 253) x an 8-byte record (u32 magic
//                      0x31444656, "VFD1" in memory order; u32 count)
//                      carrying `count` descriptors as SCM_RIGHTS, in order
// Every part is read with exactly its length, so a recvmsg never runs into
// the next part's descriptors (Linux stops a stream read at a message that
// carries descriptors, but only once it has started reading it).

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "src/cache_geometry.h"
#include "src/kv_cache_impl.h"
#include "src/slot.h"
#include "vattn/kv_cache.h"
#include "vattn/slot_export.h"
#include "vattn/status.h"

namespace vattn {

using internal::MutexLock;

namespace {

// SCM_MAX_FD: the most descriptors one Linux message may carry.
constexpr std::size_t kMaxFdsPerMessage = 253;
constexpr char kMagic[8] = {'V', 'A', 'T', 'T', 'N', 'S', 'L', 'T'};
constexpr std::size_t kHeaderBytes = 64;
constexpr std::size_t kPieceBytes = 16;
constexpr std::uint32_t kChunkMagic = 0x31444656;  // "VFD1"
constexpr std::size_t kChunkBytes = 8;
// Bounds a receiver accepts before it allocates anything: far above any
// real cache (a slot of 2^20 extents per region), far below what could
// exhaust memory.
constexpr std::uint64_t kMaxExtents = std::uint64_t{1} << 20;
constexpr std::uint64_t kMaxFds = std::uint64_t{1} << 20;

void PutU32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}
void PutU64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}
std::uint32_t GetU32(const std::uint8_t* p) {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= std::uint32_t{p[i]} << (8 * i);
  return v;
}
std::uint64_t GetU64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= std::uint64_t{p[i]} << (8 * i);
  return v;
}

std::string ErrnoText(int err) { return std::strerror(err); }

void CloseAll(const std::vector<int>& fds) {
  for (int fd : fds) (void)::close(fd);
}

// OK for a connected AF_UNIX SOCK_STREAM socket, else InvalidArgument
// naming the descriptor.
absl::Status CheckSocket(const char* what, int sock) {
  int domain = 0;
  int type = 0;
  socklen_t len = sizeof(domain);
  if (sock < 0 ||
      ::getsockopt(sock, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: descriptor %d is not a socket (%s)", what, sock,
        sock < 0 ? "negative" : ErrnoText(errno)));
  }
  len = sizeof(type);
  if (::getsockopt(sock, SOL_SOCKET, SO_TYPE, &type, &len) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: getsockopt(SO_TYPE) of socket %d failed: %s", what, sock,
        ErrnoText(errno)));
  }
  if (domain != AF_UNIX || type != SOCK_STREAM) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: socket %d is domain %d type %d, not AF_UNIX (%d) SOCK_STREAM "
        "(%d): descriptors travel only over Unix stream sockets",
        what, sock, domain, type, AF_UNIX, SOCK_STREAM));
  }
  return absl::OkStatus();
}

// Waits until `sock` is ready for `events` (the socket may be non-blocking,
// as Python's is with a timeout). OK when ready.
absl::Status WaitReady(const char* what, int sock, short events) {
  pollfd p{};
  p.fd = sock;
  p.events = events;
  for (;;) {
    const int r = ::poll(&p, 1, -1);
    if (r > 0) return absl::OkStatus();
    if (r < 0 && errno != EINTR) {
      return absl::InternalError(absl::StrFormat(
          "%s: poll of socket %d failed: %s", what, sock, ErrnoText(errno)));
    }
  }
}

absl::Status SendError(const char* what, int sock, int err) {
  if (err == EPIPE || err == ECONNRESET || err == ENOTCONN) {
    return absl::UnavailableError(absl::StrFormat(
        "%s: the peer of socket %d has gone (%s)", what, sock,
        ErrnoText(err)));
  }
  return absl::InternalError(absl::StrFormat(
      "%s: sendmsg on socket %d failed: %s", what, sock, ErrnoText(err)));
}

// Sends `bytes` of `data`, the first sendmsg carrying `fds` (if any).
absl::Status SendPart(int sock, const std::uint8_t* data, std::size_t bytes,
                      absl::Span<const int> fds) {
  std::vector<char> control;
  if (!fds.empty()) control.assign(CMSG_SPACE(fds.size() * sizeof(int)), 0);
  std::size_t sent = 0;
  while (sent < bytes) {
    iovec iov{};
    iov.iov_base = const_cast<std::uint8_t*>(data + sent);
    iov.iov_len = bytes - sent;
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (sent == 0 && !control.empty()) {
      msg.msg_control = control.data();
      msg.msg_controllen = control.size();
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      if (c == nullptr) {
        return absl::InternalError("SendSlot: no room for the descriptors' "
                                   "control message");
      }
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
      std::memcpy(CMSG_DATA(c), fds.data(), fds.size() * sizeof(int));
    }
    const ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        VATTN_RETURN_IF_ERROR(WaitReady("SendSlot", sock, POLLOUT));
        continue;
      }
      return SendError("SendSlot", sock, errno);
    }
    sent += static_cast<std::size_t>(n);
  }
  return absl::OkStatus();
}

// Reads exactly `bytes` into `data`, appending any descriptors that come
// with them to *fds (nullptr: none may come). `part` names what is read,
// for errors.
absl::Status ReceivePart(int sock, std::uint8_t* data, std::size_t bytes,
                         std::vector<int>* fds, const std::string& part) {
  std::vector<char> control(CMSG_SPACE(kMaxFdsPerMessage * sizeof(int)), 0);
  std::size_t got = 0;
  while (got < bytes) {
    iovec iov{};
    iov.iov_base = data + got;
    iov.iov_len = bytes - got;
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        VATTN_RETURN_IF_ERROR(WaitReady("ReceiveSlot", sock, POLLIN));
        continue;
      }
      return absl::InternalError(absl::StrFormat(
          "ReceiveSlot: recvmsg on socket %d failed reading %s: %s", sock,
          part, ErrnoText(errno)));
    }
    // Descriptors first: whatever else goes wrong, none may stay open.
    std::vector<int> arrived;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr;
         c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (std::size_t i = 0; i < count; ++i) {
        int fd = -1;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        arrived.push_back(fd);
      }
    }
    if (!arrived.empty()) {
      if (fds == nullptr) {
        CloseAll(arrived);
        return absl::InvalidArgumentError(absl::StrFormat(
            "ReceiveSlot: descriptors arrived with %s on socket %d, where "
            "none belong: not a vattn slot export",
            part, sock));
      }
      fds->insert(fds->end(), arrived.begin(), arrived.end());
    }
    if ((msg.msg_flags & MSG_CTRUNC) != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "ReceiveSlot: more descriptors arrived with %s on socket %d than "
          "one message may carry (%d); the kernel dropped the rest",
          part, sock, kMaxFdsPerMessage));
    }
    if (n == 0) {
      return absl::DataLossError(absl::StrFormat(
          "ReceiveSlot: socket %d closed after %d of the %d bytes of %s "
          "(the message was cut short)",
          sock, got, bytes, part));
    }
    got += static_cast<std::size_t>(n);
  }
  return absl::OkStatus();
}

// The shape of a cache, as an export describes it.
SlotExport ShapeOf(const KVCacheOptions& o, const CacheGeometry& geo) {
  SlotExport e;
  e.num_layers = o.num_layers;
  e.num_kv_heads = o.num_kv_heads;
  e.head_dim = o.head_dim;
  e.dtype = o.dtype;
  e.layout = o.layout;
  e.granularity = geo.granularity();
  e.num_regions = geo.num_regions();
  return e;
}

bool SameShape(const SlotExport& a, const SlotExport& b) {
  return a.num_layers == b.num_layers && a.num_kv_heads == b.num_kv_heads &&
         a.head_dim == b.head_dim && a.dtype == b.dtype &&
         a.layout == b.layout && a.granularity == b.granularity &&
         a.num_regions == b.num_regions;
}

// Everything ImportSlot can check before it touches the backend.
absl::Status CheckImport(const KVCacheOptions& o, const CacheGeometry& geo,
                         const SlotExport& e, std::size_t fd_count) {
  const SlotExport mine = ShapeOf(o, geo);
  if (!SameShape(mine, e)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ImportSlot: the export is of another shape (%s) than this cache "
        "(%s)",
        e.ShapeString(), mine.ShapeString()));
  }
  if (e.tokens < 0 || e.tokens > o.max_tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ImportSlot: the export's %d tokens are outside [0, max_tokens %d]",
        e.tokens, o.max_tokens));
  }
  std::int64_t end = 0;
  for (std::size_t i = 0; i < e.extents.size(); ++i) {
    const SlotExport::Piece& p = e.extents[i];
    if (p.offset != end || p.bytes <= 0 || p.bytes % geo.granularity() != 0 ||
        p.bytes > geo.region_stride() - end) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "ImportSlot: extent %d (offset %d, %d bytes) does not follow the "
          "previous one at %d in whole granules of %d within a slot's %d "
          "bytes per tensor",
          i, p.offset, p.bytes, end, geo.granularity(), geo.region_stride()));
    }
    end += p.bytes;
  }
  if (end < e.tokens * geo.token_bytes()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ImportSlot: the export's extents hold %d bytes per tensor, less "
        "than its %d tokens need (%d)",
        end, e.tokens, e.tokens * geo.token_bytes()));
  }
  if (fd_count != e.num_fds()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ImportSlot: %d descriptors given, the export needs %d (%d extents x "
        "%d regions)",
        fd_count, e.num_fds(), e.extents.size(), e.num_regions));
  }
  return absl::OkStatus();
}

// Destroys imported handles no slot maps (rollback), ignoring errors: a
// handle that cannot be destroyed stays with the backend, which takes it
// back when it is destroyed.
void DestroyHandles(Backend& backend, absl::Span<const Extent> extents) {
  for (const Extent& x : extents) {
    for (PhysicalHandle h : x.handles) (void)backend.Destroy(h);
  }
}

}  // namespace

std::string SlotExport::ShapeString() const {
  return absl::StrFormat(
      "%d layers x %d heads x %d dim %s, %s, %d regions, granularity %d",
      num_layers, num_kv_heads, head_dim, DTypeName(dtype), LayoutName(layout),
      num_regions, granularity);
}

// ---------------------------------------------------------------------------
// The cache's side.

absl::Status KVCache::ExportSlot(int slot, std::int64_t tokens,
                                 SlotExport* out, std::vector<int>* fds) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(m.CheckSlot(slot));
  if (tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("ExportSlot: tokens must be >= 0, got %d", tokens));
  }
  if (out == nullptr || fds == nullptr) {
    return absl::InvalidArgumentError("ExportSlot: out and fds must not be null");
  }
  if (!m.backend->capabilities().exportable) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "ExportSlot: backend %s was not made with exportable handles "
        "(HostBackendOptions / CudaBackendOptions::exportable_handles)",
        m.backend->capabilities().name));
  }
  SlotExport e = ShapeOf(m.opts, m.geo);
  e.tokens = tokens;
  std::vector<PhysicalHandle> handles;
  std::vector<std::size_t> marked;  // Extents this call made kExported.
  {
    MutexLock lock(&m.mu);
    VATTN_RETURN_IF_ERROR(m.CheckActiveLocked(slot));
    m.WaitNotBusyLocked(slot);
    VATTN_RETURN_IF_ERROR(m.CheckActiveLocked(slot));  // Freed meanwhile?
    Slot& s = m.At(slot);
    const std::int64_t backed = m.geo.BackedTokens(s.backing_bytes());
    if (tokens > backed) {
      return absl::OutOfRangeError(absl::StrFormat(
          "ExportSlot: slot %d backs %d tokens, %d asked (Grow it first)",
          slot, backed, tokens));
    }
    const std::int64_t need = tokens * m.geo.token_bytes();
    std::int64_t covered = 0;
    for (std::size_t i = 0; covered < need; ++i) {
      const Extent& x = s.extents()[i];
      if (x.origin != ExtentOrigin::kOwn &&
          x.origin != ExtentOrigin::kExported) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "ExportSlot: slot %d's extent at offset %d is %s: only the "
            "cache's own memory can be exported",
            slot, x.offset,
            x.origin == ExtentOrigin::kShared ? "shared (prefix sharing)"
                                               : "imported from another "
                                                 "process"));
      }
      e.extents.push_back({x.offset, x.bytes});
      handles.insert(handles.end(), x.handles.begin(), x.handles.end());
      covered += x.bytes;
    }
    // From here on these extents never back another request of this cache.
    for (std::size_t i = 0; i < e.extents.size(); ++i) {
      Extent& x = s.MutableExtent(i);
      if (x.origin == ExtentOrigin::kOwn) {
        x.origin = ExtentOrigin::kExported;
        marked.push_back(i);
      }
    }
    if (!marked.empty()) m.BooksChangedLocked(slot);
    if (!handles.empty()) m.SetOpLocked(slot, SlotOp::kExporting);
  }
  if (handles.empty()) {
    *out = std::move(e);
    return absl::OkStatus();
  }
  // Descriptors without the lock (a driver call on CUDA); the slot is busy,
  // so nobody unmaps or destroys the extents meanwhile.
  std::vector<int> made;
  made.reserve(handles.size());
  absl::Status status;
  for (PhysicalHandle h : handles) {
    absl::StatusOr<int> fd = m.backend->ExportHandle(h);
    if (!fd.ok()) {
      status = fd.status();
      break;
    }
    made.push_back(*fd);
  }
  if (!status.ok()) CloseAll(made);  // Nothing escaped: undo the marks.
  MutexLock lock(&m.mu);
  Slot& s = m.At(slot);
  if (!status.ok()) {
    for (std::size_t i : marked) s.MutableExtent(i).origin = ExtentOrigin::kOwn;
    if (!marked.empty()) m.BooksChangedLocked(slot);
  } else {
    ++m.stats.exported_slots;
  }
  m.SetOpLocked(slot, SlotOp::kNone);
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrFormat("ExportSlot: slot %d: %s", slot,
                                        status.message()));
  }
  fds->insert(fds->end(), made.begin(), made.end());
  *out = std::move(e);
  return absl::OkStatus();
}

absl::StatusOr<int> KVCache::ImportSlot(const SlotExport& e,
                                        absl::Span<const int> fds) {
  Impl& m = *impl_;
  VATTN_RETURN_IF_ERROR(CheckImport(m.opts, m.geo, e, fds.size()));
  {
    MutexLock lock(&m.mu);
    if (m.active_count >= m.opts.max_slots) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "ImportSlot: all %d slots are active", m.opts.max_slots));
    }
  }
  // The peer's memory becomes handles of this backend, without the lock.
  const int regions = m.geo.num_regions();
  std::vector<Extent> extents;
  extents.reserve(e.extents.size());
  for (std::size_t i = 0; i < e.extents.size(); ++i) {
    Extent x;
    x.offset = e.extents[i].offset;
    x.bytes = e.extents[i].bytes;
    x.origin = ExtentOrigin::kImported;
    for (int r = 0; r < regions; ++r) {
      const int fd = fds[i * static_cast<std::size_t>(regions) +
                         static_cast<std::size_t>(r)];
      absl::StatusOr<PhysicalHandle> h =
          m.backend->ImportHandle(fd, static_cast<std::size_t>(x.bytes));
      if (!h.ok()) {
        for (PhysicalHandle done : x.handles) (void)m.backend->Destroy(done);
        DestroyHandles(*m.backend, extents);
        return absl::Status(
            h.status().code(),
            absl::StrFormat("ImportSlot: extent %d region %d (descriptor "
                            "%d): %s",
                            i, r, fd, h.status().message()));
      }
      x.handles.push_back(*h);
    }
    extents.push_back(std::move(x));
  }

  // Under the lock from here to the end; handles no slot took are
  // destroyed after it is dropped (`orphans_from`: extents[i] for i >= it).
  std::size_t orphans_from = 0;
  absl::Status status;
  int slot = -1;
  m.mu.Lock();
  // A free slot, the emptiest first: its memory would sit where the
  // imported extents go.
  for (;;) {
    bool wait = false;
    slot = m.placement.ChooseSlotFor(0, 0, &wait);
    if (slot >= 0 || !wait) break;
    m.state_cv.Wait(&m.mu);
  }
  if (slot < 0) {
    status = absl::ResourceExhaustedError(absl::StrFormat(
        "ImportSlot: all %d slots are active", m.opts.max_slots));
  } else if (!m.At(slot).extents().empty() ||
             !m.At(slot).quarantine().empty()) {
    Slot& s = m.At(slot);
    m.SetOpLocked(slot, SlotOp::kUnmapping);
    status = m.WaitFencesLocked(s);
    if (status.ok()) status = m.mapper->UnmapAllLocked(m.mu, slot, s);
    if (status.ok()) {
      status = m.mapper->RetryQuarantineLocked(m.mu, slot, s).status();
    }
    m.SetOpLocked(slot, SlotOp::kNone);
    if (!status.ok()) {
      status = absl::Status(
          status.code(),
          absl::StrFormat("ImportSlot: unmapping slot %d's earlier memory: %s",
                          slot, status.message()));
    }
  }
  if (status.ok()) {
    Slot& s = m.At(slot);
    m.active_tokens.fetch_sub(s.length(), std::memory_order_relaxed);
    s.Activate(0, 0);
    ++m.active_count;
    m.placement.OnSlotActive(slot);
    m.BooksChangedLocked(slot);
    m.PruneFencesLocked(s);
    for (; orphans_from < extents.size(); ++orphans_from) {
      const std::size_t before = s.quarantine().size();
      status = m.mapper->MapExistingLocked(m.mu, slot, s, extents[orphans_from]);
      if (!status.ok()) {
        // A failed rollback keeps the extent (and its handles) in
        // quarantine, where the release switch destroys them once unmapped.
        if (s.quarantine().size() > before) ++orphans_from;
        break;
      }
    }
    if (status.ok()) {
      m.SetLengthLocked(s, e.tokens);
      ++m.stats.imported_slots;
    } else {
      // Unmap (and so destroy) what was mapped and free the slot.
      (void)m.mapper->UnmapAllLocked(m.mu, slot, s,
                                     ExtentMapper::OnCleanFailure::kQuarantine);
      (void)m.FreeLocked(slot, std::nullopt);
      status = absl::Status(status.code(),
                            absl::StrFormat("ImportSlot: slot %d: %s", slot,
                                            status.message()));
    }
  }
  m.mu.Unlock();
  if (status.ok()) return slot;
  DestroyHandles(*m.backend,
                 absl::MakeConstSpan(extents).subspan(orphans_from));
  return status;
}

// ---------------------------------------------------------------------------
// The wire.

absl::Status SendSlotExport(int sock, const SlotExport& e,
                            absl::Span<const int> fds) {
  VATTN_RETURN_IF_ERROR(CheckSocket("SendSlot", sock));
  if (fds.size() != e.num_fds()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "SendSlot: %d descriptors given, the export needs %d", fds.size(),
        e.num_fds()));
  }
  std::vector<std::uint8_t> head(kHeaderBytes + kPieceBytes * e.extents.size(),
                                 0);
  for (std::size_t i = 0; i < sizeof(kMagic); ++i) {
    head[i] = static_cast<std::uint8_t>(kMagic[i]);
  }
  PutU32(&head[8], kSlotExportWireVersion);
  PutU32(&head[12], static_cast<std::uint32_t>(kHeaderBytes));
  PutU32(&head[16], static_cast<std::uint32_t>(e.num_layers));
  PutU32(&head[20], static_cast<std::uint32_t>(e.num_kv_heads));
  PutU32(&head[24], static_cast<std::uint32_t>(e.head_dim));
  PutU32(&head[28], static_cast<std::uint32_t>(e.dtype));
  PutU32(&head[32], static_cast<std::uint32_t>(e.layout));
  PutU32(&head[36], static_cast<std::uint32_t>(e.num_regions));
  PutU64(&head[40], static_cast<std::uint64_t>(e.granularity));
  PutU64(&head[48], static_cast<std::uint64_t>(e.tokens));
  PutU64(&head[56], e.extents.size());
  for (std::size_t i = 0; i < e.extents.size(); ++i) {
    std::uint8_t* p = &head[kHeaderBytes + kPieceBytes * i];
    PutU64(p, static_cast<std::uint64_t>(e.extents[i].offset));
    PutU64(p + 8, static_cast<std::uint64_t>(e.extents[i].bytes));
  }
  VATTN_RETURN_IF_ERROR(SendPart(sock, head.data(), head.size(), {}));
  for (std::size_t first = 0; first < fds.size(); first += kMaxFdsPerMessage) {
    const std::size_t count = std::min(kMaxFdsPerMessage, fds.size() - first);
    std::uint8_t chunk[kChunkBytes];
    PutU32(chunk, kChunkMagic);
    PutU32(chunk + 4, static_cast<std::uint32_t>(count));
    VATTN_RETURN_IF_ERROR(
        SendPart(sock, chunk, sizeof(chunk), fds.subspan(first, count)));
  }
  return absl::OkStatus();
}

absl::StatusOr<SlotExport> ReceiveSlotExport(int sock, std::vector<int>* fds) {
  VATTN_RETURN_IF_ERROR(CheckSocket("ReceiveSlot", sock));
  if (fds == nullptr) {
    return absl::InvalidArgumentError("ReceiveSlot: fds must not be null");
  }
  std::uint8_t head[kHeaderBytes];
  VATTN_RETURN_IF_ERROR(
      ReceivePart(sock, head, sizeof(head), nullptr, "the header"));
  if (std::memcmp(head, kMagic, sizeof(kMagic)) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ReceiveSlot: socket %d did not send a vattn slot export (magic "
        "\"%s\", expected \"VATTNSLT\")",
        sock, std::string(reinterpret_cast<const char*>(head), 8)));
  }
  const std::uint32_t version = GetU32(&head[8]);
  if (version != kSlotExportWireVersion || GetU32(&head[12]) != kHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ReceiveSlot: slot export wire version %d with a %d-byte header; "
        "this vattn reads version %d (%d bytes)",
        version, GetU32(&head[12]), kSlotExportWireVersion, kHeaderBytes));
  }
  SlotExport e;
  e.num_layers = static_cast<int>(GetU32(&head[16]));
  e.num_kv_heads = static_cast<int>(GetU32(&head[20]));
  e.head_dim = static_cast<int>(GetU32(&head[24]));
  e.dtype = static_cast<DType>(GetU32(&head[28]));
  e.layout = static_cast<Layout>(GetU32(&head[32]));
  e.num_regions = static_cast<int>(GetU32(&head[36]));
  e.granularity = static_cast<std::int64_t>(GetU64(&head[40]));
  e.tokens = static_cast<std::int64_t>(GetU64(&head[48]));
  const std::uint64_t extents = GetU64(&head[56]);
  const std::uint64_t regions = GetU32(&head[36]);
  if (extents > kMaxExtents || regions == 0 || regions > kMaxFds ||
      extents * regions > kMaxFds) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ReceiveSlot: the export declares %d extents x %d regions, beyond "
        "what a vattn cache sends (at most %d extents and %d descriptors)",
        extents, regions, kMaxExtents, kMaxFds));
  }
  std::vector<std::uint8_t> pieces(kPieceBytes * extents);
  if (!pieces.empty()) {
    VATTN_RETURN_IF_ERROR(ReceivePart(sock, pieces.data(), pieces.size(),
                                      nullptr, "the extents"));
  }
  e.extents.resize(extents);
  for (std::size_t i = 0; i < extents; ++i) {
    e.extents[i].offset =
        static_cast<std::int64_t>(GetU64(&pieces[kPieceBytes * i]));
    e.extents[i].bytes =
        static_cast<std::int64_t>(GetU64(&pieces[kPieceBytes * i + 8]));
  }
  const std::size_t want = e.num_fds();
  std::vector<int> got;
  got.reserve(want);
  while (got.size() < want) {
    const std::size_t expected = std::min(kMaxFdsPerMessage, want - got.size());
    std::uint8_t chunk[kChunkBytes];
    const std::size_t before = got.size();
    absl::Status s = ReceivePart(
        sock, chunk, sizeof(chunk), &got,
        absl::StrFormat("descriptor chunk %d", before / kMaxFdsPerMessage));
    if (s.ok() && (GetU32(chunk) != kChunkMagic ||
                   GetU32(chunk + 4) != expected ||
                   got.size() - before != expected)) {
      s = absl::InvalidArgumentError(absl::StrFormat(
          "ReceiveSlot: descriptor chunk %d on socket %d declares %d and "
          "carries %d descriptors (magic 0x%08x); %d expected",
          before / kMaxFdsPerMessage, sock, GetU32(chunk + 4),
          got.size() - before, GetU32(chunk), expected));
    }
    if (!s.ok()) {
      CloseAll(got);
      return s;
    }
  }
  fds->insert(fds->end(), got.begin(), got.end());
  return e;
}

absl::Status SendSlot(int sock, KVCache& cache, int slot,
                      std::int64_t tokens) {
  // The socket first: a bad one must not mark the extents exported.
  VATTN_RETURN_IF_ERROR(CheckSocket("SendSlot", sock));
  SlotExport e;
  std::vector<int> fds;
  VATTN_RETURN_IF_ERROR(cache.ExportSlot(slot, tokens, &e, &fds));
  absl::Status status = SendSlotExport(sock, e, fds);
  CloseAll(fds);
  return status;
}

absl::StatusOr<int> ReceiveSlot(int sock, KVCache& cache) {
  std::vector<int> fds;
  VATTN_ASSIGN_OR_RETURN(SlotExport e, ReceiveSlotExport(sock, &fds));
  absl::StatusOr<int> slot = cache.ImportSlot(e, fds);
  CloseAll(fds);
  return slot;
}

}  // namespace vattn
