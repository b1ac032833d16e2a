// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Uses an installed vattn the way a user would: the umbrella header, a Host
// backend, one reserve / create / map / write / read / unmap / destroy /
// release round trip. Exits 0 only if everything worked and nothing leaked.

#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "vattn/vattn.h"

namespace {

absl::Status RoundTrip() {
  VATTN_ASSIGN_OR_RETURN(std::shared_ptr<vattn::Backend> backend,
                         vattn::MakeHostBackend());
  const std::size_t g = backend->granularity();
  VATTN_ASSIGN_OR_RETURN(const vattn::DevicePtr va, backend->Reserve(4 * g));
  VATTN_ASSIGN_OR_RETURN(const vattn::PhysicalHandle h, backend->Create(g));
  VATTN_RETURN_IF_ERROR(backend->Map(va + g, h));

  std::vector<unsigned char> out(g), in(g, 0);
  for (std::size_t i = 0; i < g; ++i) out[i] = static_cast<unsigned char>(i * 7);
  VATTN_RETURN_IF_ERROR(backend->CopyToDevice(va + g, out.data(), g));
  VATTN_RETURN_IF_ERROR(backend->CopyFromDevice(in.data(), va + g, g));
  if (std::memcmp(out.data(), in.data(), g) != 0) {
    return absl::InternalError("read back differs from what was written");
  }

  VATTN_RETURN_IF_ERROR(backend->Unmap(va + g, g));
  VATTN_RETURN_IF_ERROR(backend->Destroy(h));
  VATTN_RETURN_IF_ERROR(backend->Release(va, 4 * g));
  if (!backend->counters().Empty()) {
    return absl::InternalError("the backend still holds objects");
  }
  return absl::OkStatus();
}

}  // namespace

int main() {
  const absl::Status status = RoundTrip();
  if (!status.ok()) {
    std::fprintf(stderr, "vattn_consumer: %s\n", status.ToString().c_str());
    return 1;
  }
  std::printf("vattn_consumer: installed vattn works (Host backend round trip)\n");
  return 0;
}
