# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""cache.slot_ranges(slot, tokens) and cache.reservation(): the ranges a
transfer engine moves, checked against the zero-copy views (bytes written
through k()/v() are found where the ranges say, in the documented order),
addresses that never move, and the error of each bad input."""

import ctypes

import numpy as np
import pytest
import torch

import vattn
from conftest import LAYOUTS, small_cache


def read_range(address, nbytes):
    return np.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=np.uint8).copy()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ranges_hold_the_slot_in_the_documented_order(host_backend, layout):
    cache = small_cache(host_backend, layout=layout)
    other = cache.alloc_slot()
    slot = cache.alloc_slot()
    tokens = 200
    cache.grow(other, tokens)
    cache.grow(slot, tokens)
    gen = torch.Generator().manual_seed(7)
    data = {}
    for s in (other, slot):
        for layer in range(cache.num_layers):
            for kv, view in (("k", cache.k), ("v", cache.v)):
                t = torch.from_dlpack(view(layer, s))[:tokens]
                t.copy_(torch.randn(t.shape, generator=gen))
                data[s, layer, kv] = t.clone()

    ranges = cache.slot_ranges(slot, tokens)
    assert all(isinstance(a, int) and isinstance(n, int) for a, n in ranges)
    if layout == "token-major":
        assert len(ranges) == 1
        # [token][layer][K, V][head][dim]
        expected = torch.stack(
            [torch.stack([data[slot, l, "k"], data[slot, l, "v"]], dim=1)
             for l in range(cache.num_layers)], dim=1)
    else:
        assert len(ranges) == 2 * cache.num_layers
        # [layer][K, V][token][head][dim]
        expected = torch.stack(
            [torch.stack([data[slot, l, "k"], data[slot, l, "v"]]) for l in range(cache.num_layers)])
    assert sum(n for _, n in ranges) == tokens * cache.bytes_per_token
    got = np.concatenate([read_range(a, n) for a, n in ranges])
    assert np.array_equal(got, expected.contiguous().numpy().view(np.uint8).reshape(-1))
    assert ranges[0][0] == cache.k_view(0).element_address(slot, 0, 0, 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_addresses_never_move_and_lie_in_the_reservation(host_backend, layout):
    cache = small_cache(host_backend, layout=layout)
    base, size = cache.reservation()
    assert base == cache.k_view(0).data
    assert size >= cache.max_slots * cache.max_tokens * cache.bytes_per_token
    slot = cache.alloc_slot()
    cache.grow(slot, 1)
    first = cache.slot_ranges(slot, 1)
    cache.grow(slot, cache.max_tokens)
    last = cache.slot_ranges(slot, cache.max_tokens)
    assert [a for a, _ in first] == [a for a, _ in last]
    for a, n in last:
        assert base <= a and a + n <= base + size
    assert cache.slot_ranges(slot, 0) == []
    assert cache.reservation() == (base, size)


def test_bad_input(host_backend):
    # max_tokens above what one granule backs, so "beyond backed" is reachable.
    cache = small_cache(host_backend, max_tokens=65536)
    with pytest.raises(vattn.InvalidArgumentError, match="slot -1"):
        cache.slot_ranges(-1, 1)
    with pytest.raises(vattn.InvalidArgumentError):
        cache.slot_ranges(cache.max_slots, 1)
    with pytest.raises(vattn.FailedPreconditionError, match="not active"):
        cache.slot_ranges(0, 1)
    slot = cache.alloc_slot()
    with pytest.raises(vattn.InvalidArgumentError, match="-5"):
        cache.slot_ranges(slot, -5)
    cache.grow(slot, 10)
    backed = cache.slot_info(slot).backed_tokens
    assert backed < cache.max_tokens
    assert len(cache.slot_ranges(slot, backed)) == 1
    with pytest.raises(vattn.OutOfRangeError, match="Grow it first"):
        cache.slot_ranges(slot, backed + 1)
    with pytest.raises(vattn.OutOfRangeError):
        cache.slot_ranges(slot, cache.max_tokens + 1)
    cache.free(slot)
    with pytest.raises(vattn.FailedPreconditionError):
        cache.slot_ranges(slot, 1)
    cache.close()
    with pytest.raises(vattn.FailedPreconditionError, match="closed"):
        cache.slot_ranges(slot, 1)
