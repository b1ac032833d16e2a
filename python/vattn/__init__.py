# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""vattn: an LLM's KV cache in contiguous virtual memory, backed on demand.

    import torch, vattn
    backend = vattn.HostBackend()                 # or vattn.CudaBackend(device=0)
    cache = vattn.Cache(num_layers=4, num_kv_heads=2, head_dim=64,
                        dtype=torch.float16, max_slots=8, max_tokens=4096,
                        backend=backend)
    slot = cache.alloc_slot(expected_tokens=100)
    cache.grow(slot, 100)
    k = torch.from_dlpack(cache.k(0))   # [max_slots, max_tokens, heads, dim], zero-copy

Everything here is the C++ library (vattn::KVCache and its backends) bound
with nanobind in vattn._vattn; errors are vattn.Error subclasses carrying the
absl status code. vattn.transformers holds a transformers.Cache on vattn.
"""

from vattn._vattn import (  # noqa: F401
    AbortedError,
    AlreadyExistsError,
    Backend,
    Cache,
    CacheStats,
    CancelledError,
    CudaBackend,
    DataLossError,
    DeadlineExceededError,
    Error,
    FailedPreconditionError,
    FaultInjectionBackend,
    HostBackend,
    InternalError,
    InvalidArgumentError,
    LatencyModelBackend,
    MemoryArbiter,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    PrefixInfo,
    ResourceExhaustedError,
    SlotInfo,
    StepBatch,
    StepResult,
    TensorView,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    cuda_device_count,
    receive_slot,
    send_slot,
)

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when the CUDA driver loads and reports at least one device."""
    try:
        return cuda_device_count() > 0
    except UnavailableError:
        return False


def default_backend() -> Backend:
    """The best backend present: CUDA device 0 when a driver and a device
    exist, else the Host backend (CPU memory)."""
    if cuda_available():
        return CudaBackend(device=0)
    return HostBackend()
