"""Bytes on the wire <-> treadle's own types.

``forward_backward`` arrives as the SDK's protobuf ``ForwardBackwardRequest`` (optionally
zstd-compressed) from SDK 0.25 on, and as JSON from older SDKs; its result goes back as
protobuf ``ForwardBackwardOutput`` when the poll's ``Accept`` asks for it, else as JSON.
The protobuf module is the SDK's own, so the layout matches it by construction.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import zstandard

from treadle.errors import UserInputError
from treadle.types import Datum, ForwardBackwardResult, SampleResult


def _sdk_protobuf() -> ModuleType:
    """The SDK's generated protobuf module, loaded on its own. ``import tinker.proto…``
    would first run the ``tinker`` package's ``__init__``, which imports torch (seconds
    and hundreds of MB) into a layer that computes nothing; the module itself needs only
    ``google.protobuf``. Registered under its own name, so a later ``import tinker``
    in the same process reuses it instead of registering the schema twice."""
    name = "tinker.proto.tinker_public_pb2"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("tinker")
    if package is None or package.origin is None:
        raise ImportError("the tinker SDK is not installed")
    path = Path(package.origin).parent / "proto" / "tinker_public_pb2.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pb: Any = _sdk_protobuf()

PROTOBUF = "application/x-protobuf"

_INT_KEYS = frozenset({"target_tokens"})


# What numpy raises on data that is well-formed protobuf or JSON but not a valid tensor
# (a byte length that is no multiple of the dtype's, a list where an object belongs, an
# int past int64, a shape too large to hold): a problem of the request, never the server.
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, OverflowError, MemoryError)


@dataclass(frozen=True)
class DecodeLimits:
    """Caps applied while decoding (settings ``--max-decompressed-bytes`` and
    ``--max-tensor-elements``)."""

    max_decompressed_bytes: int
    max_tensor_elements: int


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int | None
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool
    # Why the data could not be decoded; the request still takes its seq_id turn.
    problem: str | None = None


def decode_forward_backward_proto(
    body: bytes, content_encoding: str | None, limits: DecodeLimits
) -> ForwardBackwardCall:
    if content_encoding and "zstd" in content_encoding.lower():
        body = _unzstd(body, limits.max_decompressed_bytes)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-ish errors
        raise UserInputError(f"body is not a ForwardBackwardRequest protobuf: {exc}") from exc
    config: dict[str, float | str] = dict(msg.loss_fn_config)
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    call = ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        data=[],
        loss_fn=msg.loss_fn,
        loss_fn_config=config,
        forward_only=msg.forward_only,
    )
    try:
        cap = limits.max_tensor_elements
        call.data = [_proto_datum(i, d, cap) for i, d in enumerate(msg.data)]
    except UserInputError as exc:
        call.problem = str(exc)
    except _MALFORMED as exc:
        call.problem = f"malformed datum in forward_backward_input: {exc!r}"
    return call


def _unzstd(body: bytes, max_bytes: int) -> bytes:
    """``body`` decompressed, a chunk at a time, refused once past ``max_bytes``: the
    size a frame header declares is the sender's claim, not a bound."""
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            while chunk := reader.read(1 << 20):
                out += chunk
                if len(out) > max_bytes:
                    raise UserInputError(
                        f"zstd body expands past the server's cap of {max_bytes} bytes"
                        " (--max-decompressed-bytes); send less per request"
                    )
    except zstandard.ZstdError as exc:
        raise UserInputError(f"body is not valid zstd: {exc}") from exc
    return bytes(out)


def _proto_datum(index: int, msg: pb.Datum, cap: int) -> Datum:
    tokens: list[np.ndarray] = []
    for chunk in msg.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UserInputError(
                f"datum {index}: model_input has a {kind} chunk; treadle serves text-only"
                " models, so send encoded_text chunks only"
            )
        tokens.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4"))
    inputs = {key: _proto_tensor(index, key, t, cap) for key, t in msg.loss_fn_inputs.items()}
    return Datum(_concat_tokens(tokens), inputs)


_PROTO_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
}


def _proto_tensor(index: int, key: str, msg: pb.Tensor, cap: int) -> np.ndarray:
    if msg.dtype == pb.DTYPE_BFLOAT16:
        raw = msg.sparse_csr.values if msg.HasField("sparse_csr") else msg.dense
        widened = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        values = widened
    elif msg.dtype in _PROTO_DTYPES:
        raw = msg.sparse_csr.values if msg.HasField("sparse_csr") else msg.dense
        values = np.frombuffer(raw, dtype=_PROTO_DTYPES[msg.dtype])
    else:
        raise UserInputError(f"datum {index}: loss_fn_inputs[{key!r}] has an unknown dtype")
    crow = col = None
    if msg.HasField("sparse_csr"):
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype="<i8")
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype="<i8")
    return _tensor(index, key, values, list(msg.shape), crow, col, cap)


def _tensor(
    index: int,
    key: str,
    values: np.ndarray,
    shape: list[int],
    crow: np.ndarray | None,
    col: np.ndarray | None,
    cap: int,
) -> np.ndarray:
    """A dense array of the dtype the losses use (int64 targets, float32 otherwise)."""
    dtype = np.int64 if key in _INT_KEYS else np.float32
    where = f"datum {index}: loss_fn_inputs[{key!r}]"
    if crow is not None and col is not None:
        if len(shape) != 2:
            raise UserInputError(f"{where} is sparse CSR but its shape {shape} is not 2-D")
        rows, cols = shape
        if rows < 0 or cols < 0 or rows * cols > cap:
            raise UserInputError(
                f"{where}: sparse shape {shape} would hold {rows * cols} elements; at most"
                f" {cap} (--max-tensor-elements)"
            )
        if crow.shape[0] != rows + 1 or col.shape[0] != values.shape[0]:
            raise UserInputError(f"{where}: CSR indices do not match its values and shape")
        if crow[0] != 0 or crow[-1] != values.shape[0] or np.any(np.diff(crow) < 0):
            raise UserInputError(
                f"{where}: CSR row pointers must start at 0, never decrease and end at the"
                " number of values"
            )
        if col.size and (col.min() < 0 or col.max() >= cols):
            raise UserInputError(f"{where}: CSR column index out of range for shape {shape}")
        dense = np.zeros((rows, cols), dtype=dtype)
        row_of = np.repeat(np.arange(rows), np.diff(crow))
        dense[row_of, col] = values
        return dense
    if shape:
        if int(np.prod(shape)) != values.size:
            raise UserInputError(
                f"{where} has {values.size} values but its shape is {shape}; make them agree"
            )
        return values.astype(dtype).reshape(shape)
    return values.astype(dtype)


def _concat_tokens(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(parts).astype(np.int64)


def decode_forward_backward_json(
    body: Mapping[str, Any], input_key: str, limits: DecodeLimits
) -> ForwardBackwardCall:
    """SDKs up to 0.24: ``{"forward_backward_input"|"forward_input": {data, loss_fn,
    loss_fn_config}, "model_id", "seq_id"}``; tensors as ``{"data", "dtype", "shape"}``."""
    try:
        call_input = body[input_key]
        call = ForwardBackwardCall(
            model_id=body["model_id"],
            seq_id=body.get("seq_id"),
            data=[],
            loss_fn=call_input.get("loss_fn", "cross_entropy"),
            loss_fn_config=dict(call_input.get("loss_fn_config") or {}),
            forward_only=input_key == "forward_input",
        )
        datums = call_input["data"]
    except _MALFORMED as exc:
        raise UserInputError(f"malformed {input_key} body: {exc!r}") from exc
    try:
        cap = limits.max_tensor_elements
        call.data = [_json_datum(i, d, cap) for i, d in enumerate(datums)]
    except UserInputError as exc:
        call.problem = str(exc)
    except _MALFORMED as exc:
        call.problem = f"malformed datum in {input_key}: {exc!r}"
    return call


def _json_datum(index: int, datum: Mapping[str, Any], cap: int) -> Datum:
    tokens: list[np.ndarray] = []
    for chunk in datum["model_input"]["chunks"]:
        kind = chunk.get("type", "encoded_text")
        if kind != "encoded_text":
            raise UserInputError(
                f"datum {index}: model_input has a {kind} chunk; send encoded_text chunks only"
            )
        tokens.append(np.asarray(chunk["tokens"], dtype=np.int64))
    inputs = {}
    for key, tensor in (datum.get("loss_fn_inputs") or {}).items():
        crow = tensor.get("sparse_crow_indices")
        col = tensor.get("sparse_col_indices")
        inputs[key] = _tensor(
            index,
            key,
            np.asarray(tensor["data"]),
            list(tensor.get("shape") or []),
            None if crow is None else np.asarray(crow, dtype=np.int64),
            None if col is None else np.asarray(col, dtype=np.int64),
            cap,
        )
    return Datum(_concat_tokens(tokens), inputs)


def encode_forward_backward_proto(result: ForwardBackwardResult) -> bytes:
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for group in _same_trailing_shape(result.logprobs):
        record = out.loss_fn_outputs.add()
        record.num_datums = len(group)
        field = record.fields["logprobs"]
        field.dtype = pb.DTYPE_FLOAT32
        field.trailing_shape.extend(group[0].shape[1:])
        arrays = [np.ascontiguousarray(a, dtype="<f4") for a in group]
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype="<i8").tobytes()
    for key, value in result.metrics.items():
        out.metrics[key] = value
    return out.SerializeToString()


def _same_trailing_shape(arrays: Iterable[np.ndarray]) -> list[list[np.ndarray]]:
    """Consecutive datums with the same per-token shape share one ArrayRecord."""
    groups: list[list[np.ndarray]] = []
    for array in arrays:
        if groups and groups[-1][0].shape[1:] == array.shape[1:]:
            groups[-1].append(array)
        else:
            groups.append([array])
    return groups


def encode_forward_backward_json(result: ForwardBackwardResult) -> dict[str, Any]:
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [
            {
                "logprobs": {
                    "data": a.reshape(-1).tolist(),
                    "dtype": "float32",
                    "shape": list(a.shape),
                }
            }
            for a in result.logprobs
        ],
        "metrics": result.metrics,
    }


_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


def encode_sample_proto(result: SampleResult) -> bytes:
    """``SampleResponse``; the SDK stamps sequence ids from the submit's answer."""
    out = pb.SampleResponse()
    for seq in result.sequences:
        msg = out.sequences.add()
        msg.stop_reason = _STOP_REASONS[seq.stop_reason]
        msg.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        msg.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(result.prompt_logprobs, dtype="<f4").tobytes()
    if result.topk_prompt_logprobs is not None:
        ids, logprobs = result.topk_prompt_logprobs
        topk = out.topk_prompt_logprobs
        topk.token_ids = np.ascontiguousarray(ids, dtype="<i4").tobytes()
        topk.logprobs = np.ascontiguousarray(logprobs, dtype="<f4").tobytes()
        topk.length, topk.k = ids.shape
    return out.SerializeToString()


def encode_sample_json(result: SampleResult) -> dict[str, Any]:
    """The JSON ``SampleResponse`` of SDKs before 0.25: NaN prompt logprobs are nulls,
    top-k prompt logprobs are ``[[token, logprob], …]`` per position."""
    body: dict[str, Any] = {
        "type": "sample",
        "sequences": [
            {"stop_reason": s.stop_reason, "tokens": list(s.tokens), "logprobs": list(s.logprobs)}
            for s in result.sequences
        ],
    }
    if result.prompt_logprobs is not None:
        body["prompt_logprobs"] = [
            None if np.isnan(v) else float(v) for v in result.prompt_logprobs
        ]
    if result.topk_prompt_logprobs is not None:
        ids, logprobs = result.topk_prompt_logprobs
        body["topk_prompt_logprobs"] = [None] + [
            [[int(t), float(lp)] for t, lp in zip(row_ids, row_lps, strict=True)]
            for row_ids, row_lps in zip(ids[1:], logprobs[1:], strict=True)
        ]
    return body
