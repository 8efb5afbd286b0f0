"""Server-side custom losses, the checking half: what a ``create_custom_loss`` graph may
contain, checked without running anything (and without torch, so the service can call it).

The SDK traces a per-datum loss ``fn(logprobs, *loss_fn_inputs) -> (loss, {metric: x})``
with ``torch.fx`` and uploads its nodes as plain JSON (format 1). That JSON is untrusted:
a hostile client can send any target name. Nothing here resolves a name to code; a graph
passes only if every node's target is in the fixed allow-lists below, and
:mod:`treadle.engine.custom_loss` maps those same names to the server's own callables.
The lists are the tensor maths a loss needs, minus everything that writes in place,
touches files or processes, allocates uninitialised memory, leaves torch, or moves data
between devices.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from treadle.errors import UserInputError
from treadle.types import Datum

OPERATOR_FUNCTIONS = tuple(
    [
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "neg",
        "pos",
        "abs",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "xor",
        "invert",
        "getitem",
    ]
)
TORCH_FUNCTIONS = tuple(
    [
        "exp",
        "log",
        "log1p",
        "expm1",
        "log2",
        "sqrt",
        "rsqrt",
        "square",
        "abs",
        "neg",
        "sign",
        "sigmoid",
        "tanh",
        "relu",
        "clamp",
        "clip",
        "minimum",
        "maximum",
        "min",
        "max",
        "where",
        "sum",
        "mean",
        "nansum",
        "logsumexp",
        "softmax",
        "log_softmax",
        "cumsum",
        "stack",
        "cat",
        "gather",
        "zeros_like",
        "ones_like",
        "full_like",
        "nan_to_num",
        "isfinite",
        "isnan",
        "isinf",
        "exp2",
        "pow",
        "mul",
        "add",
        "sub",
        "div",
        "true_divide",
        "logical_and",
        "logical_or",
        "logical_not",
        "zeros",
        "ones",
        "full",
        "arange",
        "squeeze",
        "unsqueeze",
        "reshape",
        "flatten",
        "transpose",
        "argmax",
        "argmin",
        "amax",
        "amin",
        "any",
        "all",
        "lerp",
        "logaddexp",
        "erf",
    ]
)
FUNCTIONAL_FUNCTIONS = tuple(
    [
        "relu",
        "log_softmax",
        "softmax",
        "logsigmoid",
        "softplus",
        "mse_loss",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "kl_div",
        "binary_cross_entropy_with_logits",
        "cosine_similarity",
    ]
)
MATH_FUNCTIONS = tuple(["exp", "log", "log1p", "expm1", "sqrt", "pow", "tanh"])
# Names torch.fx records for functions whose public name differs.
ALIASES = {
    "torch._C._nn.log_sigmoid": "logsigmoid",
    "torch._C._nn.softplus": "softplus",
}
FUNCTION_NAMES = frozenset(
    [f"operator.{n}" for n in OPERATOR_FUNCTIONS]
    + [f"torch.{n}" for n in TORCH_FUNCTIONS]
    + [f"torch.nn.functional.{n}" for n in FUNCTIONAL_FUNCTIONS]
    + [f"math.{n}" for n in MATH_FUNCTIONS]
    + list(ALIASES)
)
METHODS = frozenset(
    [
        "sum",
        "mean",
        "nansum",
        "exp",
        "log",
        "log1p",
        "expm1",
        "sqrt",
        "rsqrt",
        "square",
        "abs",
        "neg",
        "sign",
        "sigmoid",
        "tanh",
        "relu",
        "clamp",
        "clip",
        "pow",
        "float",
        "double",
        "long",
        "int",
        "bool",
        "detach",
        "clone",
        "contiguous",
        "gather",
        "unsqueeze",
        "squeeze",
        "view",
        "reshape",
        "flatten",
        "size",
        "dim",
        "numel",
        "transpose",
        "t",
        "permute",
        "expand",
        "expand_as",
        "type_as",
        "softmax",
        "log_softmax",
        "logsumexp",
        "max",
        "min",
        "amax",
        "amin",
        "argmax",
        "argmin",
        "any",
        "all",
        "masked_fill",
        "where",
        "cumsum",
        "nan_to_num",
        "isfinite",
        "isnan",
        "maximum",
        "minimum",
        "add",
        "sub",
        "mul",
        "div",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "to",
    ]
)
GETATTRS = frozenset({"shape", "dtype", "ndim", "T", "device"})
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool")
MEMORY_FORMATS = ("contiguous_format", "preserve_format")
_KINDS = frozenset(
    {"ref", "tuple", "dict", "slice", "ellipsis", "float", "dtype", "device", "layout"}
    | {"memory_format"}
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_KWARG = re.compile(r"_?[a-z][a-z0-9_]{0,31}")
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
MAX_INPUTS = 16
MAX_DEPTH = 16
# Literal values in one node (numbers, strings, list items): a loss's constants are a few
# numbers, a shape or a slice; a table of thousands is data, and belongs in loss_fn_inputs.
MAX_CONSTANTS = 256
MAX_STRING = 128


class CustomLossError(UserInputError):
    """A graph the server refuses, or a loss that failed on a datum: the user's to fix."""


@dataclass(frozen=True)
class Node:
    op: str  # placeholder | call_function | call_method | output
    name: str
    target: str
    args: tuple[Any, ...]  # JSON as the SDK encodes it (see custom_loss.decode)
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class Graph:
    """A checked per-datum loss: its inputs (``logprobs`` first) with their ranks, and
    its nodes in execution order; every reference is to an earlier node."""

    name: str
    inputs: tuple[tuple[str, int], ...]
    nodes: tuple[Node, ...]
    loss: str  # the node holding the loss
    metrics: tuple[tuple[str, str], ...]  # (metric key, node)


@dataclass(frozen=True)
class CustomRun:
    """A request's custom loss as the engine runs it: the checked graph. Its outcome (the
    loss, ``custom/…`` metrics, or the user's error) is in the request's
    ``ForwardBackwardOutcome``."""

    graph: Graph


def _allowed_list() -> str:
    return (
        "functions "
        + ", ".join(sorted(FUNCTION_NAMES))
        + "; tensor methods "
        + ", ".join(sorted(METHODS))
        + "; getattr of "
        + ", ".join(sorted(GETATTRS))
    )


def _refuse(loss: str, node: str, what: str) -> CustomLossError:
    return CustomLossError(
        f"create_custom_loss: {loss} node {node!r} {what}, which the server does not allow."
        f" Server-side custom losses may use: {_allowed_list()}. Rewrite the loss with"
        " these, or run it client-side (treadle serve --no-custom-loss-server-side)"
    )


def validate(name: Any, inputs: Any, graph: Any, max_nodes: int) -> Graph:
    """Check a ``create_custom_loss`` body's ``name``, ``inputs`` and ``graph`` (JSON as
    received) completely, without running anything; return the parsed graph."""
    if not isinstance(name, str) or not name or len(name) > MAX_STRING:
        raise CustomLossError("create_custom_loss: name must be a non-empty string")
    specs = _inputs(name, inputs)
    if not isinstance(graph, dict) or graph.get("format") != 1:
        raise CustomLossError(
            f"create_custom_loss: {name}: graph format must be 1 (the SDK's); got"
            f" {graph.get('format') if isinstance(graph, dict) else graph!r:.40}"
        )
    raw = graph.get("nodes")
    if not isinstance(raw, list) or not raw:
        raise CustomLossError(f"create_custom_loss: {name}: graph has no nodes")
    if len(raw) > max_nodes:
        raise CustomLossError(
            f"create_custom_loss: {name}: graph has {len(raw)} nodes; the server allows at most"
            f" {max_nodes} (--max-custom-loss-nodes): simplify the loss"
        )
    nodes = [_node(name, i, n) for i, n in enumerate(raw)]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    declared = [spec[0] for spec in specs]
    if [n.target for n in placeholders] != declared or nodes[: len(placeholders)] != placeholders:
        raise CustomLossError(
            f"create_custom_loss: {name}: the graph's placeholders"
            f" {[n.target for n in placeholders]} must come first and equal the declared inputs"
            f" {declared}, in order"
        )
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        if node.name in seen:
            raise CustomLossError(f"create_custom_loss: {name}: node name {node.name!r} repeats")
        for ref in _refs([list(node.args), dict(node.kwargs)]):
            if ref not in seen:
                raise CustomLossError(
                    f"create_custom_loss: {name}: node {node.name!r} uses {ref!r}, which is not"
                    " an earlier node of the graph"
                )
        _check_node(name, i, len(nodes), node)
        seen.add(node.name)
    if nodes[-1].op != "output":
        raise CustomLossError(f"create_custom_loss: {name}: the last node must be the output")
    loss, metrics = _output(name, nodes[-1])
    return Graph(name, specs, tuple(nodes), loss, metrics)


def _inputs(name: str, inputs: Any) -> tuple[tuple[str, int], ...]:
    usage = (
        f"create_custom_loss: {name}: inputs must be logprobs (rank 1 or 2) followed by at most"
        f" {MAX_INPUTS - 1} distinct loss_fn_inputs keys (lowercase names, rank 0, 1 or 2)"
    )
    if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_INPUTS:
        raise CustomLossError(usage)
    specs: list[tuple[str, int]] = []
    for item in inputs:
        if not isinstance(item, dict):
            raise CustomLossError(usage)
        key, rank = item.get("name"), item.get("rank")
        if not (isinstance(key, str) and _INPUT_NAME.fullmatch(key)):
            raise CustomLossError(f"{usage}; got input name {key!r:.70}")
        if type(rank) is not int or rank not in (0, 1, 2):
            raise CustomLossError(f"{usage}; input {key!r} has rank {rank!r:.20}")
        specs.append((key, rank))
    names = [key for key, _ in specs]
    if names[0] != "logprobs" or specs[0][1] == 0 or len(set(names)) != len(names):
        raise CustomLossError(f"{usage}; got {specs}")
    return tuple(specs)


def _node(loss: str, index: int, raw: Any) -> Node:
    if not isinstance(raw, dict):
        raise CustomLossError(f"create_custom_loss: {loss}: node {index} is not an object")
    op, name, target = raw.get("op"), raw.get("name"), raw.get("target")
    args, kwargs = raw.get("args", []), raw.get("kwargs", {})
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise CustomLossError(
            f"create_custom_loss: {loss}: node {index} has name {name!r:.70}; names are"
            " identifiers of at most 128 characters"
        )
    if not isinstance(op, str) or not isinstance(target, str) or len(target) > MAX_STRING:
        raise CustomLossError(f"create_custom_loss: {loss}: node {name!r} needs op and target")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise CustomLossError(
            f"create_custom_loss: {loss}: node {name!r}: args must be a list, kwargs an object"
        )
    return Node(op, name, target, tuple(args), kwargs)


def _refs(value: Any) -> list[str]:
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        if set(value) == {"ref"} and isinstance(value["ref"], str):
            return [value["ref"]]
        return [r for v in value.values() for r in _refs(v)]
    return []


def _check_node(loss: str, index: int, count: int, node: Node) -> None:
    op, target = node.op, node.target
    if op == "placeholder":
        return
    if op == "output":
        if index != count - 1:
            raise CustomLossError(
                f"create_custom_loss: {loss}: output node {node.name!r} must be the last node"
            )
        return
    if op == "call_function":
        if target == "getattr":
            a = node.args
            if not (len(a) == 2 and _is_ref(a[0]) and a[1] in GETATTRS and not node.kwargs):
                raise _refuse(loss, node.name, f"reads attribute {a[1:]!r:.60}")
        elif target not in FUNCTION_NAMES:
            raise _refuse(loss, node.name, f"calls function {target!r}")
    elif op == "call_method":
        if target not in METHODS:
            raise _refuse(loss, node.name, f"calls tensor method {target!r}")
        if not (node.args and _is_ref(node.args[0])):
            raise CustomLossError(
                f"create_custom_loss: {loss}: method {target!r} of node {node.name!r} must be"
                " called on an earlier node"
            )
        if target == "to" and any(_mentions_device(v) for v in [*node.args[1:], node.kwargs]):
            raise _refuse(loss, node.name, "moves a tensor to a device with to()")
    else:
        raise _refuse(loss, node.name, f"is of kind {op!r}")
    constants = [0]
    for value in node.args:
        _check_value(loss, node.name, value, 0, constants)
    for key, value in node.kwargs.items():
        if not (isinstance(key, str) and _KWARG.fullmatch(key)):
            raise _refuse(loss, node.name, f"passes keyword {key!r:.40}")
        if key == "out" and value is not None:
            raise _refuse(loss, node.name, "writes into a tensor with out=")
        if key == "inplace" and value is not False:
            raise _refuse(loss, node.name, "asks for inplace=True")
        _check_value(loss, node.name, value, 0, constants)


def _is_ref(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"ref"} and isinstance(value["ref"], str)


def _mentions_device(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, dict):
        return "device" in value or any(_mentions_device(v) for v in value.values())
    if isinstance(value, list):
        return any(_mentions_device(v) for v in value)
    return False


def _check_value(loss: str, node: str, value: Any, depth: int, constants: list[int]) -> None:
    """The SDK's argument encoding (see the reference), bounded in depth and size."""
    if depth > MAX_DEPTH:
        raise CustomLossError(
            f"create_custom_loss: {loss}: node {node!r} nests its arguments deeper than"
            f" {MAX_DEPTH} levels"
        )
    constants[0] += 1
    if constants[0] > MAX_CONSTANTS:
        raise CustomLossError(
            f"create_custom_loss: {loss}: node {node!r} carries more than {MAX_CONSTANTS}"
            " constants; pass large tables as loss_fn_inputs instead"
        )
    if value is None or isinstance(value, bool | int | float):
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise CustomLossError(
                f"create_custom_loss: {loss}: node {node!r} has a string constant longer than"
                f" {MAX_STRING} characters"
            )
        return
    if isinstance(value, list):
        for item in value:
            _check_value(loss, node, item, depth + 1, constants)
        return
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _KINDS):
        raise _refuse(loss, node, f"passes an argument encoded as {json.dumps(value)[:60]}")
    ((kind, inner),) = value.items()
    ok = {
        "ref": isinstance(inner, str),
        "tuple": isinstance(inner, list),
        "dict": isinstance(inner, dict) and all(isinstance(k, str) for k in inner),
        "slice": isinstance(inner, list) and len(inner) == 3,
        "ellipsis": inner is True,
        "float": inner in ("inf", "-inf", "nan"),
        "dtype": inner in DTYPES,
        "device": isinstance(inner, str) and len(inner) <= 16,
        "layout": inner == "strided",
        "memory_format": inner in MEMORY_FORMATS,
    }[kind]
    if not ok:
        raise _refuse(loss, node, f"passes {kind} {json.dumps(inner)[:40]}")
    if kind in ("tuple", "slice"):
        for item in inner:
            _check_value(loss, node, item, depth + 1, constants)
    elif kind == "dict":
        for item in inner.values():
            _check_value(loss, node, item, depth + 1, constants)


def _output(loss: str, node: Node) -> tuple[str, tuple[tuple[str, str], ...]]:
    usage = (
        f"create_custom_loss: {loss}: the output must be (loss, {{metric: tensor}}) with"
        " metric keys custom/<name>:sum or custom/<name>:mean (lowercase)"
    )
    out = node.args[0] if len(node.args) == 1 else None
    items = out.get("tuple") if isinstance(out, dict) and set(out) == {"tuple"} else out
    if not (
        isinstance(items, list)
        and len(items) == 2
        and _is_ref(items[0])
        and isinstance(items[1], dict)
        and set(items[1]) == {"dict"}
        and isinstance(items[1]["dict"], dict)
    ):
        raise CustomLossError(usage)
    metrics = []
    for key, value in items[1]["dict"].items():
        if not METRIC_KEY.fullmatch(key):
            raise CustomLossError(f"{usage}; got metric key {key!r:.80}")
        if not _is_ref(value):
            raise CustomLossError(f"{usage}; metric {key!r} is not a tensor of the graph")
        metrics.append((key, value["ref"]))
    return items[0]["ref"], tuple(metrics)


def check_data(graph: Graph, data: Sequence[Datum]) -> None:
    """Every datum has each input the loss reads, at its declared rank (before queueing,
    so a request that cannot run never touches a model)."""
    (_, lp_rank), *rest = graph.inputs
    for i, datum in enumerate(data):
        targets = datum.inputs["target_tokens"]
        if targets.ndim != lp_rank:
            raise CustomLossError(
                f"datum {i}: target_tokens has rank {targets.ndim}, but loss {graph.name!r}"
                f" declared logprobs with rank {lp_rank}"
            )
        for key, rank in rest:
            value = datum.inputs.get(key)
            if value is None:
                raise CustomLossError(
                    f"datum {i} has no loss_fn_inputs[{key!r}], which loss {graph.name!r} takes"
                )
            # The proto cannot tell shape [] from [1]: the declared rank decides.
            if (rank == 0 and value.size != 1) or (rank > 0 and value.ndim != rank):
                raise CustomLossError(
                    f"datum {i}: loss_fn_inputs[{key!r}] has shape {tuple(value.shape)}, but"
                    f" loss {graph.name!r} declared it with rank {rank}"
                )


def same_request(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two create bodies ask for the same loss (a retry resends the same one)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
