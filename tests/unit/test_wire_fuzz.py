"""Property-based fuzzing of the request decoders: whatever bytes or JSON arrive, decoding
either gives a call (whose data is sane, or which carries the problem that fails it in its
turn) or raises a UserInputError. Nothing else may escape: anything else is a 500."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treadle.errors import UserInputError
from treadle.server import wire

pb = wire.pb
LIMITS = wire.DecodeLimits(max_decompressed_bytes=1 << 20, max_tensor_elements=1 << 16)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(call: wire.ForwardBackwardCall) -> None:
    if call.problem is not None:
        assert call.problem
        return
    for datum in call.data:
        assert datum.tokens.dtype == np.int64 and datum.tokens.ndim == 1
        for value in datum.inputs.values():
            assert value.size <= LIMITS.max_tensor_elements


def _decode_proto(body: bytes, encoding: str | None = None) -> None:
    try:
        call = wire.decode_forward_backward_proto(body, encoding, LIMITS)
    except UserInputError:
        return
    _check(call)


@FUZZ
@given(st.binary(max_size=4096))
def test_any_bytes(body: bytes):
    _decode_proto(body)
    _decode_proto(body, "zstd")


ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
tensors = st.fixed_dictionaries(
    {
        "dtype": st.integers(min_value=0, max_value=8),
        "shape": st.lists(st.one_of(st.integers(-3, 40), ints), max_size=3),
        "dense": st.binary(max_size=256),
        "sparse": st.none()
        | st.tuples(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=64)),
    }
)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.lists(st.binary(max_size=64), max_size=3),
            st.dictionaries(st.sampled_from(["target_tokens", "weights", "advantages"]), tensors),
        ),
        max_size=3,
    ),
    st.text(max_size=20),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_well_formed_protobuf_with_any_tensors(datums: list[Any], loss_fn: str, seq_id: int):
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=seq_id, loss_fn=loss_fn)
    for chunks, inputs in datums:
        datum = msg.data.add()
        for tokens in chunks:
            datum.model_input.add().encoded_text.tokens = tokens
        for key, spec in inputs.items():
            tensor = datum.loss_fn_inputs[key]
            tensor.dtype = spec["dtype"]
            tensor.shape.extend(spec["shape"])
            if spec["sparse"] is None:
                tensor.dense = spec["dense"]
            else:
                values, crow, col = spec["sparse"]
                tensor.sparse_csr.values = values
                tensor.sparse_csr.crow_indices = crow
                tensor.sparse_csr.col_indices = col
    _decode_proto(msg.SerializeToString())


json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
datum_like = st.fixed_dictionaries(
    {
        "model_input": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "chunks": st.lists(
                        st.one_of(
                            json_values,
                            st.fixed_dictionaries({"tokens": st.lists(ints, max_size=5)}),
                        ),
                        max_size=3,
                    )
                }
            ),
        ),
        "loss_fn_inputs": st.one_of(
            json_values,
            st.dictionaries(
                st.sampled_from(["target_tokens", "weights"]),
                st.one_of(
                    json_values,
                    st.fixed_dictionaries(
                        {"data": json_values, "shape": json_values},
                        optional={"sparse_crow_indices": json_values},
                    ),
                ),
            ),
        ),
    }
)


@FUZZ
@given(
    st.one_of(
        st.dictionaries(st.text(max_size=8), json_values),
        st.fixed_dictionaries(
            {
                "model_id": json_values,
                "seq_id": json_values,
                "forward_backward_input": st.one_of(
                    json_values,
                    st.fixed_dictionaries({"data": st.lists(datum_like, max_size=3)}),
                ),
            }
        ),
    )
)
def test_any_json_body(body: dict[str, Any]):
    try:
        call = wire.decode_forward_backward_json(body, "forward_backward_input", LIMITS)
    except UserInputError:
        return
    _check(call)
