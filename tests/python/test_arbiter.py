# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""vattn.MemoryArbiter: one budget shared by caches, memory moving from one
cache's idle slots to another, set_budget and trim on the arbiter and on a
cache, the JSON telemetry (parsed with Python's json), the GIL released
while an arbiter call reclaims, and the errors."""

import json
import sys
import threading
import time

import pytest

import vattn

G = 2 << 20  # The Host backend's granularity.


def make_cache(backend, arbiter, **options):
    # 1 KiB of K/V per token: a granule is 2048 tokens, a slot holds 4.
    return vattn.Cache(backend=backend, arbiter=arbiter, num_layers=2, num_kv_heads=2,
                       head_dim=64, dtype="float16", max_slots=4, max_tokens=8192,
                       **options)


def fill_then_idle(cache, slots=2):
    held = []
    for _ in range(slots):
        s = cache.alloc_slot(expected_tokens=8192)
        cache.grow(s, 8192)
        held.append(s)
    for s in held:
        cache.free(s, fence=False)


def test_memory_moves_between_caches_and_telemetry_shows_it():
    backend = vattn.HostBackend()
    arbiter = vattn.MemoryArbiter(backend, 8 * G)
    assert arbiter.budget_bytes == 8 * G
    assert "MemoryArbiter(budget_bytes=" in repr(arbiter)
    a = make_cache(backend, arbiter, arbiter_name="alpha", arbiter_floor_bytes=G)
    b = make_cache(None, arbiter, arbiter_name="beta", arbiter_cap_bytes=6 * G)  # The arbiter's backend.
    assert a.options["arbiter_name"] == "alpha"
    assert a.options["arbiter_floor_bytes"] == G
    assert b.options["arbiter_cap_bytes"] == 6 * G

    fill_then_idle(a)
    assert a.stats().physical_bytes == 8 * G
    s = b.alloc_slot(expected_tokens=8192)
    b.grow(s, 8192)  # Served from a's idle memory.
    assert b.stats().physical_bytes == 4 * G
    assert a.stats().physical_bytes + b.stats().physical_bytes <= 8 * G

    text = arbiter.telemetry_json()
    t = json.loads(text)
    assert t == arbiter.telemetry()
    assert t["version"] == 1
    assert t["budget_bytes"] == 8 * G
    assert [c["name"] for c in t["caches"]] == ["alpha", "beta"]
    alpha, beta = t["caches"]
    assert alpha["floor_bytes"] == G and beta["cap_bytes"] == 6 * G
    assert alpha["physical_bytes"] == a.stats().physical_bytes
    assert alpha["reclaimed_from_bytes"] >= 4 * G
    assert beta["reclaimed_for_bytes"] == alpha["reclaimed_from_bytes"]
    assert beta["active_bytes"] == 4 * G
    assert t["cross_reclaims"] >= 1
    assert sum(c["physical_bytes"] for c in t["caches"]) == t["physical_bytes"]


def test_set_budget_and_trim():
    backend = vattn.HostBackend()
    arbiter = vattn.MemoryArbiter(backend, 8 * G)
    c = make_cache(backend, arbiter)
    s = c.alloc_slot(expected_tokens=8192)
    c.grow(s, 8192)  # 4 granules, active
    fill_then_idle(c, slots=1)  # and 4 idle
    assert c.stats().physical_bytes == 8 * G
    with pytest.raises(vattn.ResourceExhaustedError) as e:
        arbiter.set_budget(2 * G)  # Below the active 4: idle goes, the budget stands.
    assert isinstance(e.value, MemoryError)
    assert arbiter.budget_bytes == 2 * G
    assert c.stats().physical_bytes == 4 * G
    arbiter.set_budget(8 * G)
    c.free(s, fence=False)
    assert arbiter.trim(2 * G) == 4 * G  # One 4-granule extent: all or nothing.
    assert c.stats().physical_bytes == 0
    assert arbiter.telemetry()["caches"][0]["trimmed_bytes"] == 8 * G

    s = c.alloc_slot(expected_tokens=4096)
    c.grow(s, 4096)
    c.grow(s, 8192)  # Two 2-granule extents.
    c.free(s, fence=False)
    assert c.trim(2 * G) == 2 * G
    assert c.stats().physical_bytes == 2 * G
    c.set_budget(4 * G)
    with pytest.raises(vattn.InvalidArgumentError):
        arbiter.set_budget(0)

    own = vattn.Cache(backend=backend, num_layers=2, num_kv_heads=2, head_dim=64,
                      max_slots=2, max_tokens=8192, memory_budget_bytes=4 * G)
    own.set_budget(2 * G)
    assert own.stats().budget_bytes == 2 * G
    assert own.trim(0) == 0


def test_the_gil_is_released_while_reclaiming():
    # With a switch interval far longer than the test, the GIL changes hands
    # only where a thread gives it up: the spinner after each tick
    # (time.sleep(0)), the main thread only inside calls that release it. So
    # the spinner ticks between `before` and the check only if trim or
    # set_budget released the GIL (it can never pass with the GIL held).
    backend = vattn.LatencyModelBackend(vattn.HostBackend())  # H200 costs: slow destroys.
    arbiter = vattn.MemoryArbiter(backend, 64 * G)
    c = make_cache(backend, arbiter)
    ticks = 0
    stop = threading.Event()

    def spin():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0)

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    t = threading.Thread(target=spin)
    t.start()
    released = False
    try:
        for _ in range(50):
            fill_then_idle(c, slots=4)
            before = ticks
            arbiter.trim(0)
            arbiter.set_budget(32 * G)
            arbiter.set_budget(64 * G)
            if ticks > before:
                released = True
                break
    finally:
        stop.set()
        sys.setswitchinterval(old)
        t.join()
    assert released


def test_errors():
    backend = vattn.HostBackend()
    with pytest.raises(vattn.InvalidArgumentError):
        vattn.MemoryArbiter(backend, 0)
    with pytest.raises(TypeError):
        vattn.MemoryArbiter(None, G)
    arbiter = vattn.MemoryArbiter(backend, 4 * G)
    with pytest.raises(TypeError):
        make_cache(backend, "not an arbiter")
    with pytest.raises(vattn.InvalidArgumentError) as e:
        make_cache(vattn.HostBackend(), arbiter)  # Another backend.
    assert "backend" in e.value.message
    with pytest.raises(vattn.InvalidArgumentError) as e:
        make_cache(backend, arbiter, memory_budget_bytes=G)
    assert "memory_budget_bytes" in e.value.message
    with pytest.raises(vattn.InvalidArgumentError) as e:
        make_cache(backend, None, arbiter_floor_bytes=G)
    assert "arbiter_floor_bytes" in e.value.message
    c = make_cache(backend, arbiter)
    c.close()
    with pytest.raises(vattn.FailedPreconditionError):
        c.trim(0)
    with pytest.raises(vattn.FailedPreconditionError):
        c.set_budget(G)
