# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""stats() and slot_info() report what the calls did, under CacheStats' and
SlotInfo's field names."""

import torch

import vattn
from conftest import small_cache

STATS_FIELDS = [
    "physical_bytes", "pooled_bytes", "mapped_bytes", "surplus_bytes", "logical_bytes",
    "budget_bytes", "peak_physical_bytes", "active_slots", "idle_slots_with_memory",
    "create_calls", "destroy_calls", "map_calls", "unmap_calls", "grow_calls",
    "extents_mapped", "reuse_hits", "adopted_extents", "reclaimed_bytes",
    "reclaimed_extents", "fence_waits", "zeroed_bytes", "quarantined_extents",
    "quarantined_bytes", "background_failures", "step_calls", "step_misses",
    "step_map_nanos", "background_extents", "background_creates",
    "background_wakeups", "background_deadline_wakeups", "background_caller_wakeups",
]


def test_stats_follow_the_calls(backend):
    cache = small_cache(backend)
    st = cache.stats()
    for field in STATS_FIELDS:
        assert isinstance(getattr(st, field), int), field
    assert st.active_slots == 0 and st.mapped_bytes == 0
    slot = cache.alloc_slot(expected_tokens=100)
    cache.grow(slot, 100)
    st = cache.stats()
    assert st.active_slots == 1 and st.grow_calls == 1
    assert st.map_calls >= 1 and st.create_calls >= 1
    assert st.mapped_bytes > 0 and st.physical_bytes >= st.mapped_bytes
    assert st.logical_bytes == 100 * cache.bytes_per_token
    info = cache.slot_info(slot)
    assert info.active and info.length == 100 and info.backed_tokens >= 100
    assert info.mapped_bytes == st.mapped_bytes and info.extents >= 1
    for n in range(101, 120):
        cache.step([(slot, n)])
    st = cache.stats()
    assert st.step_calls == 19 and st.step_misses >= 0
    cache.free(slot)
    st = cache.stats()
    assert st.active_slots == 0 and st.idle_slots_with_memory == 1 and st.logical_bytes == 0
    again = cache.alloc_slot(expected_tokens=50)
    assert cache.stats().reuse_hits == 1 and again == slot
    assert "memory:" in str(st) and "CacheStats(" in repr(st)


def test_budget_and_reclaim(host_backend):
    budget = 8 << 20
    cache = small_cache(host_backend, max_slots=4, num_kv_heads=8, head_dim=128,
                        memory_budget_bytes=budget)  # 24 KiB per token.
    per_slot = (2 << 20) // cache.bytes_per_token
    a = cache.alloc_slot()
    cache.grow(a, per_slot * 3)
    cache.free(a)
    b = cache.alloc_slot(expected_tokens=0)
    c = cache.alloc_slot()
    cache.grow(c, per_slot * 4)  # Needs a's memory back.
    st = cache.stats()
    assert st.budget_bytes == budget and st.physical_bytes <= budget
    assert st.reclaimed_bytes > 0 or st.adopted_extents > 0 or c == a
    assert b != c
