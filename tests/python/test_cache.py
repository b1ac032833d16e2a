# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""The API as README shows it, and zero-copy views: torch and numpy alias the
cache's memory (data_ptr and strides equal the C++ views'), writes through
torch are seen through the C++ API (Backend.copy_from_device) and back."""

import numpy as np
import pytest
import torch

import vattn
from conftest import DTYPES, LAYOUTS, small_cache

ELEMENT_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4,
                 torch.float8_e4m3fn: 1, torch.int8: 1}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float8_e4m3fn: "float8_e4m3fn", torch.int8: "int8"}


def test_readme_example(backend):
    cache = vattn.Cache(num_layers=4, num_kv_heads=2, head_dim=64,
                        dtype=torch.float16, max_slots=8, max_tokens=4096, backend=backend,
                        layout="token-major", map_ahead_tokens=0, memory_budget_bytes=0)
    slot = cache.alloc_slot(expected_tokens=100)
    cache.grow(slot, 100)
    k = torch.from_dlpack(cache.k(0))
    v = torch.from_dlpack(cache.v(0))
    assert k.shape == (8, 4096, 2, 64) and v.shape == (8, 4096, 2, 64)
    ks = torch.from_dlpack(cache.k(0, slot=slot))
    info = cache.slot_info(slot)
    assert ks.shape == (info.backed_tokens, 2, 64)
    assert info.backed_tokens >= 100 and info.length == 100 and info.active
    r = cache.step([(slot, 101)])
    assert r.misses >= 0 and r.map_nanos >= 0
    assert cache.slot_info(slot).length == 101
    cache.shrink(slot, 50)
    assert cache.slot_info(slot).length == 50
    cache.free(slot, stream=None)
    st = cache.stats()
    assert st.active_slots == 0 and st.step_calls == 1 and st.grow_calls >= 1
    assert not cache.slot_info(slot).active
    other = cache.alloc_slot()
    cache.free(other, fence=False)  # KVCache::Free(slot, kNoFence).
    with pytest.raises(TypeError, match="fence"):
        cache.free(cache.alloc_slot(), stream=0, fence=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_views_alias_the_cache(backend, layout, dtype):
    cache = small_cache(backend, dtype=dtype, layout=layout)
    assert cache.dtype == DTYPE_NAMES[dtype]
    slot = cache.alloc_slot()
    cache.grow(slot, 40)
    for layer in range(cache.num_layers):
        for kind in ("k", "v"):
            view = getattr(cache, f"{kind}_view")(layer)
            t = torch.from_dlpack(getattr(cache, kind)(layer))
            assert t.dtype == dtype
            assert t.device == torch.device(cache.device)
            assert t.data_ptr() == view.data
            assert tuple(t.shape) == view.shape == (4, 1024, 2, 16)
            assert t.stride() == view.strides
            # Never let pytest print a whole view: tokens that no Grow backed
            # are not mapped (reading them faults).
            token_stride = t.stride(1)
            if layout == "token-major":
                assert token_stride == cache.num_layers * 2 * 2 * 16
            else:
                assert token_stride == 2 * 16  # Packed rows per layer.
            # torch -> C++ API: a pattern written through torch is read back
            # through the backend at the C++ view's element address.
            row = torch.arange(16, dtype=torch.float32).add(layer * 10 + (kind == "v"))
            t[slot, 7, 1] = row.to(dtype) if dtype != torch.int8 else row.to(torch.int8)
            size = ELEMENT_BYTES[dtype]
            got = cache.backend.copy_from_device(view.element_address(slot, 7, 1, 0), 16 * size)
            expected = t[slot, 7, 1].cpu().contiguous().view(torch.uint8).numpy().tobytes()
            assert got == expected
            # C++ API -> torch.
            data = bytes(range(1, 1 + 16 * size))
            cache.backend.copy_to_device(view.element_address(slot, 9, 0, 0), data)
            back = t[slot, 9, 0].cpu().contiguous().view(torch.uint8).numpy().tobytes()
            assert back == data


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slot_view_is_the_slots_rows(backend, layout):
    cache = small_cache(backend, layout=layout)
    a = cache.alloc_slot()
    b = cache.alloc_slot()
    cache.grow(a, 10)
    cache.grow(b, 300)
    full = torch.from_dlpack(cache.k(1))
    sb = torch.from_dlpack(cache.k(1, slot=b))
    assert sb.shape[0] == cache.slot_info(b).backed_tokens >= 300
    assert sb.data_ptr() == full[b].data_ptr()
    assert sb.stride() == full[b].stride()
    sb[299].fill_(3.0)
    seen = bool(torch.equal(full[b, 299], torch.full((2, 16), 3.0, device=full.device)))
    assert seen


def test_numpy_from_dlpack(host_backend):
    cache = small_cache(host_backend, dtype="float16")
    slot = cache.alloc_slot()
    cache.grow(slot, 5)
    n = np.from_dlpack(cache.k(0))
    t = torch.from_dlpack(cache.k(0))
    assert n.dtype == np.float16 and n.shape == tuple(t.shape)
    assert n.__array_interface__["data"][0] == t.data_ptr()
    assert n.strides == tuple(s * 2 for s in t.stride())
    t[slot, 4, 1, 3] = 1.5
    assert n[slot, 4, 1, 3] == np.float16(1.5)


def test_dlpack_device(backend):
    cache = small_cache(backend)
    kind, ordinal = cache.k(0).__dlpack_device__()
    if backend.host_accessible:
        assert (kind, ordinal) == (1, 0) and cache.device == "cpu"  # kDLCPU
    else:
        assert (kind, ordinal) == (2, backend.device)  # kDLCUDA
        assert cache.device == f"cuda:{backend.device}"


def test_dtype_spellings(host_backend):
    for spelling, name in [(torch.bfloat16, "bfloat16"), ("bf16", "bfloat16"), ("half", "float16"),
                           (np.dtype("float32"), "float32"), ("fp8", "float8_e4m3fn"),
                           ("INT8", "int8")]:
        assert small_cache(host_backend, dtype=spelling).dtype == name


def test_step_accepts_pairs_and_tensors(host_backend):
    cache = small_cache(host_backend, max_slots=4)
    slots = [cache.alloc_slot() for _ in range(3)]
    cache.step([(s, 10 + i) for i, s in enumerate(slots)])
    assert [cache.slot_info(s).length for s in slots] == [10, 11, 12]
    cache.step([[s, 20] for s in slots])  # Lists as pairs too.
    assert [cache.slot_info(s).length for s in slots] == [20, 20, 20]
    for idx_dtype in (torch.int32, torch.int64):
        cache.step(torch.tensor(slots, dtype=idx_dtype), torch.tensor([30, 31, 32]))
        assert [cache.slot_info(s).length for s in slots] == [30, 31, 32]
    cache.step(np.array(slots), np.array([40, 41, 42], dtype=np.int32))
    assert [cache.slot_info(s).length for s in slots] == [40, 41, 42]
    # Strided tensors are read through their strides.
    both = torch.tensor([[slots[0], 50], [slots[1], 51], [slots[2], 52]])
    cache.step(both[:, 0], both[:, 1])
    assert [cache.slot_info(s).length for s in slots] == [50, 51, 52]
    assert cache.stats().step_calls == 6
    cache.step([])  # An empty batch is a no-op step.
    # A StepBatch owns the StepRequest array; its slots/tokens views alias it.
    batch = vattn.StepBatch(torch.tensor(slots), torch.tensor([60, 61, 62], dtype=torch.int32))
    assert len(batch) == 3
    cache.step(batch)
    assert [cache.slot_info(s).length for s in slots] == [60, 61, 62]
    tokens_view = torch.from_dlpack(batch.tokens)
    assert tokens_view.dtype == torch.int64 and tokens_view.tolist() == [60, 61, 62]
    assert torch.from_dlpack(batch.slots).tolist() == slots
    tokens_view += 5
    cache.step(batch)
    assert [cache.slot_info(s).length for s in slots] == [65, 66, 67]
    np.from_dlpack(batch.tokens)[1] = 70
    cache.step(batch)
    assert [cache.slot_info(s).length for s in slots] == [65, 70, 67]
    del batch
    tokens_view += 1  # The view keeps the batch's memory alive.
    assert tokens_view.tolist() == [66, 71, 68]
    with pytest.raises(TypeError):
        vattn.StepBatch(torch.tensor([0.5]), torch.tensor([1]))
    with pytest.raises(vattn.InvalidArgumentError):
        vattn.StepBatch(torch.tensor([0, 1]), torch.tensor([1]))


def test_map_ahead_and_wait(host_backend):
    cache = small_cache(host_backend, map_ahead_tokens=256)
    slot = cache.alloc_slot(expected_tokens=100)
    cache.wait_for_background_idle()
    assert cache.slot_info(slot).backed_tokens >= 100
    r = cache.step([(slot, 90)])
    assert r.misses == 0


def test_options_round_trip(host_backend):
    cache = small_cache(host_backend, layout="layer-major", zero_on_reuse=True,
                        max_extent_tokens=32, memory_budget_bytes=64 << 20)
    o = cache.options
    assert o["layout"] == "layer-major" and o["zero_on_reuse"] is True
    assert o["max_extent_tokens"] == 32 and o["memory_budget_bytes"] == 64 << 20
    assert o["num_layers"] == 3 and o["dtype"] == "float32"
    assert cache.bytes_per_token == 3 * 2 * 2 * 16 * 4
    assert cache.layout == "layer-major"


def test_backends_and_wrappers(host_backend):
    assert host_backend.name == "host" and host_backend.device == -1
    assert host_backend.granularity == 2 << 20 and host_backend.host_accessible
    lat = vattn.LatencyModelBackend(host_backend, costs="zero")
    assert "host" in lat.name and lat.host_accessible
    cache = small_cache(lat)
    slot = cache.alloc_slot()
    cache.grow(slot, 10)
    assert lat.counters()["calls"]["map"] == 1
    assert host_backend.counters()["calls"]["map"] == 1
    assert vattn.default_backend().name in ("host", "cuda:0")


def test_no_libcuda_linked():
    """The extension loads libcuda at run time, never links it."""
    import subprocess
    import vattn._vattn as ext
    out = subprocess.run(["readelf", "-d", ext.__file__], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("readelf not available")
    needed = [l for l in out.stdout.splitlines() if "NEEDED" in l]
    assert needed, out.stdout
    assert not any("libcuda" in l for l in needed), needed
    assert not any("libvattn" in l for l in needed), needed  # Linked in.
