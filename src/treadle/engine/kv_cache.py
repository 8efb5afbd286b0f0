"""The sampler's KV cache and the attention of decode passes.

Sampling passes keep their keys (after RoPE) and values in a :class:`KVCache` that the
sampler owns: a prefill pass is packed like training (:mod:`treadle.engine.attention`)
and also writes each segment to its cache slots (:class:`CachePrefill`, through
:func:`store_prompts`); a decode pass (:mod:`treadle.engine.decode`) has one new token per
slot and, through :func:`decode_attention`, writes it at the slot's length and attends
over the slot's past (:class:`CacheDecode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedConfig


class KVCache:
    """Keys (after RoPE) and values of running sequences, one slot per sequence.

    Per layer one preallocated buffer ``[slots, kv_heads, length, head_dim]``, grown by
    doubling, so a decode step writes one position in place instead of re-concatenating
    the whole cache the way ``DynamicCache`` does. Buffers start zeroed: positions beyond a
    slot's length are masked, and zeros (unlike uninitialised memory) cannot turn a masked
    score into NaN.
    """

    def __init__(self, config: PreTrainedConfig, device: torch.device, dtype: torch.dtype):
        self.layers = int(config.num_hidden_layers)
        self.kv_heads = int(config.num_key_value_heads)
        heads = int(config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.device, self.dtype = device, dtype
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.slots = 0
        self.length = 0

    def reserve(self, slots: int, length: int) -> None:
        """Make room for ``slots`` slots of ``length`` positions, keeping what is stored."""
        if slots <= self.slots and length <= self.length:
            return
        new_slots, new_length = max(self.slots, 1), max(self.length, 64)
        while new_slots < slots:
            new_slots *= 2
        while new_length < length:
            new_length *= 2
        shape = (new_slots, self.kv_heads, new_length, self.head_dim)
        for buffers in (self.keys, self.values):
            for layer in range(self.layers):
                grown = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if layer < len(buffers):
                    grown[: self.slots, :, : self.length] = buffers[layer]
                    buffers[layer] = grown
                else:
                    buffers.append(grown)
        self.slots, self.length = new_slots, new_length

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``source`` into slot ``target``."""
        for buffer in (*self.keys, *self.values):
            buffer[target, :, :length] = buffer[source, :, :length]


@dataclass(frozen=True)
class CachePrefill:
    """A packed pass of whole prompts (positions from 0) whose keys and values are kept:
    segment ``i`` is written to the ``copies[i]`` slots from ``first_slots[i]`` on (one per
    sample of the prompt, so a prompt sampled n times is computed once)."""

    cache: KVCache
    lengths: Sequence[int]
    first_slots: Sequence[int]
    copies: Sequence[int]


@dataclass(frozen=True)
class CacheDecode:
    """A pass of one new token per row: row ``i`` belongs to slot ``slots[i]``, sits at
    position ``positions[i]`` and attends to positions ``0..positions[i]`` of its slot."""

    cache: KVCache
    slots: Tensor  # int64 [rows]
    positions: Tensor  # int64 [rows]
    targets: Tensor  # int64 [rows * kv_heads]: where the new keys go in a flat buffer view
    span: int  # max(positions) + 1: the window of the cache read this pass
    mask: Tensor | None  # bool [rows, 1, 1, span]; None when every row sees all of it
    contiguous: bool  # slots are 0..rows-1: read the cache as a view, not a gather


def cache_decode(cache: KVCache, slots: Sequence[int], positions: Sequence[int]) -> CacheDecode:
    """The :class:`CacheDecode` for these rows (the cache must already hold them); its
    mask and write targets are built once for all layers."""
    span = max(positions) + 1
    slot_tensor = torch.tensor(slots, dtype=torch.long, device=cache.device)
    position_tensor = torch.tensor(positions, dtype=torch.long, device=cache.device)
    heads = torch.arange(cache.kv_heads, device=cache.device)
    targets = (slot_tensor[:, None] * cache.kv_heads + heads) * cache.length
    mask = None
    if min(positions) + 1 < span:
        seen = torch.arange(span, device=cache.device)[None, :] <= position_tensor[:, None]
        mask = seen[:, None, None, :]
    return CacheDecode(
        cache=cache,
        slots=slot_tensor,
        positions=position_tensor,
        targets=(targets + position_tensor[:, None]).reshape(-1),
        span=span,
        mask=mask,
        contiguous=list(slots) == list(range(len(slots))),
    )


def store_prompts(prefill: CachePrefill, layer: int, key: Tensor, value: Tensor) -> None:
    """Write a prefill pass's keys and values of ``layer`` (``[1, kv_heads, tokens, dim]``)
    to each segment's slots."""
    keys, values = prefill.cache.keys[layer], prefill.cache.values[layer]
    start = 0
    for length, first, copies in zip(
        prefill.lengths, prefill.first_slots, prefill.copies, strict=True
    ):
        stop = start + length
        # [kv_heads, length, dim] broadcast over the segment's slots.
        keys[first : first + copies, :, :length] = key[0, :, start:stop]
        values[first : first + copies, :, :length] = value[0, :, start:stop]
        start = stop


def decode_attention(
    decode: CacheDecode,
    layer: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    scaling: float | None,
) -> Tensor:
    """Store the new keys and values of ``layer`` and attend: query ``[rows, heads, 1,
    dim]``, key/value ``[rows, kv_heads, 1, dim]`` in; ``[rows, 1, heads, dim]`` out."""
    keys, values = decode.cache.keys[layer], decode.cache.values[layer]
    rows, heads, _, dim = query.shape
    # One indexed copy per buffer (a flat view: [slot, head, position] rows of ``dim``).
    keys.view(-1, dim).index_copy_(0, decode.targets, key.reshape(-1, dim))
    values.view(-1, dim).index_copy_(0, decode.targets, value.reshape(-1, dim))
    if decode.contiguous:
        past_keys = keys[:rows, :, : decode.span]
        past_values = values[:rows, :, : decode.span]
    else:
        past_keys = keys[decode.slots, :, : decode.span]
        past_values = values[decode.slots, :, : decode.span]
    # The query heads that share a KV head become that head's query "positions", so
    # grouped-query attention reads the cache as it is instead of repeating it per head.
    kv_heads = keys.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(
        grouped, past_keys, past_values, attn_mask=decode.mask, scale=scaling
    )
    return out.reshape(rows, 1, heads, dim)
