// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Prefix sharing on vattn.Cache (KVCache::KeepPrefix, AllocSlotWithPrefix,
// DropPrefix, Fork, GetPrefix and the split hints of AllocSlot and Grow):
// conversion, the GIL released around every call (they may map, copy or
// change access), errors as the module's other calls (NotFoundError for an
// unknown id, AlreadyExistsError for a used one, ...).
#include <cstdint>
#include <optional>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "absl/strings/str_cat.h"
#include "python/src/bindings.h"
#include "vattn/kv_cache.h"

namespace nb = nanobind;

namespace vattn::python {

void BindPrefix(nb::module_& m, nb::class_<PyCache>& cache_class) {
  nb::class_<PrefixInfo>(m, "PrefixInfo", "A snapshot of one cached prefix (Cache.prefix_info).")
      .def_ro("tokens", &PrefixInfo::tokens)
      .def_ro("bytes", &PrefixInfo::bytes, "Physical bytes it keeps, all tensors.")
      .def_ro("tail_bytes", &PrefixInfo::tail_bytes, "Of which its copied tail.")
      .def_ro("whole_extents", &PrefixInfo::whole_extents,
              "Extents aliased by every request using it.")
      .def_ro("users", &PrefixInfo::users, "Active slots sharing its memory now.")
      .def_ro("hits", &PrefixInfo::hits, "Requests started from it.")
      .def("__repr__", [](const PrefixInfo& p) {
        return absl::StrCat("PrefixInfo(tokens=", p.tokens, ", bytes=", p.bytes,
                            ", tail_bytes=", p.tail_bytes, ", whole_extents=",
                            p.whole_extents, ", users=", p.users, ", hits=", p.hits, ")");
      });

  cache_class
      .def(
          "keep_prefix",
          [](PyCache& self, int slot, std::int64_t tokens, std::uint64_t prefix_id,
             nb::handle stream) {
            KVCache& c = self.Get();
            const std::optional<Stream> s = StreamFromPython(stream);
            absl::Status status;
            {
              nb::gil_scoped_release release;
              status = s ? c.KeepPrefix(slot, tokens, prefix_id, *s)
                         : c.KeepPrefix(slot, tokens, prefix_id);
            }
            ThrowIfError(status);
          },
          nb::arg("slot"), nb::arg("tokens"), nb::arg("prefix_id"),
          nb::arg("stream").none() = nb::none(),
          "Keeps tokens [0, tokens) of an active slot as the cached prefix "
          "`prefix_id` (an int in [0, 2**64)), which outlives the request "
          "(KVCache::KeepPrefix). The slot's extents inside the prefix turn "
          "read-only in the slot too (write the tokens first); the partly "
          "shared tail is copied once, after the work queued on `stream` "
          "(CUDA; None: the legacy default stream). AlreadyExistsError: the id "
          "is cached already; InvalidArgumentError: bad slot or tokens < 1; "
          "OutOfRangeError: tokens above the slot's length; "
          "FailedPreconditionError: slot not active; ResourceExhaustedError: "
          "no memory for the tail, or max_prefixes cached and none evictable.")
      .def(
          "alloc_slot_with_prefix",
          [](PyCache& self, std::uint64_t prefix_id, std::int64_t tokens,
             std::int64_t expected_tokens, nb::handle stream) {
            KVCache& c = self.Get();
            const std::optional<Stream> s = StreamFromPython(stream);
            absl::StatusOr<int> slot;
            {
              nb::gil_scoped_release release;
              slot = s ? c.AllocSlotWithPrefix(prefix_id, tokens, expected_tokens, *s)
                       : c.AllocSlotWithPrefix(prefix_id, tokens, expected_tokens);
            }
            return ValueOrRaise(std::move(slot));
          },
          nb::arg("prefix_id"), nb::arg("tokens"), nb::arg("expected_tokens") = 0,
          nb::arg("stream").none() = nb::none(),
          "Starts a request whose first `tokens` tokens (up to the prefix's "
          "length) are the prefix's, with length `tokens`; returns its slot "
          "(KVCache::AllocSlotWithPrefix). Its views read the prefix as their "
          "own, read-only; it is backed to max(tokens, expected_tokens) and "
          "the tokens past the prefix are the caller's to prefill. "
          "NotFoundError: no cached prefix has this id (never kept, dropped "
          "or evicted); InvalidArgumentError: tokens < 1 or expected_tokens < "
          "0; OutOfRangeError: above max_tokens; ResourceExhaustedError: "
          "every slot active, or no memory for the tail.")
      .def(
          "drop_prefix",
          [](PyCache& self, std::uint64_t prefix_id) {
            KVCache& c = self.Get();
            absl::Status status;
            {
              nb::gil_scoped_release release;
              status = c.DropPrefix(prefix_id);
            }
            ThrowIfError(status);
          },
          nb::arg("prefix_id"),
          "Forgets a cached prefix; slots sharing its memory keep it "
          "(KVCache::DropPrefix). NotFoundError: no cached prefix has this id.")
      .def(
          "fork",
          [](PyCache& self, int slot, nb::handle stream) {
            KVCache& c = self.Get();
            const std::optional<Stream> s = StreamFromPython(stream);
            absl::StatusOr<int> child;
            {
              nb::gil_scoped_release release;
              child = s ? c.Fork(slot, *s) : c.Fork(slot);
            }
            return ValueOrRaise(std::move(child));
          },
          nb::arg("slot"), nb::arg("stream").none() = nb::none(),
          "Starts a request sharing every token of an active one (parallel "
          "sampling, beam search) and returns its slot (KVCache::Fork): the "
          "same length, the whole extents shared read-only by both, the "
          "partly filled last one copied. InvalidArgumentError: bad slot; "
          "FailedPreconditionError: not active; ResourceExhaustedError: no "
          "slot or memory.")
      .def(
          "prefix_info",
          [](const PyCache& self, std::uint64_t prefix_id) {
            KVCache& c = self.Get();
            absl::StatusOr<PrefixInfo> info;
            {
              nb::gil_scoped_release release;
              info = c.GetPrefix(prefix_id);
            }
            return ValueOrRaise(std::move(info));
          },
          nb::arg("prefix_id"),
          "PrefixInfo of a cached prefix. NotFoundError: unknown id.")
      // The prefix-boundary hints: overloads of alloc_slot and grow with a
      // split_at_tokens argument.
      .def(
          "alloc_slot",
          [](PyCache& self, std::int64_t expected_tokens, std::int64_t split_at_tokens) {
            KVCache& c = self.Get();
            absl::StatusOr<int> slot;
            {
              nb::gil_scoped_release release;
              slot = c.AllocSlot(expected_tokens, split_at_tokens);
            }
            return ValueOrRaise(std::move(slot));
          },
          nb::arg("expected_tokens"), nb::arg("split_at_tokens"),
          "alloc_slot(expected_tokens, split_at_tokens): with the prompt's "
          "prefix boundary (e.g. the system prompt's length; 0: none), mapped "
          "as its own extent (rounded down to the granularity) so "
          "keep_prefix can share it whole; one more map per request when the "
          "boundary is not the first extent's end anyway. Errors as "
          "alloc_slot's; InvalidArgumentError for split_at_tokens < 0.")
      .def(
          "grow",
          [](PyCache& self, int slot, std::int64_t tokens, std::int64_t split_at_tokens) {
            KVCache& c = self.Get();
            absl::Status status;
            {
              nb::gil_scoped_release release;
              status = c.Grow(slot, tokens, split_at_tokens);
            }
            ThrowIfError(status);
          },
          nb::arg("slot"), nb::arg("tokens"), nb::arg("split_at_tokens"),
          "grow(slot, tokens, split_at_tokens): grow, setting the slot's "
          "prefix boundary first (see alloc_slot's split_at_tokens).");
}

}  // namespace vattn::python
