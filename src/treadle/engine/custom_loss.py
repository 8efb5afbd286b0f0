"""Server-side custom losses, the running half: a checked graph
(:mod:`treadle.engine.custom_graph`) evaluated on one datum's logprobs.

The wire names map to the server's own callables through the fixed tables below, built
from the allow-lists at import time; nothing is looked up by a name a client sent. The
graph runs on CPU copies of the logprobs that are fresh leaves, outside the model's
autograd graph: user code can neither reach model tensors, other datums nor other
users' data, an out-of-range index is an ``IndexError`` rather than a CUDA device-side
assert, and every failure happens before any gradient reaches the model. The caller
(:mod:`treadle.engine.train`) feeds ``d loss / d logprobs`` back into the model's
backward, the same surrogate the SDK's client path sends as cross-entropy weights.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from treadle.engine.custom_graph import (
    ALIASES,
    DTYPES,
    FUNCTION_NAMES,
    FUNCTIONAL_FUNCTIONS,
    MATH_FUNCTIONS,
    OPERATOR_FUNCTIONS,
    TORCH_FUNCTIONS,
    CustomLossError,
    Graph,
)

_FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"operator.{n}": getattr(operator, n) for n in OPERATOR_FUNCTIONS},
    **{f"torch.{n}": getattr(torch, n) for n in TORCH_FUNCTIONS},
    **{f"torch.nn.functional.{n}": getattr(F, n) for n in FUNCTIONAL_FUNCTIONS},
    **{f"math.{n}": getattr(math, n) for n in MATH_FUNCTIONS},
    **{wire: getattr(F, n) for wire, n in ALIASES.items()},
}
assert set(_FUNCTIONS) == FUNCTION_NAMES
_DTYPES = {n: getattr(torch, n) for n in DTYPES}
_FACTORIES = frozenset({"torch.zeros", "torch.ones", "torch.full", "torch.arange"})
_DEVICE = torch.device("cpu")
# The least a datum may make (elements per tensor); larger datums get 16x their largest
# input, enough for any per-token maths and a few [T, K] temporaries.
_MIN_ELEMENTS = 1 << 20


def evaluate(
    graph: Graph, logprobs: Tensor, inputs: Mapping[str, Any]
) -> tuple[Tensor, dict[str, Tensor]]:
    """One datum: ``logprobs`` (a CPU leaf) and its ``loss_fn_inputs`` (numpy, checked by
    :func:`~treadle.engine.custom_graph.check_data`) through the graph. Returns the loss
    (a scalar floating tensor) and the metric tensors; raises :class:`CustomLossError`."""
    args = [logprobs]
    for key, rank in graph.inputs[1:]:
        value = torch.from_numpy(inputs[key])
        args.append(value.reshape(()) if rank == 0 else value)
    cap = max(_MIN_ELEMENTS, 16 * max(a.numel() for a in args))
    env: dict[str, Any] = {}
    for node, value in zip(graph.nodes, args, strict=False):
        env[node.name] = value
    for node in graph.nodes[len(args) : -1]:
        a = [_decode(v, env) for v in node.args]
        kw = {k: _decode(v, env) for k, v in node.kwargs.items()}
        try:
            env[node.name] = _call(node.op, node.target, a, kw, cap)
        except CustomLossError as exc:
            raise CustomLossError(f"custom loss {graph.name!r} node {node.name!r}: {exc}") from None
        except (
            RuntimeError,
            TypeError,
            ValueError,
            IndexError,
            OverflowError,
            ZeroDivisionError,
        ) as exc:
            raise CustomLossError(
                f"custom loss {graph.name!r} failed at node {node.name!r} ({node.target}): {exc}"
            ) from None
        out = env[node.name]
        if isinstance(out, Tensor) and out.numel() > cap:
            raise CustomLossError(
                f"custom loss {graph.name!r} node {node.name!r} made a tensor of {out.numel()}"
                f" elements; the limit for this datum is {cap}"
            )
    loss = env[graph.loss]
    if not (isinstance(loss, Tensor) and loss.ndim == 0 and loss.is_floating_point()):
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise CustomLossError(
            f"custom loss {graph.name!r} must return a scalar floating-point loss, got {shape}"
        )
    metrics: dict[str, Tensor] = {}
    for key, ref in graph.metrics:
        value = env[ref]
        if not (isinstance(value, Tensor) and value.numel() == 1):
            raise CustomLossError(
                f"custom loss {graph.name!r} metric {key!r} must be a tensor of one element"
            )
        metrics[key] = value
    return loss, metrics


def _decode(value: Any, env: Mapping[str, Any]) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    ((kind, inner),) = value.items()
    if kind == "ref":
        return env[inner]
    if kind == "tuple":
        return tuple(_decode(v, env) for v in inner)
    if kind == "dict":
        return {k: _decode(v, env) for k, v in inner.items()}
    if kind == "slice":
        return slice(*(_decode(v, env) for v in inner))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "float":
        return float(inner)
    if kind == "dtype":
        return _DTYPES[inner]
    if kind == "device":  # the client traced on "cpu": it means "where logprobs are"
        return _DEVICE
    if kind == "layout":
        return torch.strided
    return getattr(torch, inner)  # memory_format: one of the two checked names


def _call(op: str, target: str, a: list[Any], kw: dict[str, Any], cap: int) -> Any:
    if op == "call_function" and target == "getattr":
        if not isinstance(a[0], Tensor):
            raise CustomLossError("getattr of something other than a tensor")
        return getattr(a[0], a[1])
    if op == "call_function":
        fn = _FUNCTIONS[target]
        if target.startswith(("operator.", "math.")) and not _any_tensor(a, kw):
            return _plain(target, fn, a)
        if target in _FACTORIES:
            _check_factory(target, a, kw, cap)
            kw["device"] = _DEVICE
        elif sum(isinstance(x, Tensor) for x in (*a, *kw.values())) >= 2 or _has_sequence(a):
            _check_size(fn, a, kw, cap)
        return fn(*a, **kw)
    self_ = a[0]
    if not isinstance(self_, Tensor):
        raise CustomLossError(f"method {target!r} called on a {type(self_).__name__}")
    method = getattr(self_, target)
    if len(a) >= 2 and isinstance(a[1], Tensor):
        _check_size(getattr(Tensor, target), a, kw, cap)
    return method(*a[1:], **kw)


def _any_tensor(a: list[Any], kw: dict[str, Any]) -> bool:
    return any(isinstance(x, Tensor) for x in (*a, *kw.values()))


def _plain(target: str, fn: Callable[..., Any], a: list[Any]) -> Any:
    """Python arithmetic on sizes and numbers (``x.shape[0] * 2``): numbers only, and
    small, so that no chain of ``**`` or sequence repetition eats the machine."""
    if target == "operator.getitem":
        return fn(*a)
    if not all(isinstance(x, int | float) for x in a):
        kinds = ", ".join(type(x).__name__ for x in a)
        raise CustomLossError(f"{target} of {kinds}: only numbers and tensors")
    if target in ("operator.pow", "math.pow") and abs(a[1]) > 64:
        raise CustomLossError(f"{target} with an exponent of {a[1]} (at most 64 on numbers)")
    out = fn(*a)
    if isinstance(out, int) and abs(out) > 1 << 64:
        raise CustomLossError(f"{target} made an integer beyond 2**64")
    return out


def _has_sequence(a: list[Any]) -> bool:
    """torch.cat/stack take their tensors as one list argument."""
    return any(isinstance(x, list | tuple) and any(isinstance(y, Tensor) for y in x) for x in a)


def _meta(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to("meta")
    if isinstance(value, list | tuple):
        return type(value)(_meta(v) for v in value)
    return value


def _check_size(fn: Callable[..., Any], a: list[Any], kw: dict[str, Any], cap: int) -> None:
    """Broadcasting and concatenation can make far more than their inputs: work out the
    result's size on shape-only tensors before allocating it."""
    try:
        out = fn(*_meta(a), **{k: _meta(v) for k, v in kw.items()})
    except Exception:
        return  # shape-only tensors can't tell: the real call reports it, or the check after it
    for t in out if isinstance(out, tuple) else (out,):
        if isinstance(t, Tensor) and t.numel() > cap:
            raise CustomLossError(f"would make a tensor of {t.numel()} elements (limit {cap})")


def _check_factory(target: str, a: list[Any], kw: dict[str, Any], cap: int) -> None:
    if any(isinstance(x, Tensor) for x in (*a, *kw.values())):
        raise CustomLossError(f"{target} takes sizes as numbers, not tensors")
    if target == "torch.arange":
        if not all(isinstance(x, int | float) for x in a) or not 1 <= len(a) <= 3:
            raise CustomLossError("torch.arange takes one to three numbers")
        step = a[2] if len(a) == 3 else 1
        start, end = (a[0], a[1]) if len(a) >= 2 else (0, a[0])
        n = math.ceil((end - start) / step) if step else cap + 1
    else:
        size = a[:-1] if target == "torch.full" else a
        dims = (
            list(size[0])
            if len(size) == 1 and isinstance(size[0], list | tuple | torch.Size)
            else list(size)
        )
        if not all(isinstance(d, int) and d >= 0 for d in dims):
            raise CustomLossError(f"{target} takes non-negative integer sizes")
        n = math.prod(dims)
    if n > cap:
        raise CustomLossError(f"{target} would make {n} elements (limit {cap})")


def loss_and_gradient(
    graph: Graph, logprobs: list[Tensor], inputs: list[Mapping[str, Any]], backward: bool
) -> tuple[list[float], list[Tensor | None], dict[str, float]]:
    """Run the graph on each datum of one request within a pass. Returns each datum's
    loss, ``d loss / d logprobs`` per datum (when ``backward``) and the metric sums (in
    float64). Raises :class:`CustomLossError` for anything the user must fix; nothing is
    returned half-done."""
    leaves = [lp.detach().to(_DEVICE, torch.float32).requires_grad_(backward) for lp in logprobs]
    losses: list[Tensor] = []
    sums: dict[str, float] = {}
    with torch.enable_grad() if backward else torch.no_grad():
        for leaf, datum_inputs in zip(leaves, inputs, strict=True):
            loss, metrics = evaluate(graph, leaf, datum_inputs)
            losses.append(loss)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach().double().reshape(()))
    grads: list[Tensor | None] = [None] * len(leaves)
    if backward:
        total = torch.stack([loss.float() for loss in losses]).sum()
        if not total.requires_grad:
            raise CustomLossError(
                f"custom loss {graph.name!r} does not depend on logprobs, so it has no gradient"
            )
        found = torch.autograd.grad(total, leaves, allow_unused=True)
        for i, g in enumerate(found):
            if g is None:
                raise CustomLossError(
                    f"custom loss {graph.name!r} does not depend on logprobs (datum {i} got no"
                    " gradient)"
                )
            if not bool(torch.isfinite(g).all()):
                raise CustomLossError(
                    f"custom loss {graph.name!r} has a non-finite gradient for datum {i};"
                    " check for log(0), division by zero or overflow"
                )
        grads = list(found)
    values = [float(loss.detach()) for loss in losses]
    if backward and not all(math.isfinite(v) for v in values):
        raise CustomLossError(f"custom loss {graph.name!r} is not finite: {values}")
    return values, grads, sums
