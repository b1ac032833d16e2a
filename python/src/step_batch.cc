// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Step's batch: conversions from Python and vattn.StepBatch (step_batch.h).
#include "python/src/step_batch.h"

#include <climits>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include <nanobind/ndarray.h>

#include "absl/strings/str_cat.h"
#include "python/src/bindings.h"

namespace nb = nanobind;

namespace vattn::python {
namespace {

// Python int -> C integer, or an exception naming the batch entry.
std::int64_t ToInt64(PyObject* o, std::size_t index, const char* what) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw nb::type_error(
        absl::StrCat("batch[", index, "]: ", what, " must be an int that fits 64 bits").c_str());
  }
  return v;
}

int ToSlot(std::int64_t v, std::size_t index) {
  if (v < INT_MIN || v > INT_MAX) {
    Raise(absl::StatusCode::kInvalidArgument,
          absl::StrCat("batch[", index, "]: slot ", v, " is out of range"));
  }
  return static_cast<int>(v);
}

// A sequence of (slot, tokens) pairs into `out`.
void ParsePairs(nb::handle batch, std::vector<StepRequest>& out) {
  PyObject* seq = PySequence_Fast(batch.ptr(), "step(batch): batch must be a sequence of "
                                               "(slot, tokens) pairs");
  if (seq == nullptr) throw nb::python_error();
  nb::object hold = nb::steal(seq);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.resize(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    PyObject* a;
    PyObject* b;
    const auto index = static_cast<std::size_t>(i);
    if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2) {
      a = PyTuple_GET_ITEM(item, 0);
      b = PyTuple_GET_ITEM(item, 1);
    } else if (PyList_Check(item) && PyList_GET_SIZE(item) == 2) {
      a = PyList_GET_ITEM(item, 0);
      b = PyList_GET_ITEM(item, 1);
    } else {
      throw nb::type_error(
          absl::StrCat("batch[", index, "] must be a (slot, tokens) pair").c_str());
    }
    out[index].slot = ToSlot(ToInt64(a, index, "slot"), index);
    out[index].tokens = ToInt64(b, index, "tokens");
  }
}

using IntArray = nb::ndarray<nb::ro, nb::ndim<1>, nb::device::cpu>;

bool IsIntegral(const IntArray& a) {
  const nb::dlpack::dtype d = a.dtype();
  return d == nb::dtype<std::int64_t>() || d == nb::dtype<std::int32_t>() ||
         d == nb::dtype<std::int16_t>() || d == nb::dtype<std::int8_t>() ||
         d == nb::dtype<std::uint8_t>();
}

// Reads a[0..n) (any integer dtype, any stride) through `put(i, value)`.
template <typename Put>
void ForEachInt(const IntArray& a, std::size_t n, Put&& put) {
  const std::int64_t stride = a.stride(0);
  auto loop = [&](auto* data) {
    for (std::size_t i = 0; i < n; ++i) {
      put(i, static_cast<std::int64_t>(data[static_cast<std::int64_t>(i) * stride]));
    }
  };
  const nb::dlpack::dtype d = a.dtype();
  if (d == nb::dtype<std::int64_t>()) return loop(static_cast<const std::int64_t*>(a.data()));
  if (d == nb::dtype<std::int32_t>()) return loop(static_cast<const std::int32_t*>(a.data()));
  if (d == nb::dtype<std::int16_t>()) return loop(static_cast<const std::int16_t*>(a.data()));
  if (d == nb::dtype<std::uint8_t>()) return loop(static_cast<const std::uint8_t*>(a.data()));
  loop(static_cast<const std::int8_t*>(a.data()));
}

// Two 1-D CPU integer arrays of one length, or TypeError / InvalidArgument.
void ImportArrays(nb::handle slots_obj, nb::handle tokens_obj, IntArray& slots,
                  IntArray& tokens) {
  if (!nb::try_cast(slots_obj, slots) || !nb::try_cast(tokens_obj, tokens) ||
      !IsIntegral(slots) || !IsIntegral(tokens)) {
    throw nb::type_error(
        "step(slots, tokens): both must be 1-D integer arrays on the CPU "
        "(torch tensors, numpy arrays, ...)");
  }
  if (slots.shape(0) != tokens.shape(0)) {
    Raise(absl::StatusCode::kInvalidArgument,
          absl::StrCat("step(slots, tokens): ", slots.shape(0), " slots but ",
                       tokens.shape(0), " token counts"));
  }
}

// The arrays' current contents into `out`.
void ReadArrays(const IntArray& slots, const IntArray& tokens, std::vector<StepRequest>& out) {
  const std::size_t n = slots.shape(0);
  out.resize(n);
  // The common case in one tight loop: int64 (or int32) slots and int64
  // tokens, both contiguous.
  if (tokens.dtype() == nb::dtype<std::int64_t>() && tokens.stride(0) == 1 &&
      slots.stride(0) == 1) {
    const auto* t = static_cast<const std::int64_t*>(tokens.data());
    StepRequest* o = out.data();
    if (slots.dtype() == nb::dtype<std::int64_t>()) {
      const auto* sp = static_cast<const std::int64_t*>(slots.data());
      bool fits = true;
      for (std::size_t i = 0; i < n; ++i) {
        fits &= sp[i] >= INT_MIN && sp[i] <= INT_MAX;
        o[i].slot = static_cast<int>(sp[i]);
        o[i].tokens = t[i];
      }
      if (fits) return;
    } else if (slots.dtype() == nb::dtype<std::int32_t>()) {
      const auto* sp = static_cast<const std::int32_t*>(slots.data());
      for (std::size_t i = 0; i < n; ++i) {
        o[i].slot = sp[i];
        o[i].tokens = t[i];
      }
      return;
    }
    // A slot out of int's range: the general path below names it.
  }
  ForEachInt(slots, n, [&](std::size_t i, std::int64_t v) { out[i].slot = ToSlot(v, i); });
  ForEachInt(tokens, n, [&](std::size_t i, std::int64_t v) { out[i].tokens = v; });
}

// A batch that owns the StepRequest array KVCache::Step reads, made once
// from two CPU integer arrays (copied in). Its `slots` (int32) and `tokens`
// (int64) attributes are strided DLPack views of that array: a decode loop
// updates them in place (tokens += 1) and step(batch) hands the array to
// Step with no conversion at all.
static_assert(sizeof(StepRequest) % sizeof(std::int64_t) == 0 &&
                  offsetof(StepRequest, tokens) % sizeof(std::int64_t) == 0 &&
                  offsetof(StepRequest, slot) == 0 && sizeof(int) == sizeof(std::int32_t),
              "StepBatch views StepRequest's fields as strided int32/int64 arrays");

// A 1-D view of one field of every request; the owner is the batch object.
template <typename T>
nb::ndarray<nb::array_api> FieldView(nb::handle self, std::size_t offset) {
  PyStepBatch& b = nb::cast<PyStepBatch&>(self);
  const std::size_t shape[1] = {b.requests.size()};
  const std::int64_t strides[1] = {static_cast<std::int64_t>(sizeof(StepRequest) / sizeof(T))};
  auto* base = reinterpret_cast<unsigned char*>(b.requests.data()) + offset;
  return nb::ndarray<nb::array_api>(base, 1, shape, self, strides, nb::dtype<T>(),
                                    nb::device::cpu::value, 0);
}

}  // namespace

void StepRequestsFromPairs(nb::handle batch, std::vector<StepRequest>& out) {
  ParsePairs(batch, out);
}

void StepRequestsFromArrays(nb::handle slots, nb::handle tokens,
                            std::vector<StepRequest>& out) {
  IntArray s, t;
  ImportArrays(slots, tokens, s, t);
  ReadArrays(s, t, out);
}

void BindStepBatch(nb::module_& m) {
  nb::class_<PyStepBatch>(
      m, "StepBatch",
      "StepBatch(slots, tokens): the StepRequest array of one step, made "
      "once from two 1-D CPU integer arrays (copied in). batch.slots (int32) "
      "and batch.tokens (int64) are zero-copy strided views of it: update "
      "them in place (torch.from_dlpack(batch.tokens).add_(1)) and "
      "cache.step(batch) passes the array to KVCache::Step unconverted. Do "
      "not write them while a step runs on another thread.")
      .def(
          "__init__",
          [](PyStepBatch* self, nb::handle slots, nb::handle tokens) {
            IntArray s, t;
            ImportArrays(slots, tokens, s, t);
            std::vector<StepRequest> requests;
            ReadArrays(s, t, requests);
            new (self) PyStepBatch{std::move(requests)};
          },
          nb::arg("slots"), nb::arg("tokens"))
      .def("__len__", [](const PyStepBatch& b) { return b.requests.size(); })
      .def_prop_ro("slots", [](nb::handle self) {
        return FieldView<std::int32_t>(self, offsetof(StepRequest, slot));
      }, "The slots, an int32 DLPack view (writable, zero-copy).")
      .def_prop_ro("tokens", [](nb::handle self) {
        return FieldView<std::int64_t>(self, offsetof(StepRequest, tokens));
      }, "The token counts, an int64 DLPack view (writable, zero-copy).");

}

}  // namespace vattn::python
