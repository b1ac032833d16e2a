// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn.send_slot / vattn.receive_slot: zero-copy handoff of a slot to
// another process over a Unix socket (vattn/slot_export.h). Thin: the descriptor of the socket, the GIL released around every call
// that may block or make driver calls, errors as vattn.Error.
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "python/src/bindings.h"
#include "python/src/errors.h"
#include "vattn/kv_cache.h"
#include "vattn/slot_export.h"

namespace nb = nanobind;

namespace vattn::python {
namespace {

// A socket.socket (anything with fileno()) or a plain descriptor number.
int SocketFd(nb::handle sock) {
  if (PyLong_Check(sock.ptr())) return nb::cast<int>(sock);
  if (!nb::hasattr(sock, "fileno")) {
    throw nb::type_error(
        "sock must be a connected socket.socket(AF_UNIX, SOCK_STREAM) or its "
        "file descriptor (an int)");
  }
  return nb::cast<int>(sock.attr("fileno")());
}

// The cache to use with the GIL released: a reference that keeps it alive
// even if another thread closes the Python object meanwhile.
std::shared_ptr<KVCache> Keep(const PyCache& cache) {
  cache.Get();  // Raises FailedPreconditionError for a closed cache.
  return cache.cache;
}

}  // namespace

void BindExport(nb::module_& m) {
  m.def(
      "send_slot",
      [](nb::handle sock, const PyCache& cache, int slot, std::int64_t tokens) {
        const int fd = SocketFd(sock);
        std::shared_ptr<KVCache> keep = Keep(cache);
        absl::Status status;
        {
          nb::gil_scoped_release release;
          status = SendSlot(fd, *keep, slot, tokens);
        }
        if (!status.ok()) Raise(status);
      },
      nb::arg("sock"), nb::arg("cache"), nb::arg("slot"), nb::arg("tokens"),
      "Exports tokens [0, tokens) of `slot` of `cache` to the process at the "
      "other end of `sock` (a connected socket.socket(AF_UNIX, SOCK_STREAM), "
      "or its descriptor), which calls vattn.receive_slot: no bytes are "
      "copied, the peer maps the same memory. The cache's backend must be "
      "made with exportable_handles=True. Afterwards the exported extents "
      "never back another request of this cache: free the slot once sent "
      "(the peer keeps the memory alive) and write none of its tokens. "
      "Blocks until the message is written; the GIL is released. Raises "
      "InvalidArgumentError (bad slot, tokens, or socket), "
      "FailedPreconditionError (slot not active, backend not exportable), "
      "OutOfRangeError (tokens above what the slot backs), "
      "UnavailableError (the peer has gone).");
  m.def(
      "receive_slot",
      [](nb::handle sock, const PyCache& cache) {
        const int fd = SocketFd(sock);
        std::shared_ptr<KVCache> keep = Keep(cache);
        absl::StatusOr<int> slot;
        {
          nb::gil_scoped_release release;
          slot = ReceiveSlot(fd, *keep);
        }
        return ValueOrRaise(std::move(slot));
      },
      nb::arg("sock"), nb::arg("cache"),
      "Receives one vattn.send_slot message from `sock` and imports it into a "
      "free slot of `cache` (same shape as the sender's: layers, heads, "
      "head_dim, dtype, layout, granularity); returns the slot, whose length "
      "is the sender's `tokens`. The slot maps the sender's memory (counted "
      "in stats().imported_bytes, not in physical_bytes nor the budget) and "
      "grows past it with memory of its own; free() releases the imported "
      "memory at once. Every descriptor received is closed before it "
      "returns. Blocks until a whole message has arrived; the GIL is "
      "released. Raises InvalidArgumentError (another shape, a descriptor "
      "that is not an export, a message that is not a slot export), "
      "ResourceExhaustedError (no free slot), DataLossError (the message was "
      "cut short). Nothing is imported on error.");
}

}  // namespace vattn::python
