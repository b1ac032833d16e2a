# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""HF transformers' own generate() on vattn memory: VattnCache gives exactly
the tokens of the default DynamicCache (greedy, batch 3 with left padding) on
randomly initialised small Llama and Qwen2 models (grouped-query attention;
configs built here, nothing downloaded), in fp32 and bf16."""

import gc

import pytest
import torch

import vattn
from conftest import cuda_skip_reason

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from vattn.transformers import VattnCache  # noqa: E402

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llama():
    return LlamaForCausalLM(LlamaConfig(**SHAPE))


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=False))


MODELS = {"llama": llama, "qwen2": qwen2}


def make_model(name, dtype, device):
    torch.manual_seed(1234)
    return MODELS[name]().to(dtype=dtype, device=device).eval()


def left_padded_batch(device):
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(3, SHAPE["vocab_size"], (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 6)):
        ids[row, :pad] = SHAPE["pad_token_id"]
        mask[row, :pad] = 0
    return ids.to(device), mask.to(device)


def backend_for(kind):
    if kind == "host":
        return vattn.HostBackend(), "cpu"
    reason = cuda_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return vattn.CudaBackend(device=0), "cuda:0"


def generate(model, ids, mask, cache=None, **kw):
    args = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                pad_token_id=SHAPE["pad_token_id"])
    args.update(kw)
    if cache is not None:
        args["cache"] = cache
    with torch.no_grad():
        return model.generate(ids, **args)


@pytest.mark.parametrize("kind", ["host", "cuda"])
@pytest.mark.parametrize("layout", ["token-major", "layer-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_generate_matches_dynamic_cache(model_name, dtype, layout, kind):
    backend, device = backend_for(kind)
    model = make_model(model_name, dtype, device)
    ids, mask = left_padded_batch(device)
    want = generate(model, ids, mask)
    default_cache = DynamicCache(config=model.config)
    assert torch.equal(generate(model, ids, mask, cache=default_cache), want)

    cache = VattnCache(model.config, max_batch_size=3, max_tokens=128, dtype=dtype,
                       backend=backend, layout=layout)
    got = generate(model, ids, mask, cache=cache)
    assert got.shape == want.shape
    assert torch.equal(got, want), (got, want)
    # Stronger than the tokens: every step's logits are bitwise equal too.
    cache.reset()
    ours = generate(model, ids, mask, cache=cache, output_logits=True,
                    return_dict_in_generate=True)
    ref = generate(model, ids, mask, output_logits=True, return_dict_in_generate=True)
    assert len(ours.logits) == len(ref.logits) == 24
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, ref.logits))
    # One step per model step (prefill + 23 decode steps), every row grown.
    st = cache.vattn_cache.stats()
    assert st.step_calls == 48 and st.active_slots == 3
    assert cache.get_seq_length() == ids.shape[1] + 23
    # The layer's keys are views of vattn's memory, not copies.
    k_full = torch.from_dlpack(cache.vattn_cache.k(0))
    keys = cache.layers[0].keys
    assert keys.shape == (3, 2, ids.shape[1] + 23, 16)
    assert keys.data_ptr() == k_full[cache._slots[0]].data_ptr()


def test_default_backend_and_reuse_after_reset():
    model = make_model("llama", torch.float32, "cpu")
    ids, mask = left_padded_batch("cpu")
    want = generate(model, ids, mask)
    if cuda_skip_reason() is not None:
        cache = VattnCache(model.config, max_batch_size=3, max_tokens=128, dtype=torch.float32)
        assert cache.vattn_cache.device == "cpu"
    else:
        cache = VattnCache(model.config, max_batch_size=3, max_tokens=128,
                           dtype=torch.float32, backend=vattn.HostBackend())
    assert torch.equal(generate(model, ids, mask, cache=cache), want)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.vattn_cache.stats().active_slots == 0
    assert torch.equal(generate(model, ids, mask, cache=cache), want)  # Reused slots.
    assert cache.vattn_cache.stats().reuse_hits >= 3


def test_crop_then_continue_matches():
    model = make_model("qwen2", torch.float32, "cpu")
    ids, mask = left_padded_batch("cpu")
    ref = DynamicCache(config=model.config)
    ours = VattnCache(model.config, max_batch_size=3, max_tokens=128, dtype=torch.float32,
                      backend=vattn.HostBackend())
    with torch.no_grad():
        for cache in (ref, ours):
            model(ids, attention_mask=mask, cache=cache)
            cache.crop(-4)
        assert ours.get_seq_length() == ref.get_seq_length() == ids.shape[1] - 4
        step_ids = ids[:, -4:]
        a = model(step_ids, attention_mask=mask, cache=ref).logits
        b = model(step_ids, attention_mask=mask, cache=ours).logits
    assert torch.equal(a, b)
    assert ours.vattn_cache.slot_info(ours._slots[0]).length == ids.shape[1]
    with pytest.raises(ValueError):
        ours.crop(3)


def test_beam_search_matches():
    model = make_model("llama", torch.float32, "cpu")
    ids, mask = left_padded_batch("cpu")
    kw = dict(num_beams=2, max_new_tokens=8)
    try:
        want = generate(model, ids, mask, **kw)
    except Exception as e:  # Beam search may live outside the library.
        pytest.skip(f"this transformers does not beam-search here: {e}")
    cache = VattnCache(model.config, max_batch_size=6, max_tokens=64, dtype=torch.float32,
                       backend=vattn.HostBackend())
    assert torch.equal(generate(model, ids, mask, cache=cache, **kw), want)


def test_clear_errors():
    model = make_model("llama", torch.float32, "cpu")
    ids, mask = left_padded_batch("cpu")
    small = VattnCache(model.config, max_batch_size=2, max_tokens=64, dtype=torch.float32,
                       backend=vattn.HostBackend())
    with pytest.raises(vattn.ResourceExhaustedError, match="max_batch_size=2"):
        generate(model, ids, mask, cache=small)
    wrong = VattnCache(model.config, max_batch_size=3, max_tokens=64, dtype=torch.bfloat16,
                       backend=vattn.HostBackend())
    with pytest.raises(TypeError, match="bfloat16"):
        generate(model, ids, mask, cache=wrong)
    short = VattnCache(model.config, max_batch_size=3, max_tokens=16, dtype=torch.float32,
                       backend=vattn.HostBackend())
    with pytest.raises(vattn.OutOfRangeError):
        generate(model, ids, mask, cache=short)
    sliding = Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(NotImplementedError):
        VattnCache(sliding, max_batch_size=1, max_tokens=64, backend=vattn.HostBackend())


def test_memory_goes_back_when_dropped():
    backend = vattn.HostBackend()
    model = make_model("llama", torch.float32, "cpu")
    ids, mask = left_padded_batch("cpu")
    before = backend.counters()
    cache = VattnCache(model.config, max_batch_size=3, max_tokens=128, dtype=torch.float32,
                       backend=backend)
    out = generate(model, ids, mask, cache=cache)
    assert backend.counters()["mappings"] > 0
    del cache
    gc.collect()
    after = backend.counters()
    assert (after["reservations"], after["handles"], after["mappings"]) == (
        before["reservations"], before["handles"], before["mappings"])
    assert out.shape[0] == 3
