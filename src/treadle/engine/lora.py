"""LoRA adapters: many adapters over one frozen base model.

Each target ``nn.Linear`` of the base model is wrapped once in a :class:`LoraLinear`.
Adapters are plain tensors held outside the model (:class:`Adapter`), so any number of
them can live over one copy of the base weights. Which adapter applies to which rows of
a pass is decided per pass by :class:`Routing`: the base matmul runs once for all rows,
then each span of rows adds its own adapter's low-rank delta — Tinker's multi-tenant
"clock cycle" in miniature.

Naming and shapes follow PEFT (``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``,
scale ``alpha / r``, B initialised to zero), so a saved adapter is a PEFT adapter.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from treadle.engine.thin_matmul import MAX_COLUMNS, thin_matmul

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULE = "lm_head"

# Tinker's LoRA scale is alpha / rank with alpha fixed at 32 (the cookbook's learning-rate
# heuristics assume it); recorded in every checkpoint as ``lora_alpha``.
DEFAULT_LORA_ALPHA = 32.0


@dataclass(frozen=True)
class LoraSpec:
    """The shape of an adapter, as chosen at ``create_model``."""

    rank: int
    alpha: float = DEFAULT_LORA_ALPHA
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets(self) -> tuple[str, ...]:
        """Leaf module names that get a LoRA pair, in PEFT's ``target_modules`` form."""
        names: list[str] = []
        if self.train_attn:
            names += ATTN_MODULES
        if self.train_mlp:
            names += MLP_MODULES
        if self.train_unembed:
            names.append(UNEMBED_MODULE)
        return tuple(names)


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
            parts = [_cast(self.pairs[path].a, dtype) for path in paths]
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
    targets = spec.targets()
    adapter = Adapter(spec)
    for path, layer in layers.items():
        if path.rsplit(".", 1)[-1] not in targets:
            continue
        base = layer.base
        bound = 1.0 / math.sqrt(base.in_features)
        a = torch.empty(spec.rank, base.in_features).uniform_(-bound, bound, generator=generator)
        b = torch.zeros(base.out_features, spec.rank)
        adapter.pairs[path] = LoraPair(a.requires_grad_(), b.requires_grad_())
    return adapter


@dataclass(frozen=True)
class Span:
    """Rows ``[start, stop)`` of a pass (flattened over batch and time) and their adapter
    (None: the base model alone).

    Inference passes name their rows in ``rows`` instead (in every span of the pass): a
    slice, or int64 indices of scattered rows (a decode batch mixes adapters in whatever
    order its sequences sit in the KV cache). Their deltas are added in place, which
    autograd would not allow."""

    adapter: Adapter | None
    start: int = 0
    stop: int = 0
    rows: slice | Tensor | None = None


_ROUTING: contextvars.ContextVar[Sequence[Span] | None] = contextvars.ContextVar(
    "treadle_lora_routing", default=None
)


@contextlib.contextmanager
def routing(spans: Sequence[Span]) -> Iterator[None]:
    """Route the rows of every pass inside this block to their adapters. A context
    variable, so each engine thread routes its own passes."""
    token = _ROUTING.set(spans)
    try:
        yield
    finally:
        _ROUTING.reset(token)


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus whichever adapters the current routing names."""

    def __init__(self, base: nn.Linear, path: str) -> None:
        super().__init__()
        self.base = base
        self.path = path

    def forward(self, x: Tensor) -> Tensor:
        spans = _ROUTING.get()
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
            low = F.linear(x, _cast(pair.a, x.dtype)).reshape(-1, pair.a.shape[0])
            out = torch.addmm(
                y.reshape(-1, y.shape[-1]), low, _cast(pair.b, x.dtype).t(), alpha=only.spec.scale
            )
            return out.view(y.shape)
        rows = x.reshape(-1, x.shape[-1])
        parts: list[Tensor] = []
        adapted = False
        for span in spans:
            delta = None
            if span.adapter is not None:
                delta = span.adapter.delta(self.path, rows[span.start : span.stop])
            if delta is None:
                delta = rows.new_zeros(span.stop - span.start, self.base.out_features)
            else:
                adapted = True
            parts.append(delta)
        if not adapted:
            return y
        return y + torch.cat(parts).reshape(y.shape)

    def add_deltas(self, x_t: Tensor, y_t: Tensor) -> None:
        """Add each routed span's delta into its columns of ``y_t``, in place: ``x_t`` is
        this layer's input ``[in, rows]`` and ``y_t`` its output ``[out, rows]`` (or views
        of them; a row-major caller passes ``x.t()`` and ``y.t()``). Inference passes only:
        one fused multiply-add per span (an indexed one for scattered rows). At decode
        every matmul is a thin matrix-vector product, so the training path's extra
        kernels and copies would cost as much as the LoRA arithmetic itself. Columns of
        no span keep ``y_t``."""
        for span in _ROUTING.get() or ():
            if span.adapter is None:
                continue
            pair = span.adapter.pairs.get(self.path)
            if pair is None:
                continue
            a, b = _cast(pair.a, x_t.dtype), _cast(pair.b, x_t.dtype)
            scale = span.adapter.spec.scale
            where = span.rows
            if isinstance(where, Tensor):
                low = torch.mm(a, x_t.index_select(1, where))
                y_t.index_add_(1, where, torch.mm(b, low), alpha=scale)
            else:
                part = slice(span.start, span.stop) if where is None else where
                y_t[:, part].addmm_(b, torch.mm(a, x_t[:, part]), alpha=scale)


def thin(x: Tensor) -> bool:
    """Whether a no-grad pass over ``x`` is a decode-sized product (up to ``MAX_COLUMNS``
    rows on CPU), computed as W·xᵀ: MKL is ~1.5x faster at [out, in] x [in, few] than at
    [few, in] x [in, out] (measured at 16 rows for every SmolLM2 shape), and the
    thin-matmul kernel faster still where it is built."""
    rows = x.numel() // x.shape[-1]
    return rows <= MAX_COLUMNS and x.device.type == "cpu" and not torch.is_grad_enabled()


def project_t(
    x_t: Tensor, projections: Sequence[LoraLinear], weight: Tensor, out_t: Tensor
) -> None:
    """Write the projections of ``x_t`` ``[in, rows]`` and their routed adapter deltas
    into ``out_t`` ``[out, rows]`` (any strides: a transposed view of a ``[rows, out]``
    buffer gets rows). ``weight`` is their weights stacked (or the one weight); biases are
    the caller's. Where one adapter covers every row, the kernel adds each delta in the
    same pass over the weight; otherwise each span's delta is added after."""
    x_t = x_t if x_t.stride(1) == 1 else x_t.contiguous()
    sole, adapter = _sole_adapter(x_t.shape[1])
    paired = [p.path for p in projections if adapter is not None and p.path in adapter.pairs]
    if not sole or not paired:
        _product(out_t, weight, x_t)
        if not sole:
            start = 0
            for projection in projections:
                stop = start + projection.base.out_features
                projection.add_deltas(x_t, out_t[start:stop])
                start = stop
        return
    assert adapter is not None
    scaled_a = adapter.scaled_a(tuple(paired), x_t.dtype)
    low = x_t.new_empty(scaled_a.shape[0], x_t.shape[1])
    _product(low, scaled_a, x_t)
    start, first = 0, 0
    for projection in projections:
        stop = start + projection.base.out_features
        pair = adapter.pairs.get(projection.path)
        if pair is None:
            lora = None
        else:
            rank = pair.a.shape[0]
            lora = (_cast(pair.b, x_t.dtype), low[first : first + rank])
            first += rank
        _product(out_t[start:stop], weight[start:stop], x_t, lora)
        start = stop


def _product(
    out: Tensor, weight: Tensor, x_t: Tensor, lora: tuple[Tensor, Tensor] | None = None
) -> None:
    """``out = weight @ x_t (+ b @ low)``: the kernel where it applies, else torch.mm."""
    if thin_matmul(out, weight, x_t, lora):
        return
    torch.mm(weight, x_t, out=out)
    if lora is not None:
        out.addmm_(*lora)


def _sole_adapter(rows: int) -> tuple[bool, Adapter | None]:
    """``(True, adapter)`` when one adapter (or None: the base model) covers all ``rows``
    of the current inference pass, ``(False, None)`` when they are split."""
    spans = _ROUTING.get()
    if not spans:
        return True, None
    where = spans[0].rows
    if len(spans) == 1 and isinstance(where, slice) and where == slice(0, rows):
        return True, spans[0].adapter
    return False, None


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # fp32 master weights under a bf16 base on GPUs; on CPU (all fp32) this skips a call.
    return t if t.dtype == dtype else t.to(dtype)


def wrap_linears(model: nn.Module) -> dict[str, LoraLinear]:
    """Wrap every LoRA-able linear of ``model`` in place; returns them by module path
    (``model.layers.0.self_attn.q_proj``, ``lm_head``, …)."""
    names = {*ATTN_MODULES, *MLP_MODULES, UNEMBED_MODULE}
    found = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in names
    ]
    layers: dict[str, LoraLinear] = {}
    for path, module in found:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = LoraLinear(module, path)
        setattr(parent, leaf, layer)
        layers[path] = layer
    return layers
