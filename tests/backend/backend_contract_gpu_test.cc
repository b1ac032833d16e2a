// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The backend contract suite on CUDA device 0. Every test skips, with the
// reason, where no driver or device is present (MakeCudaBackend returns
// Unavailable).

#include "tests/backend/backend_contract.h"
#include "vattn/backend.h"

namespace vattn::testing {
namespace {

INSTANTIATE_TEST_SUITE_P(
    Gpu, BackendContractTest,
    ::testing::Values(BackendFactory{"Cuda0",
                                     [] { return MakeCudaBackend(0); }}),
    BackendFactoryName);

}  // namespace
}  // namespace vattn::testing
