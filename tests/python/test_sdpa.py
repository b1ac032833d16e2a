# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""An unchanged third-party kernel on the views: PyTorch's
scaled_dot_product_attention over strided K/V views of the cache equals SDPA
over packed copies (bitwise on the CPU), with grouped-query attention, at
several lengths, in both layouts."""

import pytest
import torch
import torch.nn.functional as F

from conftest import LAYOUTS, small_cache

HEADS, KV_HEADS, DIM = 8, 2, 32


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
def test_sdpa_on_views_equals_packed(backend, layout, dtype):
    lengths = [1, 17, 64, 300]
    cache = small_cache(backend, num_layers=2, num_kv_heads=KV_HEADS, head_dim=DIM,
                        dtype=dtype, max_slots=len(lengths), max_tokens=512, layout=layout)
    device = torch.device(cache.device)
    gen = torch.Generator().manual_seed(7)
    slots = [cache.alloc_slot(expected_tokens=n) for n in lengths]
    cache.step([(s, n) for s, n in zip(slots, lengths)])
    for layer in range(2):
        k_all = torch.from_dlpack(cache.k(layer))
        v_all = torch.from_dlpack(cache.v(layer))
        for slot, n in zip(slots, lengths):
            k_all[slot, :n] = torch.randn(n, KV_HEADS, DIM, generator=gen).to(dtype).to(device)
            v_all[slot, :n] = torch.randn(n, KV_HEADS, DIM, generator=gen).to(dtype).to(device)
        for slot, n in zip(slots, lengths):
            # Views [1, kv_heads, n, dim], strided (token stride from the layout).
            k = k_all[slot, :n].transpose(0, 1).unsqueeze(0)
            v = v_all[slot, :n].transpose(0, 1).unsqueeze(0)
            assert k.data_ptr() == k_all[slot].data_ptr()  # No copy.
            k_packed, v_packed = k.contiguous().clone(), v.contiguous().clone()
            assert k_packed.data_ptr() != k.data_ptr()
            for q_len in (1, min(n, 5)):
                q = torch.randn(1, HEADS, q_len, DIM, generator=gen).to(dtype).to(device)
                causal = q_len > 1
                got = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                want = F.scaled_dot_product_attention(q, k_packed, v_packed, is_causal=causal,
                                                      enable_gqa=True)
                if device.type == "cpu":
                    assert torch.equal(got, want), (layer, slot, n, q_len)
                else:
                    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
