// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn.Backend and its factories: HostBackend, CudaBackend,
// LatencyModelBackend, FaultInjectionBackend; cuda_device_count().
#include <cstdint>
#include <cstring>
#include <string>

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "python/src/bindings.h"

namespace nb = nanobind;

namespace vattn::python {
namespace {

struct PyHostBackend : PyBackend {};
struct PyCudaBackend : PyBackend {};
struct PyLatencyModelBackend : PyBackend {};
struct PyFaultInjectionBackend : PyBackend {
  FaultInjectionBackend* faults() const {
    return static_cast<FaultInjectionBackend*>(backend.get());
  }
};

// "map", "Map", "MAP" -> BackendOp::kMap; None -> every op.
std::optional<BackendOp> OpFromName(const std::optional<std::string>& name) {
  if (!name) return std::nullopt;
  std::string names;
  for (int i = 0; i < kNumBackendOps; ++i) {
    const auto op = static_cast<BackendOp>(i);
    if (absl::EqualsIgnoreCase(*name, BackendOpName(op))) return op;
    absl::StrAppend(&names, i ? ", " : "", absl::AsciiStrToLower(BackendOpName(op)));
  }
  Raise(absl::StatusCode::kInvalidArgument,
        absl::StrCat("op '", *name, "' is not one of: ", names, " (or None)"));
}

// "internal", "RESOURCE_EXHAUSTED", ... -> the absl code (not OK).
absl::StatusCode CodeFromName(const std::string& name) {
  for (int i = 1; i <= 16; ++i) {
    const auto code = static_cast<absl::StatusCode>(i);
    if (absl::EqualsIgnoreCase(name, absl::StatusCodeToString(code))) return code;
  }
  Raise(absl::StatusCode::kInvalidArgument,
        absl::StrCat("code '", name,
                     "' is not an absl status code name (e.g. 'internal', "
                     "'resource_exhausted')"));
}

LatencyCosts CostsFromName(const std::string& name) {
  if (absl::EqualsIgnoreCase(name, "h200")) return LatencyCosts::H200();
  if (absl::EqualsIgnoreCase(name, "h100")) return LatencyCosts::H100();
  if (absl::EqualsIgnoreCase(name, "zero")) return LatencyCosts::Zero();
  Raise(absl::StatusCode::kInvalidArgument,
        absl::StrCat("costs '", name, "' is not one of: h200, h100, zero"));
}

const std::shared_ptr<Backend>& Inner(const PyBackend* inner) {
  if (inner == nullptr || inner->backend == nullptr) {
    Raise(absl::StatusCode::kInvalidArgument, "inner backend is None");
  }
  return inner->backend;
}

nb::dict CountersToDict(const BackendCounters& c) {
  nb::dict calls;
  for (int i = 0; i < kNumBackendOps; ++i) {
    calls[nb::str(absl::AsciiStrToLower(BackendOpName(static_cast<BackendOp>(i))).c_str())] =
        c.calls[static_cast<std::size_t>(i)];
  }
  nb::dict d;
  d["reservations"] = c.reservations;
  d["reserved_bytes"] = c.reserved_bytes;
  d["handles"] = c.handles;
  d["physical_bytes"] = c.physical_bytes;
  d["imported_bytes"] = c.imported_bytes;
  d["mappings"] = c.mappings;
  d["mapped_bytes"] = c.mapped_bytes;
  d["fences"] = c.fences;
  d["calls"] = calls;
  d["failed_calls"] = c.failed_calls;
  d["empty"] = c.Empty();
  return d;
}

}  // namespace

std::optional<Stream> StreamFromPython(nb::handle stream) {
  if (stream.is_none()) return std::nullopt;
  nb::handle value = stream;
  nb::object attr;
  if (!PyLong_Check(stream.ptr())) {
    if (!nb::hasattr(stream, "cuda_stream")) {
      throw nb::type_error(
          "stream must be None, an int (a raw CUstream handle) or an object "
          "with a cuda_stream attribute (torch.cuda.Stream)");
    }
    attr = stream.attr("cuda_stream");
    value = attr;
  }
  const unsigned long long raw = PyLong_AsUnsignedLongLong(value.ptr());
  if (raw == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw nb::type_error("stream handle must be a non-negative int that fits a pointer");
  }
  return StreamFromHandle(reinterpret_cast<void*>(static_cast<std::uintptr_t>(raw)));
}

void BindBackends(nb::module_& m) {
  nb::class_<PyBackend>(
      m, "Backend",
      "A physical-memory backend (shared by every cache built on it). "
      "Thread-safe. Made by HostBackend(), CudaBackend(device), "
      "LatencyModelBackend(inner) or FaultInjectionBackend(inner).")
      .def_prop_ro("name", [](const PyBackend& b) { return b.backend->capabilities().name; })
      .def_prop_ro("device", [](const PyBackend& b) { return b.backend->capabilities().device; },
                   "CUDA device ordinal; -1 for the host.")
      .def_prop_ro("granularity", [](const PyBackend& b) { return b.backend->granularity(); })
      .def_prop_ro("max_reservation_bytes",
                   [](const PyBackend& b) { return b.backend->capabilities().max_reservation_bytes; })
      .def_prop_ro("physical_memory_bytes",
                   [](const PyBackend& b) { return b.backend->capabilities().physical_memory_bytes; })
      .def_prop_ro("host_accessible",
                   [](const PyBackend& b) { return b.backend->capabilities().host_accessible; },
                   "Addresses may be read on the CPU (views are DLPack CPU tensors).")
      .def_prop_ro("has_streams",
                   [](const PyBackend& b) { return b.backend->capabilities().has_streams; })
      .def_prop_ro("exportable",
                   [](const PyBackend& b) { return b.backend->capabilities().exportable; },
                   "Handles can be handed to another process (made with "
                   "exportable_handles=True; see vattn.send_slot).")
      .def("counters", [](const PyBackend& b) { return CountersToDict(b.backend->counters()); },
           "Live objects and call counts as a dict (BackendCounters' fields; "
           "'calls' maps each op to its successful calls).")
      .def(
          "copy_to_device",
          [](const PyBackend& b, std::uintptr_t address, nb::handle data) {
            Py_buffer view;
            if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) {
              throw nb::python_error();
            }
            absl::Status s;
            {
              nb::gil_scoped_release release;
              s = b.backend->CopyToDevice(address, view.buf,
                                          static_cast<std::size_t>(view.len));
            }
            PyBuffer_Release(&view);
            ThrowIfError(s);
          },
          nb::arg("address"), nb::arg("data"),
          "Copies a bytes-like object to mapped memory at `address` "
          "(synchronous). InvalidArgumentError: a byte of the range is not mapped.")
      .def(
          "copy_from_device",
          [](const PyBackend& b, std::uintptr_t address, std::size_t nbytes) {
            std::string out(nbytes, '\0');
            absl::Status s;
            {
              nb::gil_scoped_release release;
              s = b.backend->CopyFromDevice(out.data(), address, nbytes);
            }
            ThrowIfError(s);
            return nb::bytes(out.data(), out.size());
          },
          nb::arg("address"), nb::arg("nbytes"),
          "Reads `nbytes` of mapped memory at `address` into bytes "
          "(synchronous). InvalidArgumentError: a byte is not mapped.")
      .def(
          "zero",
          [](const PyBackend& b, std::uintptr_t address, std::size_t nbytes) {
            absl::Status s;
            {
              nb::gil_scoped_release release;
              s = b.backend->Zero(address, nbytes);
            }
            ThrowIfError(s);
          },
          nb::arg("address"), nb::arg("nbytes"), "Zeroes mapped memory (synchronous).")
      .def("__repr__", [](const PyBackend& b) {
        return absl::StrCat("vattn.Backend('", b.backend->capabilities().name, "')");
      });

  nb::class_<PyHostBackend, PyBackend>(
      m, "HostBackend",
      "CPU memory with the GPU path's semantics (mmap reservations, memfd "
      "handles). Views are DLPack CPU tensors.")
      .def(
          "__init__",
          [](PyHostBackend* self, std::size_t granularity, std::size_t physical_limit_bytes,
             std::optional<std::size_t> max_reservation_bytes, bool exportable_handles) {
            HostBackendOptions o;
            if (granularity != 0) o.granularity = granularity;
            o.physical_limit_bytes = physical_limit_bytes;
            if (max_reservation_bytes) o.max_reservation_bytes = *max_reservation_bytes;
            o.exportable_handles = exportable_handles;
            std::shared_ptr<Backend> b = ValueOrRaise(MakeHostBackend(o));
            new (self) PyHostBackend{{std::move(b)}};
          },
          nb::kw_only(), nb::arg("granularity") = 0, nb::arg("physical_limit_bytes") = 0,
          nb::arg("max_reservation_bytes") = nb::none(), nb::arg("exportable_handles") = false,
          "granularity: bytes, 0 = 2 MiB; physical_limit_bytes: cap on live "
          "handles, 0 = the machine's memory; exportable_handles: one memfd "
          "per handle, so vattn.send_slot can hand a slot's memory to another "
          "process (one file descriptor per live handle). InvalidArgumentError "
          "on bad sizes.");

  nb::class_<PyCudaBackend, PyBackend>(
      m, "CudaBackend",
      "The CUDA driver's virtual-memory API on one device; libcuda is loaded "
      "at run time. UnavailableError (with the reason) without a driver or "
      "device. Views are DLPack CUDA tensors of that device.")
      .def(
          "__init__",
          [](PyCudaBackend* self, int device, bool exportable_handles) {
            std::shared_ptr<Backend> b;
            absl::StatusOr<std::shared_ptr<Backend>> made;
            {
              nb::gil_scoped_release release;
              CudaBackendOptions o;
              o.exportable_handles = exportable_handles;
              made = MakeCudaBackend(device, o);
            }
            b = ValueOrRaise(std::move(made));
            new (self) PyCudaBackend{{std::move(b)}};
          },
          nb::arg("device") = 0, nb::kw_only(), nb::arg("exportable_handles") = false,
          "exportable_handles: handles are created exportable as POSIX file "
          "descriptors (and GPUDirect RDMA capable where the device supports "
          "it), so vattn.send_slot can hand a slot to another process.");

  nb::class_<PyLatencyModelBackend, PyBackend>(
      m, "LatencyModelBackend",
      "Forwards to `inner` and charges measured driver costs per call "
      "('h200', 'h100' or 'zero').")
      .def(
          "__init__",
          [](PyLatencyModelBackend* self, const PyBackend* inner, const std::string& costs) {
            std::shared_ptr<Backend> b =
                ValueOrRaise(MakeLatencyModelBackend(Inner(inner), CostsFromName(costs)));
            new (self) PyLatencyModelBackend{{std::move(b)}};
          },
          nb::arg("inner").none(), nb::arg("costs") = "h200");

  nb::class_<PyFaultInjectionBackend, PyBackend>(
      m, "FaultInjectionBackend",
      "Forwards to `inner` but fails chosen calls with a chosen code before "
      "they reach it (for tests of error paths).")
      .def(
          "__init__",
          [](PyFaultInjectionBackend* self, const PyBackend* inner) {
            std::shared_ptr<FaultInjectionBackend> f =
                ValueOrRaise(FaultInjectionBackend::Create(Inner(inner)));
            new (self) PyFaultInjectionBackend{{std::move(f)}};
          },
          nb::arg("inner").none())
      .def(
          "fail",
          [](PyFaultInjectionBackend& b, std::optional<std::string> op, std::int64_t nth,
             bool and_after, const std::string& code) {
            FaultRule rule;
            rule.op = OpFromName(op);
            rule.nth = nth;
            rule.and_after = and_after;
            rule.code = CodeFromName(code);
            FaultPlan plan;
            plan.rules.push_back(rule);
            b.faults()->SetPlan(std::move(plan));
          },
          nb::arg("op").none(), nb::arg("nth") = 1, nb::arg("and_after") = false,
          nb::arg("code") = "internal",
          "Replaces the plan: the nth call (1-based) of `op` ('map', "
          "'create', ...; None: any op) fails with `code`, and every later "
          "one too with and_after. Restarts the call counts.")
      .def("clear", [](PyFaultInjectionBackend& b) { b.faults()->SetPlan({}); },
           "No more injected faults.")
      .def_prop_ro("injected", [](const PyFaultInjectionBackend& b) { return b.faults()->injected(); },
                   "Calls failed on purpose since the last plan.");

  m.def(
      "cuda_device_count",
      []() {
        absl::StatusOr<int> n;
        {
          nb::gil_scoped_release release;
          n = CudaDeviceCount();
        }
        return ValueOrRaise(std::move(n));
      },
      "Number of CUDA devices; UnavailableError (with the reason) when no "
      "driver can be loaded.");
}

}  // namespace vattn::python
