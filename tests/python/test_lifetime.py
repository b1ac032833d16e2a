# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""Views keep the cache alive: a tensor outlives `del cache` and still reads
correctly; the memory goes when the last view and the cache are gone."""

import gc

import pytest
import torch

import vattn
from conftest import small_cache


def live(backend):
    c = backend.counters()
    return c["reservations"], c["handles"], c["mappings"]


def test_view_outlives_cache(backend):
    before = live(backend)
    cache = small_cache(backend)
    slot = cache.alloc_slot()
    cache.grow(slot, 100)
    k = torch.from_dlpack(cache.k(2))
    k[slot, :100] = 4.0
    ks = torch.from_dlpack(cache.k(2, slot=slot))
    del cache
    gc.collect()
    assert live(backend) != before  # Still mapped: the views hold the cache.
    assert k[slot, :100].eq(4.0).all() and ks[:100].eq(4.0).all()
    ks[0, 0, 0] = 5.0
    assert k[slot, 0, 0, 0].item() == 5.0
    del k
    gc.collect()
    assert live(backend) != before
    del ks
    gc.collect()
    assert live(backend) == before


def test_dlpack_object_alone_holds_the_cache(host_backend):
    before = live(host_backend)
    cache = small_cache(host_backend)
    cache.grow(cache.alloc_slot(), 1)
    capsule_owner = cache.v(0)  # Not yet imported by any framework.
    del cache
    gc.collect()
    assert live(host_backend) != before
    t = torch.from_dlpack(capsule_owner)
    del capsule_owner
    gc.collect()
    t[0, 0].fill_(1.0)
    del t
    gc.collect()
    assert live(host_backend) == before


def test_close_and_context_manager(host_backend):
    before = live(host_backend)
    with small_cache(host_backend) as cache:
        cache.grow(cache.alloc_slot(), 10)
        assert not cache.closed
    assert cache.closed and live(host_backend) == before
    with pytest.raises(vattn.FailedPreconditionError, match="closed"):
        cache.alloc_slot()
    with pytest.raises(vattn.FailedPreconditionError):
        cache.k(0)
    cache.close()  # Twice is fine.


def test_backend_outlives_python_reference():
    cache = small_cache(vattn.HostBackend())  # The cache holds the backend.
    gc.collect()
    slot = cache.alloc_slot()
    cache.grow(slot, 10)
    assert cache.backend.counters()["mappings"] == 1


def test_many_caches_leak_nothing(host_backend):
    before = live(host_backend)
    for i in range(20):
        cache = small_cache(host_backend, layout="layer-major" if i % 2 else "token-major")
        slot = cache.alloc_slot()
        cache.grow(slot, 50 * (i + 1))
        views = [torch.from_dlpack(cache.k(l, slot=slot)) for l in range(3)]
        del cache, views
    gc.collect()
    assert live(host_backend) == before
