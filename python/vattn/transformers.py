# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""HF transformers on vattn memory: `VattnCache`, a `transformers.Cache`.

    from vattn.transformers import VattnCache
    cache = VattnCache(model.config, max_batch_size=3, max_tokens=1024,
                       dtype=torch.float32, backend=None)  # None: the best present
    out = model.generate(input_ids, attention_mask=mask, cache=cache,
                         max_new_tokens=40, do_sample=False)

Each row of the batch is one vattn slot. Every decoder layer's keys and values
are written into vattn's K(l)/V(l) and read back as zero-copy strided views
`[batch, kv_heads, tokens, head_dim]` of that memory (when the rows' slots
are consecutive, which they are on a fresh cache; otherwise reads gather a
copy). One `Cache.step` per model step grows every row: the first layer that
needs the new tokens calls it; the other layers only write and read.

What generate() asks of a cache: sequence length, mask sizes, reset, crop
(assisted decoding), reorder (beam search), batch selection, and repeat on an
empty cache. Not supported (NotImplementedError): sliding-window, chunked or
linear-attention layers, layers of different shapes, offloading, and
repeating a cache that already holds tokens. Memory goes back to vattn when
the VattnCache is dropped (or at close()).
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import vattn

__all__ = ["VattnCache", "VattnLayer"]


class VattnLayer(CacheLayerMixin):
    """One decoder layer of a VattnCache: its length, and the K/V views it
    returned last. The memory and the slots belong to the VattnCache."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, owner: "VattnCache", layer_idx: int):
        super().__init__()
        self._owner = weakref.ref(owner)  # No cycle: dropping the cache frees it.
        self.layer_idx = layer_idx
        self.length = 0

    def owner(self) -> "VattnCache":
        owner = self._owner()
        if owner is None:
            raise vattn.FailedPreconditionError("the VattnCache of this layer is gone")
        return owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.owner()._check_states(key_states, value_states)
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner()._update(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        # Grows on demand like DynamicLayer (-1: no static size); the cache's
        # max_tokens is enforced at update with an OutOfRangeError.
        return -1

    def reset(self) -> None:
        self.owner()._reset()

    def crop(self, tokens_to_remove: int) -> None:
        self.owner().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.owner().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.owner().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.owner().batch_select_indices(indices)

    def offload(self):
        raise NotImplementedError("VattnCache does not offload layers (its memory is vattn's)")

    def prefetch(self):
        raise NotImplementedError("VattnCache does not offload layers (its memory is vattn's)")


def _decoder_shape(config):
    """(num_layers, num_kv_heads, head_dim) of the model's decoder, or
    NotImplementedError for layer kinds vattn's uniform layout cannot hold."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise NotImplementedError(
                f"VattnCache holds full-attention layers only; this model also has {other}")
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        if layer_types is None:
            raise NotImplementedError("VattnCache does not support sliding-window attention")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


class VattnCache(Cache):
    """A transformers.Cache whose keys and values live in a vattn.Cache.

    config: the model's config (its decoder gives layers, KV heads, head_dim).
    max_batch_size: slots (rows of a generate() batch). max_tokens: the longest
    row (prompt plus output). dtype: the model's dtype (keys must match).
    backend: a vattn.Backend, or None for vattn.default_backend(); the model
    must run on its device (CPU for the Host backend). Further keyword
    arguments are vattn.Cache options (layout="layer-major",
    map_ahead_tokens=..., memory_budget_bytes=...). Not thread-safe (like
    every transformers cache); the vattn.Cache underneath is.
    """

    def __init__(self, config, max_batch_size: int, max_tokens: int,
                 dtype: torch.dtype = torch.float32, backend: vattn.Backend | None = None,
                 **options):
        num_layers, kv_heads, head_dim = _decoder_shape(config)
        if backend is None:
            backend = vattn.default_backend()
        self.vattn_cache = vattn.Cache(
            backend=backend, num_layers=num_layers, num_kv_heads=kv_heads,
            head_dim=head_dim, dtype=dtype, max_slots=max_batch_size,
            max_tokens=max_tokens, **options)
        self.dtype = dtype
        self.device = torch.device(self.vattn_cache.device)
        self.num_kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        # Whole-cache views [slots, max_tokens, heads, dim]: the addresses
        # never move, so they are made once.
        self._k = [torch.from_dlpack(self.vattn_cache.k(l)) for l in range(num_layers)]
        self._v = [torch.from_dlpack(self.vattn_cache.v(l)) for l in range(num_layers)]
        self._slots: list[int] | None = None   # Slot of each batch row.
        self._rows = None                       # slice (consecutive slots) or index tensor.
        self._slots_tensor = None
        self._stepped = 0                       # Tokens every row is backed to.
        super().__init__(layers=[VattnLayer(self, l) for l in range(num_layers)])

    # ---- what generate() and the models call ---------------------------------

    def reset(self) -> None:
        self._reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last -tokens_to_remove tokens of every row (negative, as
        DynamicLayer takes it); the memory stays mapped."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative count of tokens to remove")
        if tokens_to_remove == 0 or self._slots is None:
            return
        length = max(0, self.get_seq_length() + tokens_to_remove)
        for layer in self.layers:
            layer.length = min(layer.length, length)
        for slot in self._slots:
            self.vattn_cache.shrink(slot, length)
        self._stepped = length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the tokens of row beam_idx[i] (a copy
        within vattn's memory, every layer)."""
        if self._slots is None:
            return
        idx = beam_idx.to(self.device)
        for layer in self.layers:
            if layer.length == 0:
                continue
            for full in (self._k[layer.layer_idx], self._v[layer.layer_idx]):
                full[self._rows, : layer.length] = (
                    full[self._rows, : layer.length].index_select(0, idx))
        for layer in self.layers:
            self._refresh(layer)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the rows `indices` (in that order) and frees the others' slots."""
        if self._slots is None:
            return
        keep = [self._slots[i] for i in torch.as_tensor(indices).tolist()]
        for slot in set(self._slots) - set(keep):
            self._free(slot)
        self._set_slots(keep)
        for layer in self.layers:
            self._refresh(layer)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._slots is None or self.get_seq_length() == 0:
            return
        raise NotImplementedError(
            "VattnCache cannot repeat rows that already hold tokens; repeat the inputs "
            "before the first forward instead")

    def close(self) -> None:
        """Frees every slot and drops this cache's views and vattn.Cache."""
        self._reset()
        self._k = self._v = []
        for layer in self.layers:
            layer.keys = layer.values = None
        self.vattn_cache.close()

    # ---- internals ------------------------------------------------------------

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise TypeError(
                f"VattnCache holds {self.dtype}, the model gave {key_states.dtype}: "
                f"build it with dtype={key_states.dtype}")
        if key_states.device != self.device:
            raise TypeError(
                f"VattnCache's memory is on {self.device}, the model runs on "
                f"{key_states.device}: pick the backend of that device")
        if key_states.shape[1] != self.num_kv_heads or key_states.shape[3] != self.head_dim:
            raise ValueError(
                f"keys of shape {tuple(key_states.shape)} do not match the cache's "
                f"{self.num_kv_heads} KV heads of dim {self.head_dim}")

    def _set_slots(self, slots: list[int]) -> None:
        self._slots = slots
        first = slots[0] if slots else 0
        if slots == list(range(first, first + len(slots))):
            self._rows = slice(first, first + len(slots))  # Zero-copy reads.
        else:
            self._rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        self._slots_tensor = torch.tensor(slots, dtype=torch.int64)

    def _start(self, batch: int, tokens: int) -> None:
        if batch > self.max_batch_size:
            raise vattn.ResourceExhaustedError(
                f"a batch of {batch} rows does not fit max_batch_size={self.max_batch_size}")
        slots = []
        try:
            for _ in range(batch):
                slots.append(self.vattn_cache.alloc_slot(expected_tokens=tokens))
        except BaseException:
            for slot in slots:
                self._free(slot)
            raise
        self._set_slots(sorted(slots))
        self._stepped = 0

    def _update(self, layer: VattnLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        self._check_states(key_states, value_states)
        batch, _, new, _ = key_states.shape
        if self._slots is None:
            self._start(batch, new)
        elif batch != len(self._slots):
            raise ValueError(
                f"the cache holds {len(self._slots)} rows, the model gave {batch}; "
                "reset() the cache between batches")
        start = layer.length
        end = start + new
        if end > self._stepped:
            # One step per model step: the first layer to need the tokens
            # grows every row (OutOfRangeError beyond max_tokens).
            self.vattn_cache.step(self._slots_tensor,
                                  torch.full((batch,), end, dtype=torch.int64))
            self._stepped = end
        k_full = self._k[layer.layer_idx]
        v_full = self._v[layer.layer_idx]
        if isinstance(self._rows, slice):
            k_full[self._rows, start:end].copy_(key_states.transpose(1, 2))
            v_full[self._rows, start:end].copy_(value_states.transpose(1, 2))
        else:
            k_full[self._rows, start:end] = key_states.transpose(1, 2)
            v_full[self._rows, start:end] = value_states.transpose(1, 2)
        layer.length = end
        return self._refresh(layer)

    def _refresh(self, layer: VattnLayer):
        """The layer's keys and values [rows, heads, length, dim]."""
        layer.keys = self._k[layer.layer_idx][self._rows, : layer.length].transpose(1, 2)
        layer.values = self._v[layer.layer_idx][self._rows, : layer.length].transpose(1, 2)
        return layer.keys, layer.values

    def _free(self, slot: int) -> None:
        stream = None
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
        self.vattn_cache.free(slot, stream=stream)

    def _reset(self) -> None:
        if self._slots is not None:
            for slot in self._slots:
                self._free(slot)
        self._slots = self._rows = self._slots_tensor = None
        self._stepped = 0
        for layer in self.layers:
            layer.length = 0
            layer.keys = layer.values = None
