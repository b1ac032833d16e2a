// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn.MemoryArbiter: one physical budget shared by several caches
// (vattn/memory_arbiter.h), its run-time budget, Trim and JSON telemetry;
// and the caches' own SetBudget / Trim as Cache.set_budget / Cache.trim.
// The GIL is released around every call that may destroy memory or take a
// cache's lock.
#include "python/src/arbiter_bindings.h"

#include <cstddef>
#include <memory>
#include <string>
#include <utility>

#include <nanobind/stl/string.h>

#include "absl/strings/str_cat.h"
#include "python/src/bindings.h"
#include "vattn/arbiter_telemetry.h"

namespace nb = nanobind;

namespace vattn::python {

std::shared_ptr<MemoryArbiter> ArbiterFromPython(nb::handle value) {
  if (value.is_none()) return nullptr;
  PyArbiter* a = nullptr;
  if (!nb::try_cast(value, a) || a == nullptr) {
    throw nb::type_error("arbiter must be a vattn.MemoryArbiter or None");
  }
  return a->arbiter;
}

namespace {

std::size_t ValueOrRaiseSize(absl::StatusOr<std::size_t> r) {
  if (!r.ok()) Raise(r.status());
  return *r;
}

std::string Telemetry(const PyArbiter& self) {
  nb::gil_scoped_release release;
  return TelemetryJson(*self.arbiter);
}

}  // namespace

void BindArbiter(nb::module_& m) {
  nb::class_<PyArbiter>(
      m, "MemoryArbiter",
      "One physical budget shared by several caches on one backend "
      "(vattn::MemoryArbiter). Attach a cache with Cache(..., arbiter=a, "
      "backend=<the same backend>): it draws its memory from the budget, and "
      "when one cache needs memory and the budget is full, idle memory of "
      "any cache (pooled handles, idle slots, cached prefixes; least "
      "recently used first) is taken back; active memory never is. "
      "Per-cache options arbiter_floor_bytes (a guarantee) and "
      "arbiter_cap_bytes (a ceiling). Thread-safe; the caches hold their own "
      "reference, so the arbiter outlives them.")
      .def(
          "__init__",
          [](PyArbiter* self, const PyBackend* backend, std::size_t budget_bytes) {
            if (backend == nullptr || backend->backend == nullptr) {
              throw nb::type_error("backend must be a vattn.Backend");
            }
            std::shared_ptr<Backend> shared = backend->backend;
            absl::StatusOr<std::shared_ptr<MemoryArbiter>> made;
            {
              nb::gil_scoped_release release;
              made = MemoryArbiter::Create(std::move(shared), budget_bytes);
            }
            new (self) PyArbiter{ValueOrRaise(std::move(made))};
          },
          nb::arg("backend").none(), nb::arg("budget_bytes"),
          "MemoryArbiter(backend, budget_bytes): every attached cache must use "
          "this backend. InvalidArgumentError: budget_bytes 0 or above 2**60.")
      .def(
          "set_budget",
          [](PyArbiter& self, std::size_t bytes) {
            absl::Status s;
            {
              nb::gil_scoped_release release;
              s = self.arbiter->SetBudget(bytes);
            }
            ThrowIfError(s);
          },
          nb::arg("bytes"),
          "Changes the shared budget. Growth takes effect at once; shrinking "
          "first takes idle memory back (never below a cache's floor). The "
          "new budget stands either way. ResourceExhaustedError (with the "
          "numbers): active memory keeps the caches above it. "
          "InvalidArgumentError: 0, above 2**60 or below the sum of the "
          "floors (nothing changes).")
      .def(
          "trim",
          [](PyArbiter& self, std::size_t target_bytes) {
            absl::StatusOr<std::size_t> r;
            {
              nb::gil_scoped_release release;
              r = self.arbiter->Trim(target_bytes);
            }
            return ValueOrRaiseSize(std::move(r));
          },
          nb::arg("target_bytes"),
          "Returns idle memory of every cache to the driver (destroyed, not "
          "pooled) until the caches hold at most target_bytes together; "
          "never active memory, never below a floor. Returns the bytes "
          "destroyed (compare telemetry()['physical_bytes'] with the target "
          "when active memory is above it). The budget is unchanged.")
      .def_prop_ro(
          "budget_bytes", [](const PyArbiter& self) { return self.arbiter->budget_bytes(); },
          "The shared budget in force.")
      .def_prop_ro(
          "backend", [](const PyArbiter& self) { return PyBackend{self.arbiter->backend()}; },
          "The backend its caches must use.")
      .def("telemetry_json", &Telemetry,
           "A JSON snapshot of the arbiter and every attached cache "
           "(vattn::TelemetryJson; the fields are ArbiterStats').")
      .def(
          "telemetry",
          [](const PyArbiter& self) {
            const std::string json = Telemetry(self);
            return nb::module_::import_("json").attr("loads")(nb::str(json.c_str(), json.size()));
          },
          "telemetry_json() parsed: a dict with the arbiter's budget_bytes, "
          "physical_bytes, cross_reclaims, ... and 'caches', a list of dicts "
          "(id, name, physical_bytes, reclaimable_bytes, active_bytes, "
          "floor_bytes, cap_bytes, reclaimed_from_bytes, reclaimed_for_bytes, "
          "...) in attach order.")
      .def("__repr__", [](const PyArbiter& self) {
        return absl::StrCat("MemoryArbiter(budget_bytes=", self.arbiter->budget_bytes(), ")");
      });

  // The caches' own budget and Trim, on vattn.Cache.
  nb::object cache = m.attr("Cache");
  cache.attr("set_budget") = nb::cpp_function(
      [](PyCache& self, std::size_t bytes) {
        KVCache& c = self.Get();
        absl::Status s;
        {
          nb::gil_scoped_release release;
          s = c.SetBudget(bytes);
        }
        ThrowIfError(s);
      },
      nb::scope(cache), nb::name("set_budget"), nb::is_method(), nb::arg("bytes"),
      "Changes the cache's budget at run time (without an arbiter its "
      "memory_budget_bytes, with one its cap). Growth takes effect at once; "
      "shrinking first destroys the cache's idle memory. The new budget "
      "stands either way. ResourceExhaustedError (with the numbers): active "
      "memory keeps the cache above it. InvalidArgumentError: below one "
      "granule per tensor, above 2**60 or below the cache's floor.");
  cache.attr("trim") = nb::cpp_function(
      [](PyCache& self, std::size_t target_bytes) {
        KVCache& c = self.Get();
        absl::StatusOr<std::size_t> r;
        {
          nb::gil_scoped_release release;
          r = c.Trim(target_bytes);
        }
        return ValueOrRaiseSize(std::move(r));
      },
      nb::scope(cache), nb::name("trim"), nb::is_method(), nb::arg("target_bytes"),
      "Returns the cache's idle memory to the driver until it holds at most "
      "target_bytes; returns the bytes destroyed. Active memory is never "
      "taken; the budget is unchanged.");
}

}  // namespace vattn::python
