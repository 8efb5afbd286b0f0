"""The decode pass of the Llama family, written out.

A decode pass feeds one new token per running sequence through every layer, so its
matmuls are thin and per-op overhead weighs as much as arithmetic: the stock modules
spend ~10k aten calls per pass on a 30-layer model. :class:`DecodeStack` computes the
same function — the transformers modules stay the reference, and the sampler's tests
hold the two to ``generate`` and to the trainer's forward — in fewer, larger operations:
q/k/v and gate/up each run as one matmul over weights stored side by side (the
projections' own weights become views of those buffers, so nothing is duplicated), their
outputs stay transposed (``[features, rows]``, the form MKL's fastest thin product
returns) instead of being copied back to rows, and the norms, rotary embedding and
residual adds skip the module plumbing around them.

Supported: the families :mod:`treadle.engine.families` lists (Llama, Qwen2 with its
q/k/v biases, Qwen3 with its per-head q/k norms); the rotary embedding is the model's
own module, so every RoPE scaling variant is computed as transformers does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from treadle.engine.families import Family
from treadle.engine.kv_cache import CacheDecode, decode_attention
from treadle.engine.lora import LoraLinear
from treadle.engine.models import BaseLM
from treadle.engine.projection import project_t
from treadle.engine.thin_matmul import kernel


class _Fused:
    """Projections of one input (q/k/v, gate/up, or a single one) as one matmul: a
    ``[sum(out), in]`` weight (and bias) holding them stacked. Each projection's weight
    becomes a view of its rows, so nothing is duplicated and training reads the same
    memory."""

    def __init__(self, projections: Sequence[LoraLinear]) -> None:
        self.projections = projections
        linears = [p.base for p in projections]
        if len(linears) == 1:
            self.weight, self.bias = linears[0].weight.data, _bias_data(linears[0])
            return
        self.weight = torch.cat([linear.weight.data for linear in linears])
        self.bias = None
        if any(linear.bias is not None for linear in linears):
            self.bias = torch.cat([_bias_or_zeros(linear) for linear in linears])
        start = 0
        for linear in linears:
            stop = start + linear.out_features
            linear.weight.data = self.weight[start:stop]
            if linear.bias is not None and self.bias is not None:
                linear.bias.data = self.bias[start:stop]
            start = stop

    def __call__(self, x_t: Tensor, as_rows: bool = False) -> Tensor:
        """The projections' outputs stacked, ``[sum(out), rows]``, with their routed
        adapter deltas, from the input ``x_t`` ``[in, rows]``; ``as_rows``: written
        straight into a ``[rows, sum(out)]`` tensor instead, which is returned."""
        features, rows = self.weight.shape[0], x_t.shape[1]
        y = x_t.new_empty(rows, features) if as_rows else x_t.new_empty(features, rows)
        project_t(x_t, self.projections, self.weight, y.t() if as_rows else y)
        if self.bias is not None:
            y += self.bias if as_rows else self.bias[:, None]
        return y


def _bias_data(linear: nn.Linear) -> Tensor | None:
    return None if linear.bias is None else linear.bias.data


def _bias_or_zeros(linear: nn.Linear) -> Tensor:
    if linear.bias is not None:
        return linear.bias.data
    return linear.weight.new_zeros(linear.out_features)


def _rms_norm(norm: Any, x: Tensor) -> Tensor:
    # In fp32, torch's fused kernel is the module's formula (x·rsqrt(mean x² + eps)·w);
    # in bf16 the module's own up-cast order is kept.
    if x.dtype != torch.float32:
        out: Tensor = norm(x)
        return out
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


@dataclass
class _Layer:
    index: int
    input_norm: nn.Module
    post_norm: nn.Module
    qkv: _Fused  # q_proj, k_proj, v_proj
    q_norm: nn.Module | None  # Qwen3's per-head norms
    k_norm: nn.Module | None
    o_proj: _Fused
    gate_up: _Fused  # gate_proj, up_proj
    down_proj: _Fused
    act: Callable[[Tensor], Tensor]
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    # Projection outputs stay transposed, [features, rows] (see _Fused): a row's
    # features are read through strided views, which the elementwise ops take as they are.

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor, decode: CacheDecode) -> Tensor:
        rows, dim = x.shape[0], self.head_dim
        q_size, kv_size = self.heads * dim, self.kv_heads * dim
        # In rows here: the rotary products would keep a transposed layout, and SDPA's
        # fast kernel needs each head's features side by side.
        qkv = self.qkv(x.t(), as_rows=True)
        q = qkv[:, :q_size].view(rows, self.heads, dim)
        k = qkv[:, q_size : q_size + kv_size].view(rows, self.kv_heads, dim)
        v = qkv[:, q_size + kv_size :].view(rows, self.kv_heads, 1, dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = decode_attention(
            decode,
            self.index,
            _rotate(q, cos, sin)[:, :, None],
            _rotate(k, cos, sin)[:, :, None],
            v,
            self.scaling,
        )
        return self.o_proj(out.reshape(rows, q_size).t()).t()

    def mlp(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up(x.t())
        inner = gate_up.shape[0] // 2
        return self.down_proj(self.act(gate_up[:inner]) * gate_up[inner:]).t()


class DecodeStack:
    """The decoder stack of ``base`` for decode passes: ``[rows]`` token ids in, the
    final-norm hidden states ``[rows, hidden]`` out. Adapters come from the routing in
    force (:func:`treadle.engine.pass_context.routing`), keys and values from
    ``decode``'s cache.

    Building one changes where ``base``'s q/k/v and gate/up weights live (:class:`_Fused`):
    the same values, now views of one buffer per group, which training reads too."""

    def __init__(self, base: BaseLM) -> None:
        stack: Any = base.backbone  # a transformers *Model: attributes by architecture
        self._embed: nn.Module = stack.embed_tokens
        self._rotary: nn.Module = stack.rotary_emb
        self._norm: nn.Module = stack.norm
        family = base.family
        self._layers = [_layer(family, i, layer) for i, layer in enumerate(stack.layers)]
        if base.device.type == "cpu":
            kernel()  # built (or loaded from its cache) with the model, not mid-request

    def __call__(self, tokens: Tensor, decode: CacheDecode) -> Tensor:
        hidden: Tensor = self._embed(tokens)
        cos, sin = self._rotary(hidden, decode.positions[None])
        # [1, rows, head_dim] -> [rows, 1, head_dim]: one angle per row, shared by its heads.
        cos, sin = cos[0, :, None], sin[0, :, None]
        for layer in self._layers:
            hidden = hidden + layer.attention(_rms_norm(layer.input_norm, hidden), cos, sin, decode)
            hidden = hidden + layer.mlp(_rms_norm(layer.post_norm, hidden))
        return _rms_norm(self._norm, hidden)


def _layer(family: Family, index: int, layer: Any) -> _Layer:
    """A decoder layer's parts, found where ``family`` says they are. Fusing q/k/v and
    gate/up re-points those projections' weights at views of the fused buffers."""
    attn, mlp = getattr(layer, family.attention), getattr(layer, family.mlp)
    q_name, k_name, v_name, o_name = family.attn_modules
    gate_name, up_name, down_name = family.mlp_modules
    q_proj: LoraLinear = getattr(attn, q_name)
    k_proj: LoraLinear = getattr(attn, k_name)
    head_dim = int(attn.head_dim)
    return _Layer(
        index=index,
        input_norm=getattr(layer, family.input_norm),
        post_norm=getattr(layer, family.post_attention_norm),
        qkv=_Fused((q_proj, k_proj, getattr(attn, v_name))),
        q_norm=attn.q_norm if family.qk_norm else None,
        k_norm=attn.k_norm if family.qk_norm else None,
        o_proj=_Fused((getattr(attn, o_name),)),
        gate_up=_Fused((getattr(mlp, gate_name), getattr(mlp, up_name))),
        down_proj=_Fused((getattr(mlp, down_name),)),
        act=mlp.act_fn,
        heads=q_proj.base.out_features // head_dim,
        kv_heads=k_proj.base.out_features // head_dim,
        head_dim=head_dim,
        scaling=float(attn.scaling),
    )
