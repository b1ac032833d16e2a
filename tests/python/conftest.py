# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""Fixtures for vattn's Python tests: every backend the machine has (the
CUDA instance skips, with the reason, where no driver or device exists)."""

import pytest
import torch

import vattn

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int8]
LAYOUTS = ["token-major", "layer-major"]

# The models here are tiny: one thread is as fast, and it keeps the suite
# quick on a shared 2-core machine where OpenMP threads would contend.
torch.set_num_threads(1)


def cuda_skip_reason():
    """None when a CUDA device can hold a vattn cache, else why not."""
    try:
        n = vattn.cuda_device_count()
    except vattn.UnavailableError as e:
        return f"no CUDA driver: {e.message}"
    if n == 0:
        return "the CUDA driver reports no device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def make_backend(kind):
    if kind == "host":
        return vattn.HostBackend()
    reason = cuda_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return vattn.CudaBackend(device=0)


@pytest.fixture(params=["host", "cuda"])
def backend(request):
    return make_backend(request.param)


@pytest.fixture
def host_backend():
    return vattn.HostBackend()


def small_cache(backend, **overrides):
    options = dict(num_layers=3, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                   max_slots=4, max_tokens=1024, backend=backend)
    options.update(overrides)
    return vattn.Cache(**options)


def torch_device(cache):
    return torch.device(cache.device)
