"""LoRA adapters: many adapters over one frozen base model.

Each target ``nn.Linear`` of the base model is wrapped once in a :class:`LoraLinear`.
Adapters are plain tensors held outside the model (:class:`Adapter`), so any number of
them can live over one copy of the base weights. Which adapter applies to which rows of
a pass is decided per pass by the routing in force
(:func:`treadle.engine.pass_context.routing`): the base matmul runs once for all rows,
then each span of rows adds its own adapter's low-rank delta — Tinker's multi-tenant
"clock cycle" in miniature. Decode-sized inference passes take the
:mod:`treadle.engine.projection` path instead.

Naming and shapes follow PEFT (``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``,
scale ``alpha / r``, B initialised to zero), so a saved adapter is a PEFT adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from treadle.engine.families import Family
from treadle.engine.pass_context import ROUTING
from treadle.engine.projection import cast, project_t, thin
from treadle.types import LoraSpec


@dataclass
class LoraPair:
    a: Tensor  # [rank, in_features]
    b: Tensor  # [out_features, rank]


@dataclass
class Adapter:
    """One adapter's weights, keyed by the wrapped module's path in the base model."""

    spec: LoraSpec
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    # Set by detached(): nothing updates these tensors, so values derived from them keep.
    frozen: bool = False
    _scaled_a: dict[tuple[str, ...], Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )

    def parameters(self) -> list[Tensor]:
        return [t for pair in self.pairs.values() for t in (pair.a, pair.b)]

    def detached(self) -> Adapter:
        """A frozen copy of the current weights (for samplers): later training steps,
        which update the tensors in place, do not reach it."""
        pairs = {
            path: LoraPair(pair.a.detach().clone(), pair.b.detach().clone())
            for path, pair in self.pairs.items()
        }
        return Adapter(self.spec, pairs, frozen=True)

    def scaled_a(self, paths: tuple[str, ...], dtype: torch.dtype) -> Tensor:
        """``scale · A`` of the modules at ``paths``, stacked ``[rank · len(paths), in]``:
        one matmul gives the low-rank inputs of projections that share an input. Kept
        for a frozen adapter; rebuilt per call otherwise (training updates A in place)."""
        stacked = self._scaled_a.get(paths)
        if stacked is None or stacked.dtype != dtype:
            parts = [cast(self.pairs[path].a, dtype) for path in paths]
            stacked = (torch.cat(parts) if len(parts) > 1 else parts[0]) * self.spec.scale
            if self.frozen:
                self._scaled_a[paths] = stacked
        return stacked

    def delta(self, path: str, x: Tensor) -> Tensor | None:
        """``scale · x Aᵀ Bᵀ`` for the module at ``path``, or None if not adapted."""
        pair = self.pairs.get(path)
        if pair is None:
            return None
        # Cast to the activations' dtype: fp32 master weights under a bf16 base on GPUs
        # (a no-op on CPU, where everything is fp32).
        a, b = pair.a.to(x.dtype), pair.b.to(x.dtype)
        return ((x @ a.t()) * self.spec.scale) @ b.t()


def new_adapter(spec: LoraSpec, layers: dict[str, LoraLinear], seed: int | None = None) -> Adapter:
    """A fresh adapter: A drawn like PEFT's default (Kaiming-uniform, a=√5, i.e.
    U(±1/√in)), B zero, so the adapted model starts exactly at the base model."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    adapter = Adapter(spec)
    for path, layer in layers.items():
        if not spec.covers(layer.group):
            continue
        base = layer.base
        bound = 1.0 / math.sqrt(base.in_features)
        a = torch.empty(spec.rank, base.in_features).uniform_(-bound, bound, generator=generator)
        b = torch.zeros(base.out_features, spec.rank)
        # Drawn on the CPU (the same seed gives the same adapter on every device), kept
        # where the layer's weight is.
        device = base.weight.device
        adapter.pairs[path] = LoraPair(a.to(device).requires_grad_(), b.to(device).requires_grad_())
    return adapter


class _SpanDeltas(torch.autograd.Function):
    """``y[span] += scale · x[span] Aᵀ Bᵀ`` for each span of rows with its own adapter,
    in place, as one autograd node.

    Written out per span, every span's slice, two matmuls, scaling and concatenation were
    autograd nodes of their own, and each slice's backward filled a zero gradient as
    large as the whole pass: with eight users' adapters in a pass that cost more than the
    LoRA arithmetic. Here the forward keeps each span's low-rank input ``x Aᵀ`` and the
    backward writes each span's gradients straight into place.
    """

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, x: Tensor, bounds: list[tuple[int, int, float]], *weights: Tensor
    ) -> Tensor:
        # y comes first: when it is a view, autograd takes the first input of an in-place
        # function for the tensor it changed.
        lows = []
        for index, (start, stop, scale) in enumerate(bounds):
            a, b = weights[2 * index], weights[2 * index + 1]
            low = torch.mm(x[start:stop], a.t())
            y[start:stop].addmm_(low, b.t(), alpha=scale)
            lows.append(low)
        ctx.mark_dirty(y)
        ctx.bounds = bounds
        ctx.save_for_backward(x, *weights, *lows)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *saved = ctx.saved_tensors
        count = len(ctx.bounds)
        weights, lows = saved[: 2 * count], saved[2 * count :]
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        grad_weights: list[Tensor | None] = []
        for index, (start, stop, scale) in enumerate(ctx.bounds):
            a, b = weights[2 * index], weights[2 * index + 1]
            part = grad[start:stop]
            grad_low = torch.mm(part, b).mul_(scale)
            if grad_x is not None:
                grad_x[start:stop] = torch.mm(grad_low, a)
            wants_a, wants_b = ctx.needs_input_grad[3 + 2 * index : 5 + 2 * index]
            grad_a = torch.mm(grad_low.t(), x[start:stop]) if wants_a else None
            grad_b = torch.mm(part.t(), lows[index]).mul_(scale) if wants_b else None
            grad_weights += [grad_a, grad_b]
        return (grad, grad_x, None, *grad_weights)


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus whichever adapters the current routing names.
    ``group`` is the :class:`~treadle.types.LoraSpec` flag that adapts it: ``attn``,
    ``mlp`` or ``unembed``."""

    def __init__(self, base: nn.Linear, path: str, group: str) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        spans = ROUTING.get()
        if thin(x) and (not spans or spans[0].rows is not None):
            flat = x.reshape(-1, x.shape[-1])
            y = x.new_empty(flat.shape[0], self.base.out_features)
            project_t(flat.t(), (self,), self.base.weight, y.t())
            if self.base.bias is not None:
                y += self.base.bias
            return y.view(*x.shape[:-1], self.base.out_features)
        y = F.linear(x, self.base.weight, self.base.bias)
        if not spans:
            return y
        if spans[0].rows is not None:
            self.add_deltas(x.reshape(-1, x.shape[-1]).t(), y.view(-1, y.shape[-1]).t())
            return y
        if len(spans) == 1:
            only = spans[0].adapter
            pair = only.pairs.get(self.path) if only is not None else None
            if only is None or pair is None:
                return y
            # y + scale · (x Aᵀ) Bᵀ as one fused multiply-add.
            low = F.linear(x, cast(pair.a, x.dtype)).reshape(-1, pair.a.shape[0])
            out = torch.addmm(
                y.reshape(-1, y.shape[-1]), low, cast(pair.b, x.dtype).t(), alpha=only.spec.scale
            )
            return out.view(y.shape)
        bounds: list[tuple[int, int, float]] = []
        weights: list[Tensor] = []
        for span in spans:
            pair = span.adapter.pairs.get(self.path) if span.adapter is not None else None
            if span.adapter is None or pair is None:
                continue
            bounds.append((span.start, span.stop, span.adapter.spec.scale))
            weights += [cast(pair.a, x.dtype), cast(pair.b, x.dtype)]
        if not bounds:
            return y
        rows = x.reshape(-1, x.shape[-1])
        summed: Tensor = _SpanDeltas.apply(y.reshape(-1, y.shape[-1]), rows, bounds, *weights)
        return summed.view(y.shape)

    def add_deltas(self, x_t: Tensor, y_t: Tensor) -> None:
        """Add each routed span's delta into its columns of ``y_t``, in place: ``x_t`` is
        this layer's input ``[in, rows]`` and ``y_t`` its output ``[out, rows]`` (or views
        of them; a row-major caller passes ``x.t()`` and ``y.t()``). Inference passes only:
        one fused multiply-add per span (an indexed one for scattered rows). At decode
        every matmul is a thin matrix-vector product, so the training path's extra
        kernels and copies would cost as much as the LoRA arithmetic itself. Columns of
        no span keep ``y_t``."""
        for span in ROUTING.get() or ():
            if span.adapter is None:
                continue
            pair = span.adapter.pairs.get(self.path)
            if pair is None:
                continue
            a, b = cast(pair.a, x_t.dtype), cast(pair.b, x_t.dtype)
            scale = span.adapter.spec.scale
            where = span.rows
            if isinstance(where, Tensor):
                low = torch.mm(a, x_t.index_select(1, where))
                y_t.index_add_(1, where, torch.mm(b, low), alpha=scale)
            else:
                part = slice(span.start, span.stop) if where is None else where
                y_t[:, part].addmm_(b, torch.mm(a, x_t[:, part]), alpha=scale)


def wrap_linears(model: nn.Module, family: Family) -> dict[str, LoraLinear]:
    """Wrap every LoRA-able linear of ``model`` (as ``family`` names them) in place;
    returns them by module path (``model.layers.0.self_attn.q_proj``, ``lm_head``, …)."""
    groups = {name: "attn" for name in family.attn_modules}
    groups |= {name: "mlp" for name in family.mlp_modules}
    groups[family.unembed_module] = "unembed"
    found = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in groups
    ]
    layers: dict[str, LoraLinear] = {}
    for path, module in found:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = LoraLinear(module, path, groups[leaf])
        setattr(parent, leaf, layer)
        layers[path] = layer
    return layers
