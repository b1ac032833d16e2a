# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""Bad input raises the vattn.Error subclass of its status code (also the
matching builtin), never crashes, leaks nothing and changes no state."""

import gc

import numpy as np
import pytest
import torch

import vattn
from conftest import small_cache

BUILTIN = {
    vattn.InvalidArgumentError: ValueError,
    vattn.OutOfRangeError: IndexError,
    vattn.ResourceExhaustedError: MemoryError,
    vattn.FailedPreconditionError: RuntimeError,
    vattn.InternalError: RuntimeError,
    vattn.UnavailableError: RuntimeError,
    vattn.UnimplementedError: NotImplementedError,
}


def test_hierarchy():
    codes = {}
    for name in dir(vattn):
        cls = getattr(vattn, name)
        if isinstance(cls, type) and issubclass(cls, vattn.Error) and cls is not vattn.Error:
            codes[name] = cls
    assert len(codes) == 16  # One per absl::StatusCode but OK.
    for cls, builtin in BUILTIN.items():
        assert issubclass(cls, vattn.Error) and issubclass(cls, builtin)
    for cls in codes.values():
        assert issubclass(cls, RuntimeError) or cls in BUILTIN
        assert cls.__module__ == "vattn"


@pytest.fixture
def setup(host_backend):
    # 24 KiB per token: 1024 tokens (24 MiB) do not fit the 8 MiB budget.
    cache = small_cache(host_backend, max_slots=2, max_tokens=1024, num_kv_heads=8,
                        head_dim=128, memory_budget_bytes=8 << 20)
    active = cache.alloc_slot()
    cache.grow(active, 10)
    freed = cache.alloc_slot()
    cache.free(freed)
    return cache, active, freed


# (name, call(cache, active, freed), exception, builtin, text in the message)
TABLE = [
    ("grow bad slot", lambda c, a, f: c.grow(99, 1), vattn.InvalidArgumentError, ValueError, "99"),
    ("grow negative slot", lambda c, a, f: c.grow(-1, 1), vattn.InvalidArgumentError, ValueError, "-1"),
    ("grow negative tokens", lambda c, a, f: c.grow(a, -5), vattn.InvalidArgumentError, ValueError, "-5"),
    ("grow past max_tokens", lambda c, a, f: c.grow(a, 1025), vattn.OutOfRangeError, IndexError, "1025"),
    ("grow freed slot", lambda c, a, f: c.grow(f, 1), vattn.FailedPreconditionError, RuntimeError, ""),
    ("grow over budget", lambda c, a, f: c.grow(a, 1024), vattn.ResourceExhaustedError, MemoryError, ""),
    ("shrink above length", lambda c, a, f: c.shrink(a, 11), vattn.InvalidArgumentError, ValueError, "11"),
    ("shrink negative", lambda c, a, f: c.shrink(a, -1), vattn.InvalidArgumentError, ValueError, ""),
    ("shrink freed slot", lambda c, a, f: c.shrink(f, 0), vattn.FailedPreconditionError, RuntimeError, ""),
    ("double free", lambda c, a, f: c.free(f), vattn.FailedPreconditionError, RuntimeError, ""),
    ("free bad slot", lambda c, a, f: c.free(7), vattn.InvalidArgumentError, ValueError, "7"),
    ("free bad stream", lambda c, a, f: c.free(a, stream="s"), TypeError, TypeError, "stream"),
    ("free negative stream", lambda c, a, f: c.free(a, stream=-1), TypeError, TypeError, "stream"),
    ("alloc negative hint", lambda c, a, f: c.alloc_slot(-1), vattn.InvalidArgumentError, ValueError, ""),
    ("alloc hint past max", lambda c, a, f: c.alloc_slot(5000), vattn.OutOfRangeError, IndexError, ""),
    ("slot_info bad slot", lambda c, a, f: c.slot_info(2), vattn.InvalidArgumentError, ValueError, "2"),
    ("k bad layer", lambda c, a, f: c.k(3), vattn.InvalidArgumentError, ValueError, "layer 3"),
    ("v negative layer", lambda c, a, f: c.v(-1), vattn.InvalidArgumentError, ValueError, "layer -1"),
    ("k bad slot", lambda c, a, f: c.k(0, slot=5), vattn.InvalidArgumentError, ValueError, "5"),
    ("k freed slot", lambda c, a, f: c.k(0, slot=f), vattn.FailedPreconditionError, RuntimeError, "not active"),
    ("step negative tokens", lambda c, a, f: c.step([(a, -1)]), vattn.InvalidArgumentError, ValueError, ""),
    ("step past max", lambda c, a, f: c.step([(a, 4096)]), vattn.OutOfRangeError, IndexError, ""),
    ("step freed slot", lambda c, a, f: c.step([(f, 3)]), vattn.FailedPreconditionError, RuntimeError, ""),
    ("step huge slot", lambda c, a, f: c.step([(2**40, 3)]), vattn.InvalidArgumentError, ValueError, "batch[0]"),
    ("step huge tokens", lambda c, a, f: c.step([(a, 2**70)]), TypeError, TypeError, "batch[0]"),
    ("step not pairs", lambda c, a, f: c.step([(a,)]), TypeError, TypeError, "batch[0]"),
    ("step str slot", lambda c, a, f: c.step([("0", 3)]), TypeError, TypeError, "slot"),
    ("step not a sequence", lambda c, a, f: c.step(5), TypeError, TypeError, "sequence"),
    ("step tensors differ", lambda c, a, f: c.step(torch.tensor([a]), torch.tensor([3, 4])),
     vattn.InvalidArgumentError, ValueError, "1 slots but 2"),
    ("step tensor huge slot", lambda c, a, f: c.step(torch.tensor([2**40]), torch.tensor([3])),
     vattn.InvalidArgumentError, ValueError, "batch[0]"),
    ("step float tensors", lambda c, a, f: c.step(torch.tensor([0.0]), torch.tensor([3.0])),
     TypeError, TypeError, "integer"),
    ("step 2-D tensors", lambda c, a, f: c.step(torch.zeros(1, 1, dtype=torch.long),
                                                torch.zeros(1, 1, dtype=torch.long)),
     TypeError, TypeError, "1-D"),
    ("grow str slot", lambda c, a, f: c.grow("0", 1), TypeError, TypeError, ""),
    ("copy unmapped", lambda c, a, f: c.backend.copy_from_device(4096, 8),
     vattn.InvalidArgumentError, ValueError, ""),
]


@pytest.mark.parametrize("name,call,exc,builtin,text", TABLE, ids=[t[0] for t in TABLE])
def test_error_table(setup, name, call, exc, builtin, text):
    cache, active, freed = setup
    before = (cache.stats().mapped_bytes, cache.stats().active_slots,
              cache.slot_info(active).length, cache.slot_info(active).backed_tokens,
              cache.slot_info(freed).active)
    counters = cache.backend.counters()
    with pytest.raises(exc) as info:
        call(cache, active, freed)
    assert isinstance(info.value, builtin)
    assert text in str(info.value)
    if isinstance(info.value, vattn.Error):
        assert info.value.code_name in str(info.value) and info.value.message
        assert info.value.code == {"INVALID_ARGUMENT": 3, "OUT_OF_RANGE": 11,
                                   "FAILED_PRECONDITION": 9, "RESOURCE_EXHAUSTED": 8,
                                   }[info.value.code_name]
    after = (cache.stats().mapped_bytes, cache.stats().active_slots,
             cache.slot_info(active).length, cache.slot_info(active).backed_tokens,
             cache.slot_info(freed).active)
    assert after == before
    now = cache.backend.counters()
    for key in ("reservations", "handles", "mappings", "mapped_bytes", "calls"):
        assert now[key] == counters[key], key


CONSTRUCTOR_TABLE = [
    (dict(dtype="float64"), vattn.InvalidArgumentError, "float64"),
    (dict(dtype=torch.float64), vattn.InvalidArgumentError, "float64"),
    (dict(layout="paged"), vattn.InvalidArgumentError, "paged"),
    (dict(bogus=1), vattn.InvalidArgumentError, "bogus"),
    (dict(num_layers=0), vattn.InvalidArgumentError, "num_layers"),
    (dict(max_slots=-1), vattn.InvalidArgumentError, "max_slots"),
    (dict(max_tokens="many"), vattn.InvalidArgumentError, "max_tokens"),
    (dict(memory_budget_bytes=-1), vattn.InvalidArgumentError, "memory_budget_bytes"),
    (dict(head_dim=2**40), vattn.InvalidArgumentError, "head_dim"),
    (dict(max_tokens=2**40, max_slots=2**20), vattn.InvalidArgumentError, "overflows"),
]


@pytest.mark.parametrize("kwargs,exc,text", CONSTRUCTOR_TABLE, ids=[str(t[0]) for t in CONSTRUCTOR_TABLE])
def test_constructor_errors(host_backend, kwargs, exc, text):
    before = host_backend.counters()
    with pytest.raises(exc, match=text):
        small_cache(host_backend, **kwargs)
    assert host_backend.counters()["reservations"] == before["reservations"]


def test_backend_argument_errors(host_backend):
    with pytest.raises(TypeError, match="backend"):
        vattn.Cache(backend="host", num_layers=1)
    with pytest.raises(vattn.InvalidArgumentError):
        vattn.HostBackend(granularity=3)
    with pytest.raises(vattn.InvalidArgumentError, match="costs"):
        vattn.LatencyModelBackend(host_backend, costs="a100")
    with pytest.raises(vattn.InvalidArgumentError, match="inner"):
        vattn.FaultInjectionBackend(None)
    f = vattn.FaultInjectionBackend(host_backend)
    with pytest.raises(vattn.InvalidArgumentError, match="bogus"):
        f.fail(op="bogus")
    with pytest.raises(vattn.InvalidArgumentError, match="nope"):
        f.fail(op="map", code="nope")
    with pytest.raises(vattn.Error):
        vattn.CudaBackend(device=99)  # Unavailable here, InvalidArgument on a GPU machine.


def test_exhausted_slots(host_backend):
    cache = small_cache(host_backend, max_slots=2)
    cache.alloc_slot()
    cache.alloc_slot()
    with pytest.raises(MemoryError):
        cache.alloc_slot()


@pytest.mark.parametrize("op,code,exc", [
    ("map", "internal", vattn.InternalError),
    ("create", "resource_exhausted", vattn.ResourceExhaustedError),
    ("map", "unavailable", vattn.UnavailableError),
])
def test_injected_driver_errors(host_backend, op, code, exc):
    faults = vattn.FaultInjectionBackend(host_backend)
    cache = small_cache(faults)
    slot = cache.alloc_slot()
    faults.fail(op=op, nth=1, and_after=True, code=code)
    with pytest.raises(exc) as info:
        cache.grow(slot, 10)
    assert faults.injected >= 1
    faults.clear()
    assert cache.slot_info(slot).length == 0
    assert cache.slot_info(slot).backed_tokens == 0
    cache.grow(slot, 10)  # The next call goes through.
    assert cache.slot_info(slot).length == 10
    assert info.value.code_name == code.upper()


def test_bad_calls_leak_nothing(setup):
    cache, active, freed = setup
    for _, call, exc, _, _ in TABLE[:8]:
        with pytest.raises(exc):
            call(cache, active, freed)
    gc.collect()
    objects = len(gc.get_objects())
    for _ in range(200):
        for _, call, exc, _, _ in TABLE:
            try:
                call(cache, active, freed)
            except exc:
                pass
    gc.collect()
    assert len(gc.get_objects()) - objects < 100
