"""Forward, backward and the AdamW step on LoRA adapters.

:func:`forward_backward` takes the work of any number of requests — from one model or
from many adapters of the same base — and runs it as a few packed passes: datums are laid
back to back in one row of at most ``max_tokens`` tokens (no padding), attention is kept
within each datum (:mod:`treadle.engine.attention`), and each datum's rows go through its
own adapter (:mod:`treadle.engine.lora`). Gradients accumulate in the adapters until
:func:`optim_step`, exactly as repeated ``loss.backward()`` calls would.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from treadle.engine.custom_graph import CustomLossError, CustomRun
from treadle.engine.custom_loss import loss_and_gradient
from treadle.engine.lora import Adapter
from treadle.engine.losses import LossSpec
from treadle.engine.models import BaseLM
from treadle.engine.pass_context import Span, packed, routing
from treadle.types import AdamParams, Datum

# Rows of logits materialised at once by the head: bounds the [rows, vocab] temporaries
# to 2**25 floats (128 MiB in fp32) whatever the vocabulary.
_HEAD_CHUNK_ELEMENTS = 2**25


class _TargetLogprobs(torch.autograd.Function):
    """``log softmax(h Wᵀ + e Eᵀ)[targets]``, chunk by chunk of rows, in place.

    Each chunk's logits become its softmax probabilities in their own buffer, which is
    all the backward needs (``∂/∂logits = onehot(g) - p·Σg``): no full log-softmax, no
    second copy, no recomputed head matmul. Without gradients nothing is kept.
    ``e, E`` are the LoRA pair of the unembedding (``e = scale · h Aᵀ``, ``E = B``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        extra_hidden: Tensor | None,
        extra_weight: Tensor | None,
    ) -> Tensor:
        keep = any(ctx.needs_input_grad)
        rows = max(1, _HEAD_CHUNK_ELEMENTS // weight.shape[0])
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        probs: list[Tensor] = []
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            logits = (hidden[part] @ weight.t()).float()
            if extra_hidden is not None and extra_weight is not None:
                logits.addmm_(extra_hidden[part].float(), extra_weight.float().t())
            picked = logits.gather(-1, targets[part])
            peak = logits.amax(-1, keepdim=True)
            total = logits.sub_(peak).exp_().sum(-1, keepdim=True)
            out[part] = picked - peak - total.log()
            if keep:
                probs.append(logits.div_(total))
        ctx.save_for_backward(weight, targets, extra_hidden, extra_weight, *probs)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        weight, targets, extra_hidden, extra_weight, *probs = ctx.saved_tensors
        dtype = weight.dtype
        n = targets.shape[0]
        grad_hidden = weight.new_empty(n, weight.shape[1]) if ctx.needs_input_grad[0] else None
        grad_extra = torch.empty_like(extra_hidden) if ctx.needs_input_grad[3] else None
        grad_extra_weight = torch.zeros_like(extra_weight) if ctx.needs_input_grad[4] else None
        for index, start in enumerate(range(0, n, ctx.rows)):
            part = slice(start, start + ctx.rows)
            g = grad_out[part].float()
            # d/dlogits of Σ_k g_k log p[t_k] = onehot-scatter(g) - p · Σ_k g_k
            grad_logits = probs[index].mul_(-g.sum(-1, keepdim=True))
            grad_logits = grad_logits.scatter_add_(-1, targets[part], g).to(dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad_logits @ weight
            if grad_extra is not None:
                grad_extra[part] = grad_logits @ extra_weight
            if grad_extra_weight is not None:
                grad_extra_weight.addmm_(grad_logits.t(), extra_hidden[part])
        return grad_hidden, None, None, grad_extra, grad_extra_weight


def target_logprobs(
    base: BaseLM, hidden: Tensor, targets: Tensor, adapter: Adapter | None
) -> Tensor:
    """Log-probabilities of ``targets`` (``[n]`` or ``[n, K]``) given final hidden states
    ``[n, H]``, through the unembedding and its LoRA pair if the adapter has one."""
    index = targets if targets.dim() == 2 else targets[:, None]
    pair = adapter.pairs.get(base.head.path) if adapter is not None else None
    extra_hidden = extra_weight = None
    if adapter is not None and pair is not None:
        extra_hidden = (hidden @ pair.a.to(hidden.dtype).t()) * adapter.spec.scale
        extra_weight = pair.b.to(hidden.dtype)
    out = _TargetLogprobs.apply(hidden, base.head_weight, index, extra_hidden, extra_weight)
    return out if targets.dim() == 2 else out[:, 0]


@dataclass
class LoraModel:
    """A training model: its adapter, its AdamW state, and how much gradient is pending."""

    adapter: Adapter
    optimizer: torch.optim.AdamW
    pending_datums: int = 0  # datums whose gradients accumulated since the last optim_step

    @classmethod
    def create(cls, adapter: Adapter) -> LoraModel:
        # fused: one pass over each tensor's memory for the whole update (3.6x faster than
        # foreach on CPU for a rank-32 adapter; the step is memory-bound).
        return cls(adapter, torch.optim.AdamW(adapter.parameters(), fused=True))


@dataclass
class ForwardBackwardWork:
    """One request's worth of forward(/backward) work."""

    model: LoraModel
    data: Sequence[Datum]
    loss: LossSpec | CustomRun
    config: dict[str, float]
    forward_only: bool


@dataclass
class ForwardBackwardOutcome:
    logprobs: list[np.ndarray]  # per datum, float32, the shape of its target_tokens
    loss: float  # summed over tokens and datums
    metrics: dict[str, float] = field(default_factory=dict)  # a custom loss's custom/… ones
    error: str | None = None  # a custom loss failed (the user's error): nothing accumulated


@dataclass
class _Item:
    work: int
    index: int
    datum: Datum
    adapter: Adapter


@dataclass
class _Pass:
    items: list[_Item] = field(default_factory=list)
    tokens: int = 0
    alone: int | None = None  # the custom-loss work too long for one pass, alone in this one


def forward_backward(
    base: BaseLM,
    works: Sequence[ForwardBackwardWork],
    max_tokens: int,
    pause: Callable[[], None] | None = None,
) -> list[ForwardBackwardOutcome]:
    """Run every work item; gradients of the non-forward-only ones accumulate in their
    adapters. Returns one outcome per work item, in order.

    ``pause`` is offered between passes and at every decoder layer of a pass, forward and
    backward (see :func:`_pausing`): the engine loop decodes there when its share of time
    is due, so sampling never waits for a whole pass. It must leave the training models
    alone."""
    if base.sharding is not None:
        # A pause runs sampling passes, whose collectives must line up on every rank;
        # ranks agree on the commands they are sent, not on when a pause falls due.
        pause = None
    outcomes = [
        ForwardBackwardOutcome(logprobs=[np.empty(0, np.float32)] * len(w.data), loss=0.0)
        for w in works
    ]
    losses: list[list[Tensor]] = [[] for _ in works]
    ran = False
    for forward_only in (True, False):
        items = [
            _Item(w, i, datum, work.model.adapter)
            for w, work in enumerate(works)
            if work.forward_only == forward_only
            for i, datum in enumerate(work.data)
        ]
        # Keep each adapter's rows together so every LoRA layer does one matmul per adapter.
        order = {id(item.adapter): rank for rank, item in reversed(list(enumerate(items)))}
        items.sort(key=lambda item: order[id(item.adapter)])
        whole = {
            w: sum(datum.num_tokens for datum in work.data)
            for w, work in enumerate(works)
            if isinstance(work.loss, CustomRun) and not work.forward_only and not forward_only
        }
        saved: dict[int, list[Tensor | None]] = {}
        for one_pass in _packed_passes(items, max_tokens, whole):
            if all(outcomes[item.work].error for item in one_pass.items):
                continue  # a custom loss that failed in an earlier pass of its own
            alone = one_pass.alone
            if alone is not None and alone not in saved and not forward_only:
                saved[alone] = [_copy(t.grad) for t in works[alone].model.adapter.parameters()]
            if pause is not None and ran:
                pause()
            # Only a single datum longer than the budget makes a pass this large.
            long_pass = one_pass.tokens > max_tokens and not forward_only
            with (
                torch.set_grad_enabled(not forward_only),
                base.checkpointed(long_pass),
                _pausing(base, None if long_pass else pause),
                base.gathered(),
            ):
                _run_pass(base, works, one_pass, outcomes, losses, backward=not forward_only)
            ran = True
            if alone is not None and outcomes[alone].error and alone in saved:
                # A custom loss too long for one pass failed after some of its passes:
                # undo them (they held nothing else) before any other work's pass.
                tensors = works[alone].model.adapter.parameters()
                for tensor, grad in zip(tensors, saved.pop(alone), strict=True):
                    tensor.grad = grad
    for w, work in enumerate(works):
        outcome = outcomes[w]
        outcome.loss = float(torch.stack(losses[w]).sum()) if losses[w] else 0.0
        if not work.forward_only and outcome.error is None:
            work.model.pending_datums += len(work.data)
        if isinstance(work.loss, CustomRun):
            n = len(work.data)
            outcome.metrics = {
                key: value / n if key.endswith(":mean") else value
                for key, value in outcome.metrics.items()
            }
    return outcomes


def _copy(grad: Tensor | None) -> Tensor | None:
    return None if grad is None else grad.clone()


@contextlib.contextmanager
def _pausing(base: BaseLM, pause: Callable[[], None] | None) -> Iterator[None]:
    """Offer ``pause`` before each decoder layer's forward and its MLP's, and after their
    backward.

    A pass over a few thousand tokens takes seconds; these boundaries cut it into slices
    of tens of milliseconds. ``pause`` runs in an empty context (this pass's routing and
    packing must not reach the sampler's passes) and never inside itself (a prefill runs
    these layers too). Checkpointed passes (``pause`` None) offer none: their layers
    recompute during backward in training mode, which the sampler must not see.
    """
    if pause is None:
        yield
        return
    busy = False

    def offer(*_: object) -> None:
        nonlocal busy
        if busy:
            return
        busy = True
        try:
            contextvars.Context().run(pause)
        finally:
            busy = False

    def before_layer(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if busy:
            return
        offer()
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, Tensor) and hidden.requires_grad:
            hidden.register_hook(offer)  # runs once this layer's backward is done

    # Each decoder layer, and its MLP half-way through it: slices short enough that a
    # decode step gets close to its share even when a pass is thousands of tokens.
    layers = cast(Iterable[nn.Module], base.backbone.layers)
    points = [
        part
        for layer in layers
        for part in (layer, getattr(layer, "mlp", None))
        if part is not None
    ]
    handles = [part.register_forward_pre_hook(before_layer, with_kwargs=True) for part in points]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _packed_passes(
    items: list[_Item], max_tokens: int, whole: Mapping[int, int] | None = None
) -> Iterator[_Pass]:
    """Greedy packing in order; a datum longer than the budget gets a pass of its own.

    The works in ``whole`` (custom losses: work -> tokens) must fail as a whole: one that
    fits in a pass is never split across passes, and one that does not has its passes to
    itself, so that its gradient can be undone alone. (A work's items are contiguous.)
    """
    whole = whole or {}
    current = _Pass()
    for item in items:
        n = item.datum.num_tokens
        size = whole.get(item.work)
        first = size is not None and item.index == 0
        need = size if first and size is not None and size <= max_tokens else n
        alone = first and size is not None and size > max_tokens
        if current.items and (
            alone
            or current.tokens + need > max_tokens
            or (current.alone is not None and current.alone != item.work)
        ):
            yield current
            current = _Pass()
        if size is not None and size > max_tokens:
            current.alone = item.work
        current.items.append(item)
        current.tokens += n
    if current.items:
        yield current


def _run_pass(
    base: BaseLM,
    works: Sequence[ForwardBackwardWork],
    one_pass: _Pass,
    outcomes: list[ForwardBackwardOutcome],
    losses: list[list[Tensor]],
    backward: bool,
) -> None:
    device = base.device
    tokens = np.concatenate([item.datum.tokens for item in one_pass.items])
    positions = np.concatenate([np.arange(item.datum.num_tokens) for item in one_pass.items])
    lengths = [item.datum.num_tokens for item in one_pass.items]
    spans: list[Span] = []
    start = 0
    for item, n in zip(one_pass.items, lengths, strict=True):
        if spans and spans[-1].adapter is item.adapter:
            spans[-1] = Span(item.adapter, spans[-1].start, start + n)
        else:
            spans.append(Span(item.adapter, start, start + n))
        start += n
    input_ids = torch.from_numpy(tokens).to(device)[None]
    position_ids = torch.from_numpy(positions).to(device)[None]
    # Backward stays inside the routing/packing context: checkpointed layers are recomputed
    # during it and must route and pack exactly as in the forward pass.
    with routing(spans), packed(lengths):
        hidden = base.backbone(input_ids=input_ids, position_ids=position_ids).last_hidden_state[0]
        pass_losses: list[Tensor] = []
        custom: dict[int, list[tuple[_Item, Tensor]]] = {}
        offset = 0
        for item, n in zip(one_pass.items, lengths, strict=True):
            work = works[item.work]
            datum = item.datum
            targets = torch.from_numpy(datum.inputs["target_tokens"]).to(device)
            lp = target_logprobs(base, hidden[offset : offset + n], targets, item.adapter)
            offset += n
            if isinstance(work.loss, CustomRun):
                outcomes[item.work].logprobs[item.index] = lp.detach().float().cpu().numpy()
                custom.setdefault(item.work, []).append((item, lp))
                continue
            inputs = {
                key: torch.from_numpy(value).to(device)
                for key, value in datum.inputs.items()
                if key != "target_tokens"
            }
            loss = work.loss.fn(lp, inputs, work.config)
            outcomes[item.work].logprobs[item.index] = lp.detach().float().cpu().numpy()
            losses[item.work].append(loss.detach())
            pass_losses.append(loss)
        for w, group in custom.items():
            pass_losses += _custom_losses(works[w], outcomes[w], losses[w], group, backward)
        if backward and pass_losses:
            torch.stack(pass_losses).sum().backward()


def _custom_losses(
    work: ForwardBackwardWork,
    outcome: ForwardBackwardOutcome,
    losses: list[Tensor],
    group: list[tuple[_Item, Tensor]],
    backward: bool,
) -> list[Tensor]:
    """One request's custom loss on its datums of this pass, run outside the model's graph
    (:mod:`treadle.engine.custom_loss`). Returns the surrogates ``Σ lp · dC/dlp`` whose
    gradient is the loss's, or nothing if it failed, recording the user's error."""
    assert isinstance(work.loss, CustomRun)
    lps = [lp for _, lp in group]
    try:
        values, grads, sums = loss_and_gradient(
            work.loss.graph, lps, [item.datum.inputs for item, _ in group], backward
        )
    except CustomLossError as exc:
        outcome.error = str(exc)
        return []
    losses.extend(torch.tensor(value, dtype=torch.float64) for value in values)
    for key, value in sums.items():
        outcome.metrics[key] = outcome.metrics.get(key, 0.0) + value
    if not backward:
        return []
    return [(lp * g.to(lp.device)).sum() for lp, g in zip(lps, grads, strict=True) if g is not None]


def optim_step(model: LoraModel, params: AdamParams) -> dict[str, float]:
    """One ``torch.optim.AdamW`` step on the accumulated gradients, then clear them.
    Hyper-parameters may change every step (schedules are the client's)."""
    tensors = model.adapter.parameters()
    grads = [t.grad for t in tensors if t.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    grad_norm = float(norm)
    if params.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(tensors, params.grad_clip_norm)
    for group in model.optimizer.param_groups:
        group.update(
            lr=params.learning_rate,
            betas=(params.beta1, params.beta2),
            eps=params.eps,
            weight_decay=params.weight_decay,
        )
    model.optimizer.step()
    model.optimizer.zero_grad(set_to_none=True)
    model.pending_datums = 0
    return {
        "grad_norm:mean": grad_norm if math.isfinite(grad_norm) else float("nan"),
        "learning_rate:mean": params.learning_rate,
    }
