// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The C API's zero-copy handoff (include/vattn/c_api.h, "Zero-copy handoff
// between processes") over vattn::SendSlot / ReceiveSlot and the backends'
// exportable_handles option. Same rules as src/c_api.cc: check the
// pointers, call the C++ API inside Guard, keep a failure's text for
// vattn_last_error(), write outputs only on success.
#include <cstdint>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "src/c_api_internal.h"
#include "vattn/backend.h"
#include "vattn/c_api.h"
#include "vattn/kv_cache.h"
#include "vattn/slot_export.h"

namespace vattn {
namespace {

using c_api_internal::Fail;

int Wrap(const char* function, absl::StatusOr<std::shared_ptr<Backend>> made,
         vattn_backend** out) {
  if (!made.ok()) return Fail(function, made.status());
  *out = new vattn_backend{*std::move(made)};
  return VATTN_OK;
}

}  // namespace
}  // namespace vattn

extern "C" {

int vattn_backend_host_exportable(vattn_backend** out) {
  constexpr const char* kFn = "vattn_backend_host_exportable";
  if (out == nullptr) return vattn::c_api_internal::NullArgument(kFn, "out");
  *out = nullptr;
  return vattn::c_api_internal::Guard(kFn, [&] {
    vattn::HostBackendOptions o;
    o.exportable_handles = true;
    return vattn::Wrap(kFn, vattn::MakeHostBackend(o), out);
  });
}

int vattn_backend_cuda_exportable(int device, vattn_backend** out) {
  constexpr const char* kFn = "vattn_backend_cuda_exportable";
  if (out == nullptr) return vattn::c_api_internal::NullArgument(kFn, "out");
  *out = nullptr;
  return vattn::c_api_internal::Guard(kFn, [&] {
    vattn::CudaBackendOptions o;
    o.exportable_handles = true;
    return vattn::Wrap(kFn, vattn::MakeCudaBackend(device, o), out);
  });
}

int vattn_cache_send_slot(vattn_cache* cache, int sock, int slot,
                          int64_t tokens) {
  constexpr const char* kFn = "vattn_cache_send_slot";
  return vattn::c_api_internal::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::c_api_internal::NullArgument(kFn, "cache");
    return vattn::c_api_internal::Report(
        kFn, vattn::SendSlot(sock, *cache->cache, slot, tokens));
  });
}

int vattn_cache_receive_slot(vattn_cache* cache, int sock, int* slot_out) {
  constexpr const char* kFn = "vattn_cache_receive_slot";
  return vattn::c_api_internal::Guard(kFn, [&] {
    if (cache == nullptr) return vattn::c_api_internal::NullArgument(kFn, "cache");
    if (slot_out == nullptr) {
      return vattn::c_api_internal::NullArgument(kFn, "slot_out");
    }
    const absl::StatusOr<int> slot = vattn::ReceiveSlot(sock, *cache->cache);
    if (!slot.ok()) return vattn::c_api_internal::Fail(kFn, slot.status());
    *slot_out = *slot;
    return static_cast<int>(VATTN_OK);
  });
}

}  // extern "C"
