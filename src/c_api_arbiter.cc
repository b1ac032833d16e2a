// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The C API's elastic memory (include/vattn/c_api.h, "Elastic memory"):
// vattn::MemoryArbiter, KVCache::SetBudget / Trim and the arbiter's JSON
// telemetry. Same conventions as src/c_api.cc: pointers checked, the C++
// call inside Guard, failures' text kept for vattn_last_error().
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "src/c_api_internal.h"
#include "vattn/arbiter_telemetry.h"
#include "vattn/c_api.h"
#include "vattn/memory_arbiter.h"

using vattn::c_api_internal::Fail;
using vattn::c_api_internal::Guard;
using vattn::c_api_internal::NullArgument;
using vattn::c_api_internal::Report;

extern "C" {

int vattn_arbiter_create(vattn_backend* backend, size_t budget_bytes,
                         vattn_arbiter** out) {
  constexpr const char* kFn = "vattn_arbiter_create";
  if (out != nullptr) *out = nullptr;
  if (backend == nullptr) return NullArgument(kFn, "backend");
  if (out == nullptr) return NullArgument(kFn, "out");
  return Guard(kFn, [&] {
    absl::StatusOr<std::shared_ptr<vattn::MemoryArbiter>> made =
        vattn::MemoryArbiter::Create(backend->backend, budget_bytes);
    if (!made.ok()) return Fail(kFn, made.status());
    *out = new vattn_arbiter{*std::move(made)};
    return static_cast<int>(VATTN_OK);
  });
}

void vattn_arbiter_release(vattn_arbiter* arbiter) { delete arbiter; }

int vattn_arbiter_set_budget(vattn_arbiter* arbiter, size_t bytes) {
  constexpr const char* kFn = "vattn_arbiter_set_budget";
  if (arbiter == nullptr) return NullArgument(kFn, "arbiter");
  return Guard(kFn, [&] { return Report(kFn, arbiter->arbiter->SetBudget(bytes)); });
}

int vattn_arbiter_trim(vattn_arbiter* arbiter, size_t target_bytes,
                       size_t* destroyed_bytes) {
  constexpr const char* kFn = "vattn_arbiter_trim";
  if (arbiter == nullptr) return NullArgument(kFn, "arbiter");
  return Guard(kFn, [&] {
    const absl::StatusOr<std::size_t> r = arbiter->arbiter->Trim(target_bytes);
    if (!r.ok()) return Fail(kFn, r.status());
    if (destroyed_bytes != nullptr) *destroyed_bytes = *r;
    return static_cast<int>(VATTN_OK);
  });
}

int vattn_arbiter_budget_bytes(const vattn_arbiter* arbiter, size_t* out) {
  constexpr const char* kFn = "vattn_arbiter_budget_bytes";
  if (arbiter == nullptr) return NullArgument(kFn, "arbiter");
  if (out == nullptr) return NullArgument(kFn, "out");
  return Guard(kFn, [&] {
    *out = arbiter->arbiter->budget_bytes();
    return static_cast<int>(VATTN_OK);
  });
}

int vattn_arbiter_telemetry_json(const vattn_arbiter* arbiter, char* buffer,
                                 size_t capacity, size_t* length) {
  constexpr const char* kFn = "vattn_arbiter_telemetry_json";
  if (arbiter == nullptr) return NullArgument(kFn, "arbiter");
  if (length == nullptr) return NullArgument(kFn, "length");
  if (buffer == nullptr && capacity > 0) {
    return Fail(kFn, absl::StatusCode::kInvalidArgument,
                absl::StrCat("buffer is NULL but capacity is ", capacity));
  }
  return Guard(kFn, [&] {
    const std::string json = vattn::TelemetryJson(*arbiter->arbiter);
    *length = json.size();
    if (capacity == 0 && buffer == nullptr) return static_cast<int>(VATTN_OK);
    if (capacity < json.size() + 1) {
      return Fail(kFn, absl::StatusCode::kInvalidArgument,
                  absl::StrCat("capacity ", capacity, " cannot hold the ",
                               json.size(),
                               " bytes of JSON and the terminating NUL (*length is "
                               "set; the next snapshot may be longer)"));
    }
    std::memcpy(buffer, json.c_str(), json.size() + 1);
    return static_cast<int>(VATTN_OK);
  });
}

int vattn_cache_set_budget(vattn_cache* cache, size_t bytes) {
  constexpr const char* kFn = "vattn_cache_set_budget";
  if (cache == nullptr) return NullArgument(kFn, "cache");
  return Guard(kFn, [&] { return Report(kFn, cache->cache->SetBudget(bytes)); });
}

int vattn_cache_trim(vattn_cache* cache, size_t target_bytes,
                     size_t* destroyed_bytes) {
  constexpr const char* kFn = "vattn_cache_trim";
  if (cache == nullptr) return NullArgument(kFn, "cache");
  return Guard(kFn, [&] {
    const absl::StatusOr<std::size_t> r = cache->cache->Trim(target_bytes);
    if (!r.ok()) return Fail(kFn, r.status());
    if (destroyed_bytes != nullptr) *destroyed_bytes = *r;
    return static_cast<int>(VATTN_OK);
  });
}

}  // extern "C"
