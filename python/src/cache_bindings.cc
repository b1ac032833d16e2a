// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn.Cache (KVCache), its options, results and views. Views are DLPack
// tensors (nb::ndarray) whose owner holds a reference to the KVCache, so a
// view keeps the cache's memory alive after the Cache object is gone.
#include <climits>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "python/src/arbiter_bindings.h"
#include "python/src/bindings.h"
#include "python/src/step_batch.h"
#include "vattn/kv_cache.h"

namespace nb = nanobind;

namespace vattn::python {
namespace {

// ---- dtype and layout names --------------------------------------------------

struct DTypeName {
  const char* name;
  DType dtype;
};
constexpr DTypeName kDTypeNames[] = {
    {"float16", DType::kFloat16},      {"half", DType::kFloat16},
    {"fp16", DType::kFloat16},         {"bfloat16", DType::kBFloat16},
    {"bf16", DType::kBFloat16},        {"float32", DType::kFloat32},
    {"float", DType::kFloat32},        {"fp32", DType::kFloat32},
    {"float8_e4m3fn", DType::kFloat8E4M3}, {"fp8", DType::kFloat8E4M3},
    {"int8", DType::kInt8},
};

// The canonical name (torch's spelling) of each DType.
const char* CanonicalName(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
    case DType::kInt8: return "int8";
  }
  return "unknown";
}

// A name ("float16"), a torch.dtype (str() is "torch.float16") or a numpy
// dtype (str() is "float16").
DType DTypeFromPython(nb::handle value) {
  std::string text = nb::str(value).c_str();
  if (absl::StartsWith(text, "torch.")) text = text.substr(6);
  for (const DTypeName& n : kDTypeNames) {
    if (absl::EqualsIgnoreCase(text, n.name)) return n.dtype;
  }
  Raise(absl::StatusCode::kInvalidArgument,
        absl::StrCat("dtype '", text,
                     "' is not one of: float16, bfloat16, float32, float8_e4m3fn, "
                     "int8 (or the torch dtypes of those names)"));
}

Layout LayoutFromPython(nb::handle value) {
  std::string text = nb::str(value).c_str();
  absl::AsciiStrToLower(&text);
  if (text == "token-major" || text == "token_major") return Layout::kTokenMajor;
  if (text == "layer-major" || text == "layer_major") return Layout::kLayerMajor;
  Raise(absl::StatusCode::kInvalidArgument,
        absl::StrCat("layout '", text, "' is not one of: token-major, layer-major"));
}

const char* LayoutText(Layout layout) {
  return layout == Layout::kLayerMajor ? "layer-major" : "token-major";
}

nb::dlpack::dtype DLPackDType(DType dtype) {
  using nb::dlpack::dtype_code;
  switch (dtype) {
    case DType::kFloat16: return {static_cast<std::uint8_t>(dtype_code::Float), 16, 1};
    case DType::kBFloat16: return {static_cast<std::uint8_t>(dtype_code::Bfloat), 16, 1};
    case DType::kFloat32: return {static_cast<std::uint8_t>(dtype_code::Float), 32, 1};
    case DType::kFloat8E4M3:
      return {static_cast<std::uint8_t>(dtype_code::Float8_E4M3FN), 8, 1};
    case DType::kInt8: return {static_cast<std::uint8_t>(dtype_code::Int), 8, 1};
  }
  return {static_cast<std::uint8_t>(dtype_code::UInt), 8, 1};
}

// ---- The cache object ------------------------------------------------------

void DeleteCacheRef(void* p) noexcept {
  auto* ref = static_cast<std::shared_ptr<KVCache>*>(p);
  if (!Finalizing() && ref->use_count() == 1) {
    nb::gil_scoped_release release;
    delete ref;
  } else {
    delete ref;
  }
}

using View = nb::ndarray<nb::array_api>;

View MakeView(const std::shared_ptr<KVCache>& cache, const TensorView& t,
              std::size_t ndim, const std::size_t* shape, const std::int64_t* strides,
              void* data) {
  nb::capsule owner(new std::shared_ptr<KVCache>(cache), &DeleteCacheRef);
  const BackendCapabilities& caps = cache->backend()->capabilities();
  const bool cpu = caps.host_accessible;
  return View(data, ndim, shape, owner, strides, DLPackDType(t.dtype),
              cpu ? nb::device::cpu::value : nb::device::cuda::value,
              cpu ? 0 : caps.device);
}

// K or V of `layer`: all slots [slots, max_tokens, heads, dim], or one slot's
// backed tokens [backed_tokens, heads, dim].
View LayerView(const PyCache& self, int layer, nb::handle slot, bool keys) {
  KVCache& cache = self.Get();
  const TensorView t = keys ? cache.K(layer) : cache.V(layer);
  if (t.data == nullptr) {
    Raise(absl::StatusCode::kInvalidArgument,
          absl::StrCat("layer ", layer, " is outside [0, ", cache.options().num_layers, ")"));
  }
  if (slot.is_none()) {
    std::size_t shape[4];
    for (int i = 0; i < 4; ++i) shape[i] = static_cast<std::size_t>(t.shape[i]);
    return MakeView(self.cache, t, 4, shape, t.strides.data(), t.data);
  }
  const int s = nb::cast<int>(slot);
  absl::StatusOr<SlotInfo> info;
  {
    nb::gil_scoped_release release;
    info = cache.GetSlot(s);
  }
  if (!info.ok()) Raise(info.status());
  if (!info->active) {
    Raise(absl::StatusCode::kFailedPrecondition,
          absl::StrCat("slot ", s, " is not active (freed or never allocated)"));
  }
  const std::size_t shape[3] = {static_cast<std::size_t>(info->backed_tokens),
                                static_cast<std::size_t>(t.shape[2]),
                                static_cast<std::size_t>(t.shape[3])};
  const std::int64_t strides[3] = {t.strides[1], t.strides[2], t.strides[3]};
  return MakeView(self.cache, t, 3, shape, strides,
                  reinterpret_cast<void*>(t.ElementAddress(s, 0, 0, 0)));
}

// ---- Options -----------------------------------------------------------------

void SetOption(KVCacheOptions& o, const std::string& name, nb::handle v) {
  try {
    if (name == "dtype") { o.dtype = DTypeFromPython(v); return; }
    if (name == "layout") { o.layout = LayoutFromPython(v); return; }
    if (name == "arbiter") { o.arbiter = ArbiterFromPython(v); return; }
#define VATTN_OPTION(field)                                       \
    if (name == #field) {                                         \
      o.field = nb::cast<decltype(KVCacheOptions::field)>(v);     \
      return;                                                     \
    }
    VATTN_OPTION(num_layers)
    VATTN_OPTION(num_kv_heads)
    VATTN_OPTION(head_dim)
    VATTN_OPTION(max_slots)
    VATTN_OPTION(max_tokens)
    VATTN_OPTION(memory_budget_bytes)
    VATTN_OPTION(min_extent_bytes)
    VATTN_OPTION(max_extent_tokens)
    VATTN_OPTION(max_extent_bytes)
    VATTN_OPTION(prealloc_handles)
    VATTN_OPTION(prealloc_handle_bytes)
    VATTN_OPTION(defer_reclaim)
    VATTN_OPTION(zero_on_reuse)
    VATTN_OPTION(map_ahead_tokens)
    VATTN_OPTION(pool_low_water)
    VATTN_OPTION(pool_high_water)
    VATTN_OPTION(max_prefixes)
    VATTN_OPTION(arbiter_floor_bytes)
    VATTN_OPTION(arbiter_cap_bytes)
    VATTN_OPTION(arbiter_name)
#undef VATTN_OPTION
  } catch (const nb::cast_error&) {
    Raise(absl::StatusCode::kInvalidArgument,
          absl::StrCat("option ", name, "=", nb::repr(v).c_str(),
                       " does not convert to the field's type"));
  }
  Raise(absl::StatusCode::kInvalidArgument,
        absl::StrCat("unknown option '", name, "' (KVCacheOptions has no such field)"));
}

nb::dict OptionsToDict(const KVCacheOptions& o) {
  nb::dict d;
  d["num_layers"] = o.num_layers;
  d["num_kv_heads"] = o.num_kv_heads;
  d["head_dim"] = o.head_dim;
  d["dtype"] = CanonicalName(o.dtype);
  d["max_slots"] = o.max_slots;
  d["max_tokens"] = o.max_tokens;
  d["layout"] = LayoutText(o.layout);
  d["memory_budget_bytes"] = o.memory_budget_bytes;
  d["min_extent_bytes"] = o.min_extent_bytes;
  d["max_extent_tokens"] = o.max_extent_tokens;
  d["max_extent_bytes"] = o.max_extent_bytes;
  d["prealloc_handles"] = o.prealloc_handles;
  d["prealloc_handle_bytes"] = o.prealloc_handle_bytes;
  d["defer_reclaim"] = o.defer_reclaim;
  d["zero_on_reuse"] = o.zero_on_reuse;
  d["map_ahead_tokens"] = o.map_ahead_tokens;
  d["pool_low_water"] = o.pool_low_water;
  d["pool_high_water"] = o.pool_high_water;
  d["max_prefixes"] = o.max_prefixes;
  d["arbiter_floor_bytes"] = o.arbiter_floor_bytes;
  d["arbiter_cap_bytes"] = o.arbiter_cap_bytes;
  d["arbiter_name"] = o.arbiter_name;
  return d;
}

template <typename F>
absl::Status Unlocked(F&& f) {
  nb::gil_scoped_release release;
  return f();
}

}  // namespace

void BindCache(nb::module_& m) {
  nb::class_<StepResult>(m, "StepResult", "What one step cost the caller.")
      .def_ro("misses", &StepResult::misses, "Slots step had to map on the caller's thread.")
      .def_ro("map_nanos", &StepResult::map_nanos,
              "Time spent mapping (or waiting for the background thread).")
      .def("__repr__", [](const StepResult& r) {
        return absl::StrCat("StepResult(misses=", r.misses, ", map_nanos=", r.map_nanos, ")");
      });

  nb::class_<SlotInfo>(m, "SlotInfo", "A snapshot of one slot.")
      .def_ro("active", &SlotInfo::active)
      .def_ro("length", &SlotInfo::length, "Logical tokens.")
      .def_ro("backed_tokens", &SlotInfo::backed_tokens, "Tokens that may be touched.")
      .def_ro("mapped_bytes", &SlotInfo::mapped_bytes, "Physical bytes mapped, all tensors.")
      .def_ro("adopted_bytes", &SlotInfo::adopted_bytes)
      .def_ro("extents", &SlotInfo::extents)
      .def("__repr__", [](const SlotInfo& s) {
        return absl::StrCat("SlotInfo(active=", s.active ? "True" : "False",
                            ", length=", s.length, ", backed_tokens=", s.backed_tokens,
                            ", mapped_bytes=", s.mapped_bytes, ", adopted_bytes=",
                            s.adopted_bytes, ", extents=", s.extents, ")");
      });

  auto stats = nb::class_<CacheStats>(
      m, "CacheStats", "A snapshot of a cache's memory and driver activity (CacheStats' fields).");
#define VATTN_STAT(field) stats.def_ro(#field, &CacheStats::field);
  VATTN_STAT(physical_bytes) VATTN_STAT(pooled_bytes) VATTN_STAT(mapped_bytes)
  VATTN_STAT(surplus_bytes) VATTN_STAT(logical_bytes) VATTN_STAT(budget_bytes)
  VATTN_STAT(peak_physical_bytes) VATTN_STAT(active_slots)
  VATTN_STAT(idle_slots_with_memory) VATTN_STAT(create_calls) VATTN_STAT(destroy_calls)
  VATTN_STAT(map_calls) VATTN_STAT(unmap_calls) VATTN_STAT(grow_calls)
  VATTN_STAT(extents_mapped) VATTN_STAT(reuse_hits) VATTN_STAT(adopted_extents)
  VATTN_STAT(reclaimed_bytes) VATTN_STAT(reclaimed_extents) VATTN_STAT(fence_waits)
  VATTN_STAT(zeroed_bytes) VATTN_STAT(quarantined_extents) VATTN_STAT(quarantined_bytes)
  VATTN_STAT(background_failures) VATTN_STAT(step_calls) VATTN_STAT(step_misses)
  VATTN_STAT(step_map_nanos) VATTN_STAT(background_extents) VATTN_STAT(background_creates)
  VATTN_STAT(background_wakeups) VATTN_STAT(background_deadline_wakeups)
  VATTN_STAT(background_caller_wakeups)
  VATTN_STAT(exported_bytes) VATTN_STAT(imported_bytes) VATTN_STAT(exported_slots)
  VATTN_STAT(imported_slots)
  VATTN_STAT(shared_bytes) VATTN_STAT(shared_saved_bytes) VATTN_STAT(cached_prefixes)
  VATTN_STAT(cached_prefix_bytes) VATTN_STAT(prefix_hits) VATTN_STAT(forks)
  VATTN_STAT(prefix_evictions) VATTN_STAT(cow_copied_bytes) VATTN_STAT(copy_calls)
  VATTN_STAT(set_access_calls)
#undef VATTN_STAT
  stats.def("__str__", &CacheStats::ToString)
      .def("__repr__", [](const CacheStats& s) {
        return absl::StrCat("CacheStats(physical_bytes=", s.physical_bytes,
                            ", mapped_bytes=", s.mapped_bytes, ", logical_bytes=",
                            s.logical_bytes, ", active_slots=", s.active_slots,
                            ", step_calls=", s.step_calls, ", step_misses=", s.step_misses, ")");
      });

  nb::class_<TensorView>(
      m, "TensorView",
      "The C++ view (KVCache::K/V) behind a DLPack export: address, dtype, "
      "shape and strides in elements.")
      .def_prop_ro("data", [](const TensorView& t) { return reinterpret_cast<std::uintptr_t>(t.data); })
      .def_prop_ro("dtype", [](const TensorView& t) { return CanonicalName(t.dtype); })
      .def_prop_ro("itemsize", [](const TensorView& t) { return DTypeSize(t.dtype); })
      .def_prop_ro("shape", [](const TensorView& t) {
        return nb::make_tuple(t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
      })
      .def_prop_ro("strides", [](const TensorView& t) {
        return nb::make_tuple(t.strides[0], t.strides[1], t.strides[2], t.strides[3]);
      })
      .def("element_address", &TensorView::ElementAddress, nb::arg("slot"), nb::arg("token"),
           nb::arg("head"), nb::arg("dim"), "Address of element (slot, token, head, dim).");

  nb::class_<PyCache> cache_class = nb::class_<PyCache>(
      m, "Cache",
      "A KV cache in contiguous virtual memory (vattn::KVCache). Every "
      "method is thread-safe and releases the GIL while it may map, unmap, "
      "zero or wait. Views (k, v) are zero-copy DLPack tensors that keep the "
      "cache's memory alive.")
      .def(
          "__init__",
          [](PyCache* self, nb::handle backend, nb::kwargs kwargs) {
            if (backend.is_none() && kwargs.contains("arbiter") &&
                !kwargs["arbiter"].is_none()) {
              backend = kwargs["arbiter"].attr("backend");  // Caches must share it.
            }
            if (backend.is_none()) {
              backend = nb::module_::import_("vattn").attr("default_backend")();
            }
            PyBackend* b = nullptr;
            if (!nb::try_cast(backend, b) || b == nullptr) {
              throw nb::type_error("backend must be a vattn.Backend (HostBackend(), CudaBackend(device), ...)");
            }
            std::shared_ptr<Backend> shared = b->backend;
            KVCacheOptions o;
            for (auto [key, value] : kwargs) {
              SetOption(o, nb::cast<std::string>(key), value);
            }
            absl::StatusOr<std::unique_ptr<KVCache>> made;
            {
              nb::gil_scoped_release release;
              made = KVCache::Create(o, std::move(shared));
            }
            std::unique_ptr<KVCache> cache = ValueOrRaise(std::move(made));
            new (self) PyCache{std::shared_ptr<KVCache>(std::move(cache))};
          },
          nb::arg("backend").none() = nb::none(), nb::arg("options"),
          "Cache(backend=None, **options): options are KVCacheOptions' fields "
          "by name (num_layers, num_kv_heads, head_dim, dtype, max_slots, "
          "max_tokens, layout, memory_budget_bytes, map_ahead_tokens, ...); "
          "dtype is a torch dtype or a name ('float16', 'bfloat16', "
          "'float32', 'float8_e4m3fn', 'int8'); layout 'token-major' or "
          "'layer-major'. backend None: vattn.default_backend(). "
          "InvalidArgumentError names a bad option.")
      .def(
          "alloc_slot",
          [](PyCache& self, std::int64_t expected_tokens) {
            KVCache& c = self.Get();
            absl::StatusOr<int> slot;
            {
              nb::gil_scoped_release release;
              slot = c.AllocSlot(expected_tokens);
            }
            return ValueOrRaise(std::move(slot));
          },
          nb::arg("expected_tokens") = 0,
          "Takes a free slot (length 0). InvalidArgumentError: negative hint; "
          "OutOfRangeError: above max_tokens; ResourceExhaustedError: every "
          "slot is active. With zero_on_reuse the reused memory is zeroed here.")
      .def(
          "grow",
          [](PyCache& self, int slot, std::int64_t tokens) {
            KVCache& c = self.Get();
            ThrowIfError(Unlocked([&] { return c.Grow(slot, tokens); }));
          },
          nb::arg("slot"), nb::arg("tokens"),
          "Backs tokens [0, tokens) and sets length = max(length, tokens). "
          "InvalidArgumentError: bad slot or tokens < 0; OutOfRangeError: "
          "tokens > max_tokens; FailedPreconditionError: slot not active; "
          "ResourceExhaustedError: over budget (the slot is unchanged).")
      .def(
          "shrink",
          [](PyCache& self, int slot, std::int64_t tokens) {
            KVCache& c = self.Get();
            ThrowIfError(Unlocked([&] { return c.Shrink(slot, tokens); }));
          },
          nb::arg("slot"), nb::arg("tokens"),
          "Lowers the length; unmaps nothing. InvalidArgumentError: bad slot, "
          "tokens < 0 or above the length; FailedPreconditionError: not active.")
      .def(
          "free",
          [](PyCache& self, int slot, nb::handle stream, bool fence) {
            KVCache& c = self.Get();
            if (!fence) {
              if (!stream.is_none()) {
                throw nb::type_error("free(slot, stream, fence=False): a stream means a fence");
              }
              ThrowIfError(Unlocked([&] { return c.Free(slot, kNoFence); }));
              return;
            }
            const std::optional<Stream> s = StreamFromPython(stream);
            ThrowIfError(Unlocked([&] { return c.Free(slot, s); }));
          },
          nb::arg("slot"), nb::arg("stream").none() = nb::none(), nb::kw_only(),
          nb::arg("fence") = true,
          "Ends the slot's request; its memory stays mapped for the next one. "
          "On CUDA, `stream` (a torch.cuda.Stream or a raw CUstream int) is "
          "the stream whose queued work may still read the slot: a fence is "
          "recorded on it and the memory is never unmapped before that work "
          "is done. None: the legacy default stream (KVCache::Free(slot)), which "
          "covers the blocking streams of the context. fence=False "
          "(KVCache::Free(slot, kNoFence)) records none, for callers that "
          "synchronised themselves: the memory may be unmapped at once. "
          "InvalidArgumentError: bad slot; FailedPreconditionError: not active.")
      .def(
          "step",
          [](PyCache& self, nb::handle batch, nb::handle tokens) {
            KVCache& c = self.Get();
            thread_local std::vector<StepRequest> requests;
            PyStepBatch* prepared = nullptr;
            absl::Span<const StepRequest> span;
            if (!tokens.is_none()) {
              StepRequestsFromArrays(batch, tokens, requests);
              span = requests;
            } else if (!PyList_Check(batch.ptr()) && !PyTuple_Check(batch.ptr()) &&
                       nb::try_cast(batch, prepared) && prepared != nullptr) {
              span = prepared->requests;  // No conversion: Step reads it.
            } else {
              StepRequestsFromPairs(batch, requests);
              span = requests;
            }
            absl::StatusOr<StepResult> r;
            {
              nb::gil_scoped_release release;
              r = c.Step(span);
            }
            return ValueOrRaise(std::move(r));
          },
          nb::arg("batch"), nb::arg("tokens").none() = nb::none(),
          "step([(slot, tokens), ...]), step(slots, tokens) with two 1-D CPU "
          "integer arrays, or step(StepBatch): every slot is backed to, and has its length set "
          "to, its tokens. Errors as grow's, for the first failing request "
          "(requests before it stay grown). Returns StepResult.")
      .def("k", [](const PyCache& self, int layer, nb::handle slot) {
             return LayerView(self, layer, slot, /*keys=*/true);
           },
           nb::arg("layer"), nb::arg("slot").none() = nb::none(),
           "Layer `layer`'s keys as a zero-copy DLPack tensor: "
           "[max_slots, max_tokens, num_kv_heads, head_dim] (strided), or with "
           "`slot` that slot's backed tokens [backed_tokens, heads, dim]. Only "
           "backed tokens may be touched. InvalidArgumentError: bad layer or "
           "slot; FailedPreconditionError: the slot is not active.")
      .def("v", [](const PyCache& self, int layer, nb::handle slot) {
             return LayerView(self, layer, slot, /*keys=*/false);
           },
           nb::arg("layer"), nb::arg("slot").none() = nb::none(), "As k, for the values.")
      .def("k_view", [](const PyCache& self, int layer) { return self.Get().K(layer); },
           nb::arg("layer"), "The C++ TensorView of K(layer) (data is 0 for a bad layer).")
      .def("v_view", [](const PyCache& self, int layer) { return self.Get().V(layer); },
           nb::arg("layer"), "The C++ TensorView of V(layer).")
      .def("stats", [](const PyCache& self) {
             KVCache& c = self.Get();
             nb::gil_scoped_release release;
             return c.Stats();
           }, "CacheStats now.")
      .def(
          "slot_info",
          [](const PyCache& self, int slot) {
            KVCache& c = self.Get();
            absl::StatusOr<SlotInfo> info;
            {
              nb::gil_scoped_release release;
              info = c.GetSlot(slot);
            }
            return ValueOrRaise(std::move(info));
          },
          nb::arg("slot"), "SlotInfo of a slot. InvalidArgumentError: bad slot.")
      .def(
          "slot_ranges",
          [](const PyCache& self, int slot, std::int64_t tokens) {
            KVCache& c = self.Get();
            absl::StatusOr<std::vector<MemoryRange>> ranges;
            {
              nb::gil_scoped_release release;
              ranges = c.SlotRanges(slot, tokens);
            }
            nb::list out;
            for (const MemoryRange& r : ValueOrRaise(std::move(ranges))) {
              out.append(nb::make_tuple(static_cast<std::uint64_t>(r.address), r.bytes));
            }
            return out;
          },
          nb::arg("slot"), nb::arg("tokens"),
          "[(address, bytes), ...]: the virtual ranges holding tokens [0, tokens) "
          "of the slot, for a transfer engine (KVCache::SlotRanges): one range "
          "in token-major, 2 x num_layers in layer-major (K of layer 0, V of "
          "layer 0, K of layer 1, ...); [] for tokens == 0. Addresses never "
          "move for the cache's life. InvalidArgumentError: bad slot or "
          "tokens < 0; FailedPreconditionError: slot not active; "
          "OutOfRangeError: tokens above the slot's backed tokens.")
      .def(
          "reservation",
          [](const PyCache& self) {
            const MemoryRange r = self.Get().Reservation();
            return nb::make_tuple(static_cast<std::uint64_t>(r.address), r.bytes);
          },
          "(address, bytes) of the cache's whole virtual reservation; it never "
          "moves for the cache's life (KVCache::Reservation). Register it once "
          "with a transport that needs no pinned pages (see README, Scale-out).")
      .def("wait_for_background_idle",
           [](PyCache& self) {
             KVCache& c = self.Get();
             ThrowIfError(Unlocked([&] { return c.WaitForBackgroundIdle(); }));
           },
           "Blocks until the map-ahead thread is idle; raises its sticky error.")
      .def_prop_ro("options", [](const PyCache& self) { return OptionsToDict(self.Get().options()); },
                   "The options as a dict (dtype and layout as names).")
      .def_prop_ro("backend", [](const PyCache& self) { return PyBackend{self.Get().backend()}; })
      .def_prop_ro("bytes_per_token", [](const PyCache& self) { return self.Get().bytes_per_token(); },
                   "Bytes of K and V, all layers, of one token.")
      .def_prop_ro("num_layers", [](const PyCache& self) { return self.Get().options().num_layers; })
      .def_prop_ro("max_slots", [](const PyCache& self) { return self.Get().options().max_slots; })
      .def_prop_ro("max_tokens", [](const PyCache& self) { return self.Get().options().max_tokens; })
      .def_prop_ro("dtype", [](const PyCache& self) { return CanonicalName(self.Get().options().dtype); })
      .def_prop_ro("layout", [](const PyCache& self) { return LayoutText(self.Get().options().layout); })
      .def_prop_ro("device", [](const PyCache& self) {
        const BackendCapabilities& caps = self.Get().backend()->capabilities();
        return caps.host_accessible ? std::string("cpu") : absl::StrCat("cuda:", caps.device);
      }, "Where views live, as torch spells it: 'cpu' or 'cuda:N'.")
      .def_prop_ro("closed", [](const PyCache& self) { return self.cache == nullptr; })
      .def("close", &PyCache::Close,
           "Drops this object's reference to the cache (views keep theirs); "
           "later calls raise FailedPreconditionError.")
      .def("__enter__", [](nb::handle self) { return nb::borrow(self); })
      .def("__exit__", [](PyCache& self, nb::args) { self.Close(); });
  // Methods defined in the other translation units go here, one call each.
  BindPrefix(m, cache_class);
  static_cast<void>(cache_class);
}

}  // namespace vattn::python
