# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""Prefix sharing from Python (issue 13): keep_prefix, alloc_slot_with_prefix,
drop_prefix and fork on vattn.Cache. Data written before sharing reads the
same through every slot's zero-copy torch view, physical bytes do not grow by
the shared part, the errors are the module's (NotFoundError for an unknown
id, AlreadyExistsError for a used one), and the stats count what happened."""

import pytest
import torch

import vattn

# 2 layers x 4 heads x 64 dims, float32: 4 KiB a token, 512 tokens per
# 2 MiB granule.
TOKENS_PER_GRANULE = 512
GRANULE = 2 << 20


def make_cache(backend, **overrides):
    options = dict(num_layers=2, num_kv_heads=4, head_dim=64, dtype=torch.float32,
                   max_slots=8, max_tokens=4096, backend=backend)
    options.update(overrides)
    return vattn.Cache(**options)


def write(cache, slot, start, stop, seed):
    """Distinct values into tokens [start, stop) of every layer's K and V."""
    device = torch.device(cache.device)
    for layer in range(cache.num_layers):
        for kind, view in (("k", cache.k), ("v", cache.v)):
            t = torch.from_dlpack(view(layer, slot=slot))
            g = torch.Generator().manual_seed(seed * 1000 + layer * 2 + (kind == "v"))
            t[start:stop] = torch.rand(stop - start, *t.shape[1:], generator=g).to(device)


def expected(cache, start, stop, seed):
    out = []
    for layer in range(cache.num_layers):
        for kind in ("k", "v"):
            g = torch.Generator().manual_seed(seed * 1000 + layer * 2 + (kind == "v"))
            out.append(torch.rand(stop - start, 4, 64, generator=g))
    return out


def read(cache, slot, start, stop):
    out = []
    for layer in range(cache.num_layers):
        for view in (cache.k, cache.v):
            out.append(torch.from_dlpack(view(layer, slot=slot))[start:stop].cpu().clone())
    return out


def assert_holds(cache, slot, start, stop, seed):
    for got, want in zip(read(cache, slot, start, stop), expected(cache, start, stop, seed)):
        assert torch.equal(got, want), f"slot {slot} tokens [{start}, {stop})"


def test_shared_prefix_reads_the_same_through_every_slot(backend):
    cache = make_cache(backend)
    prefix = 2 * TOKENS_PER_GRANULE  # A system prompt of two whole granules.
    owner = cache.alloc_slot(prefix + 50, prefix)  # Its own extent up to the boundary.
    cache.grow(owner, prefix + 50)
    write(cache, owner, 0, prefix + 50, seed=1)
    cache.keep_prefix(owner, prefix, prefix_id=7)
    before = cache.stats()

    users = []
    for i in range(3):
        slot = cache.alloc_slot_with_prefix(7, prefix + 20)
        assert slot != owner and slot not in users
        info = cache.slot_info(slot)
        assert info.active and info.length == prefix + 20 and info.backed_tokens >= prefix + 20
        assert_holds(cache, slot, 0, prefix, seed=1)
        write(cache, slot, prefix, prefix + 20, seed=10 + i)  # Its own message.
        users.append(slot)
    for i, slot in enumerate(users):
        assert_holds(cache, slot, 0, prefix, seed=1)
        assert_holds(cache, slot, prefix, prefix + 20, seed=10 + i)
    assert_holds(cache, owner, 0, prefix + 50, seed=1)

    after = cache.stats()
    # Each user maps the two shared granules; only its own tail is new.
    assert after.physical_bytes - before.physical_bytes <= 3 * GRANULE
    assert after.prefix_hits - before.prefix_hits == 3
    assert after.shared_bytes >= 2 * GRANULE
    assert after.shared_saved_bytes >= 3 * 2 * GRANULE
    assert after.cached_prefixes == 1 and after.cached_prefix_bytes >= 2 * GRANULE
    p = cache.prefix_info(7)
    assert isinstance(p, vattn.PrefixInfo)
    assert p.tokens == prefix and p.hits == 3 and p.users >= 3 and p.whole_extents >= 1
    assert "PrefixInfo(" in repr(p)

    # Dropped: the users keep the memory, the owner may go first, the id is gone.
    cache.drop_prefix(7)
    cache.free(owner)
    for slot in users:
        assert_holds(cache, slot, 0, prefix, seed=1)
    with pytest.raises(vattn.NotFoundError):
        cache.alloc_slot_with_prefix(7, 10)
    assert cache.stats().cached_prefixes == 0


def test_partly_shared_tail_is_copied(backend):
    cache = make_cache(backend)
    tokens = TOKENS_PER_GRANULE + 100  # One whole granule and a tail.
    owner = cache.alloc_slot(expected_tokens=tokens + 60)
    cache.grow(owner, tokens + 60)
    write(cache, owner, 0, tokens + 60, seed=2)
    cache.keep_prefix(owner, tokens, 11)
    slot = cache.alloc_slot_with_prefix(11, tokens, expected_tokens=tokens + 30)
    assert cache.slot_info(slot).length == tokens
    assert cache.slot_info(slot).backed_tokens >= tokens + 30
    assert_holds(cache, slot, 0, tokens, seed=2)
    # Writing after the prefix goes to the user's own copy of the tail's
    # extent: the owner's tokens there are untouched.
    write(cache, slot, tokens, tokens + 30, seed=3)
    assert_holds(cache, slot, tokens, tokens + 30, seed=3)
    assert_holds(cache, owner, 0, tokens + 60, seed=2)
    st = cache.stats()
    assert st.cow_copied_bytes >= 100 * cache.bytes_per_token and st.copy_calls >= 1


def test_fork_shares_every_token(backend):
    cache = make_cache(backend)
    parent = cache.alloc_slot(expected_tokens=700)
    cache.grow(parent, 700)
    write(cache, parent, 0, 700, seed=4)
    children = [cache.fork(parent) for _ in range(3)]  # n = 4 samples
    assert len(set(children + [parent])) == 4
    for i, child in enumerate(children):
        assert cache.slot_info(child).length == 700
        assert_holds(cache, child, 0, 700, seed=4)
        cache.step([(child, 701)])
        write(cache, child, 700, 701, seed=20 + i)
    cache.step([(parent, 701)])
    write(cache, parent, 700, 701, seed=30)
    for i, child in enumerate(children):
        assert_holds(cache, child, 0, 700, seed=4)
        assert_holds(cache, child, 700, 701, seed=20 + i)
    assert_holds(cache, parent, 700, 701, seed=30)
    assert cache.stats().forks == 3
    cache.free(parent)
    assert_holds(cache, children[0], 0, 700, seed=4)


def test_errors_are_the_modules(host_backend):
    cache = make_cache(host_backend)
    slot = cache.alloc_slot(expected_tokens=100)
    cache.grow(slot, 100)
    cache.keep_prefix(slot, 64, 5)
    with pytest.raises(vattn.AlreadyExistsError) as e:
        cache.keep_prefix(slot, 32, 5)
    assert e.value.code_name == "ALREADY_EXISTS" and isinstance(e.value, vattn.Error)
    with pytest.raises(vattn.NotFoundError) as e:
        cache.alloc_slot_with_prefix(6, 10)
    assert e.value.code_name == "NOT_FOUND"
    with pytest.raises(vattn.NotFoundError):
        cache.drop_prefix(6)
    with pytest.raises(vattn.NotFoundError):
        cache.prefix_info(6)
    with pytest.raises(vattn.InvalidArgumentError):
        cache.keep_prefix(99, 10, 8)
    with pytest.raises(vattn.InvalidArgumentError):
        cache.keep_prefix(slot, 0, 8)
    with pytest.raises(vattn.OutOfRangeError):
        cache.keep_prefix(slot, 101, 8)
    with pytest.raises(vattn.InvalidArgumentError):
        cache.alloc_slot_with_prefix(5, 0)
    with pytest.raises(vattn.OutOfRangeError):
        cache.alloc_slot_with_prefix(5, 5000)
    with pytest.raises(vattn.InvalidArgumentError):
        cache.fork(-1)
    idle = cache.alloc_slot()
    cache.free(idle)
    with pytest.raises(vattn.FailedPreconditionError):
        cache.fork(idle)
    with pytest.raises(vattn.InvalidArgumentError):
        cache.alloc_slot(10, -1)
    with pytest.raises(TypeError):
        cache.keep_prefix(slot, 10, -1)  # Ids are unsigned 64-bit.
    with pytest.raises(TypeError):
        cache.fork(slot, stream="not a stream")
    # Nothing above changed the prefix; a stream of None is the default.
    assert cache.prefix_info(5).tokens == 64 and cache.prefix_info(5).hits == 0
    other = cache.alloc_slot_with_prefix(5, 64, stream=None)
    assert cache.prefix_info(5).hits == 1 and cache.slot_info(other).length == 64


def test_options_and_stats_fields(host_backend):
    cache = make_cache(host_backend, max_prefixes=0)
    assert cache.options["max_prefixes"] == 0
    slot = cache.alloc_slot(expected_tokens=10)
    cache.grow(slot, 10)
    with pytest.raises(vattn.ResourceExhaustedError):
        cache.keep_prefix(slot, 10, 1)
    st = cache.stats()
    for field in ("shared_bytes", "shared_saved_bytes", "cached_prefixes",
                  "cached_prefix_bytes", "prefix_hits", "forks", "prefix_evictions",
                  "cow_copied_bytes", "copy_calls", "set_access_calls"):
        assert isinstance(getattr(st, field), int), field
    assert make_cache(host_backend).options["max_prefixes"] > 0


def test_split_hint_maps_the_boundary_as_its_own_extent(host_backend):
    cache = make_cache(host_backend)
    boundary = TOKENS_PER_GRANULE
    slot = cache.alloc_slot(boundary + 10, boundary)
    cache.grow(slot, boundary + 10)
    assert cache.slot_info(slot).extents >= 2
    other = cache.alloc_slot()
    cache.grow(other, boundary + 10, boundary)
    assert cache.slot_info(other).extents >= 2
    cache.keep_prefix(slot, boundary, 1)
    assert cache.prefix_info(1).tail_bytes == 0 and cache.prefix_info(1).whole_extents >= 1
