"""Every bad input gets a user error that says what to change; the server keeps serving
and the model's state is untouched (same logprobs, no gradient accumulated)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.conftest import API_KEY, QWEN
from tests.fixtures.server import Server

PROBE = [9, 8, 7, 6, 5, 4]


def _datum(tokens: list[int], **inputs) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
    )


def _probe(tc: tinker.TrainingClient) -> np.ndarray:
    return (
        tc.forward([_datum(PROBE)], "cross_entropy")
        .result()
        .loss_fn_outputs[0]["logprobs"]
        .to_numpy()
    )


@pytest.fixture(scope="module")
def victim(server: Server):
    """A model that was trained one step, so its state is not just the base model."""
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    tc = client.create_lora_training_client(base_model=QWEN, rank=4).result()
    tc.forward_backward([_datum([1, 2, 3, 4, 5], weights=[1.0] * 4)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    before = _probe(tc)
    yield tc
    # After every rejected request: same outputs, and no gradient slipped in.
    np.testing.assert_array_equal(_probe(tc), before)
    with pytest.raises(tinker.RequestFailedError, match="no gradients"):
        tc.optim_step(types.AdamParams()).result()
    tc.forward_backward([_datum([1, 2, 3], weights=[1.0, 1.0])], "cross_entropy").result()
    assert tc.optim_step(types.AdamParams()).result().metrics["grad_norm:mean"] > 0
    client.close("success")


def _fails(future, *hints: str) -> None:
    with pytest.raises(tinker.RequestFailedError) as info:
        future.result()
    assert info.value.category == "user"
    for hint in hints:
        assert hint in str(info.value), str(info.value)


N = len(PROBE) - 1
CASES = {
    "token outside vocabulary": (
        [_datum([1, 2, 100_000, 3], weights=[1.0] * 3)],
        "cross_entropy",
        ("token id 100000", "vocabulary"),
    ),
    "target outside vocabulary": (
        [
            types.Datum(
                model_input=types.ModelInput.from_ints([1, 2]),
                loss_fn_inputs={"target_tokens": [2, 5000], "weights": [1.0, 1.0]},
            )
        ],
        "cross_entropy",
        ("token id 5000",),
    ),
    "longer than context": (
        [_datum(list(range(1, 200)) * 3 + [1], weights=[1.0] * 597)],
        "cross_entropy",
        ("597 tokens", "context is 512"),
    ),
    "weights too short": (
        [_datum(PROBE, weights=[1.0] * (N - 1))],
        "cross_entropy",
        ("'weights'", f"({N - 1},)", f"({N},)"),
    ),
    "targets too long": (
        [
            types.Datum(
                model_input=types.ModelInput.from_ints(PROBE[:-1]),
                loss_fn_inputs={"target_tokens": PROBE, "weights": [1.0] * (N + 1)},
            )
        ],
        "cross_entropy",
        ("target_tokens has shape",),
    ),
    "advantages wrong length": (
        [_datum(PROBE, logprobs=[-1.0] * N, advantages=[1.0] * (N + 2))],
        "importance_sampling",
        ("'advantages'",),
    ),
    "missing advantages": (
        [_datum(PROBE, logprobs=[-1.0] * N)],
        "ppo",
        ("lacks advantages", "ppo requires"),
    ),
    "missing sampler logprobs": (
        [_datum(PROBE, advantages=[1.0] * N)],
        "importance_sampling",
        ("lacks logprobs",),
    ),
    "nan advantage": (
        [_datum(PROBE, logprobs=[-1.0] * N, advantages=[1.0, math.nan] + [0.0] * (N - 2))],
        "importance_sampling",
        ("NaN or infinity", "'advantages'"),
    ),
    "infinite weight": (
        [_datum(PROBE, weights=[1.0, math.inf] + [0.0] * (N - 2))],
        "cross_entropy",
        ("NaN or infinity", "'weights'"),
    ),
    "gspo with empty ratio mask": (
        [_datum(PROBE, logprobs=[-1.0] * N, advantages=[1.0] * N, sequence_ratio_mask=[0.0] * N)],
        "gspo",
        ("sequence_ratio_mask",),
    ),
    "unknown loss": (
        [_datum(PROBE, weights=[1.0] * N)],
        "stable_reinforce",
        ("not supported", "cross_entropy", "importance_sampling", "ppo", "cispo", "dro"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_is_a_user_error(victim: tinker.TrainingClient, case: str):
    data, loss_fn, hints = CASES[case]
    _fails(victim.forward_backward(data, loss_fn), *hints)


def test_unknown_loss_config_key(victim: tinker.TrainingClient):
    data = [_datum(PROBE, logprobs=[-1.0] * N, advantages=[1.0] * N)]
    _fails(victim.forward_backward(data, "ppo", {"clip_low": 0.5}), "clip_low_threshold")


def test_bad_adam_params(victim: tinker.TrainingClient):
    _fails(victim.optim_step(types.AdamParams(learning_rate=-1.0)), "learning_rate")
    _fails(victim.optim_step(types.AdamParams(beta2=1.5)), "beta")


def test_forward_only_then_optim_step_has_no_gradients(victim: tinker.TrainingClient):
    victim.forward([_datum(PROBE, weights=[1.0] * N)], "cross_entropy").result()
    _fails(victim.optim_step(types.AdamParams()), "no gradients", "forward_backward")


def test_unknown_base_model(server: Server):
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    with pytest.raises(tinker.RequestFailedError, match=r"not served here.*Qwen/Qwen3-0\.6B"):
        client.create_lora_training_client(base_model="Qwen/Qwen3-999B", rank=4).result()


@pytest.mark.parametrize("rank", [0, -3, 100_000])
def test_bad_rank(server: Server, rank: int):
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    with pytest.raises(tinker.RequestFailedError, match="rank must be between 1 and"):
        client.create_lora_training_client(base_model=QWEN, rank=rank).result()


def test_unknown_model_id_is_a_404_with_a_message(server: Server):
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": API_KEY})
    response = http.post(
        "/optim_step", json={"model_id": "sess-nope:train:0", "seq_id": 1, "adam_params": {}}
    )
    assert response.status_code == 404
    assert "unknown model_id" in response.json()["detail"]
    response = http.post("/get_info", json={"model_id": "sess-nope:train:0"})
    assert response.status_code == 404
    response = http.post("/retrieve_future", json={"request_id": "req-nope"})
    assert response.status_code == 404 and "unknown request_id" in response.json()["detail"]


def test_garbage_bodies_are_400_with_a_message(server: Server):
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": API_KEY})
    response = http.post(
        "/forward_backward",
        content=b"\xff\x00garbage",
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert response.status_code == 400 and "protobuf" in response.json()["detail"]
    response = http.post(
        "/forward_backward", content=b"not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["detail"]
    response = http.post("/create_model", json={"session_id": "x"})
    assert response.status_code == 422 and response.json()["detail"]
    assert http.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("run", ["..", ".", "..%2F..", "%2E%2E", "a b", "-x"])
def test_run_ids_that_could_leave_the_checkpoint_folder_are_refused(server: Server, run: str):
    """A run id of '..' (or anything not shaped like one) never reaches a path: folders
    planted beside and above checkpoints/ survive every route that takes a run id."""
    planted = [
        server.data_dir / "weights" / "keep",
        server.data_dir / "sampler_weights" / "keep",
        server.data_dir.parent / "weights" / "keep",
    ]
    for folder in planted:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text("{}")
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": API_KEY})
    for kind in ("weights", "sampler_weights"):
        for method, suffix in (("DELETE", ""), ("POST", "/publish"), ("DELETE", "/publish")):
            url = f"/training_runs/{run}/checkpoints/{kind}/keep{suffix}"
            response = http.request(method, url)
            assert 400 <= response.status_code < 500, (url, response.text)
            assert response.json()["detail"]
        for route, body in (
            ("/weights_info", {"tinker_path": f"tinker://{run}/{kind}/keep"}),
            ("/create_sampling_session", _sampling_body(f"tinker://{run}/{kind}/keep")),
        ):
            response = http.post(route, json=body)
            assert 400 <= response.status_code < 500, (route, response.text)
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    with pytest.raises(Exception, match=r"training run id|not found|no checkpoint"):
        client.create_sampling_client(model_path=f"tinker://{run}/sampler_weights/keep").result()
    for folder in planted:
        assert (folder / "adapter_config.json").read_text() == "{}"


def _sampling_body(path: str) -> dict:
    return {"session_id": "x", "sampling_session_seq_id": 0, "model_path": path}


def _tensor_cases() -> dict[str, Callable[[Any], None]]:
    """Well-formed ForwardBackwardRequest protobufs whose tensors are not."""

    def datum(msg: Any) -> Any:
        return msg.data[0]

    def targets(msg: Any) -> Any:
        return datum(msg).loss_fn_inputs["target_tokens"]

    def sparse(msg: Any, crow: list[int], shape: list[int]) -> None:
        tensor = targets(msg)
        tensor.ClearField("shape")
        tensor.shape.extend(shape)
        tensor.sparse_csr.values = np.array([5], "<i8").tobytes()
        tensor.sparse_csr.crow_indices = np.array(crow, "<i8").tobytes()
        tensor.sparse_csr.col_indices = np.array([0], "<i8").tobytes()

    return {
        "token bytes not a multiple of 4": lambda m: setattr(
            datum(m).model_input[0].encoded_text, "tokens", b"\x01\x02\x03"
        ),
        "tensor bytes not a multiple of 8": lambda m: setattr(targets(m), "dense", b"\x01" * 9),
        "decreasing row pointers": lambda m: sparse(m, [0, 1, 0, 1], [3, 2]),
        "sparse shape [1, 10**12]": lambda m: sparse(m, [0, 1], [1, 10**12]),
        "negative dense shape": lambda m: targets(m).shape.extend([-1, -5]),
    }


@pytest.mark.parametrize("case", list(_tensor_cases()))
def test_malformed_tensors_fail_in_their_turn_and_the_next_request_runs(server: Server, case: str):
    """A 200 with a future that fails as a user error (never a 500), and the request still
    uses up its seq_id: the model's next request runs."""
    from tinker.proto import tinker_public_pb2 as pb

    from tests.sdk.test_ordering import Raw, _fwdbwd_body

    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    model_id = client.create_lora_training_client(base_model=QWEN, rank=4).result().model_id
    raw = Raw(server)
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(_fwdbwd_body(model_id, 1, [1, 2, 3, 4]))
    _tensor_cases()[case](msg)
    failure = raw.result(raw.fwdbwd_body(msg.SerializeToString()))
    assert failure["category"] == "user" and failure["error"], failure
    after = raw.result(raw.fwdbwd(model_id, 2, [1, 2, 3, 4]))
    assert after["metrics"]["loss:sum"] > 0, after
    client.close("success")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d["loss_fn_inputs"].__setitem__("target_tokens", [1, 2, 3]),
        lambda d: d["model_input"].__setitem__("chunks", [[1, 2, 3]]),
        lambda d: d["model_input"]["chunks"][0].__setitem__("tokens", [2**63, 1, 2]),
    ],
    ids=["tensor as a list", "chunk as a list", "token of 2**63"],
)
def test_malformed_json_datums_fail_in_their_turn(server: Server, mangle):
    from tests.sdk.test_ordering import Raw

    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    model_id = client.create_lora_training_client(base_model=QWEN, rank=4).result().model_id
    raw = Raw(server)
    good = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64", "shape": [3]}},
    }
    bad = json.loads(json.dumps(good))
    mangle(bad)
    for seq_id, datum in ((1, bad), (2, good)):
        body = {"model_id": model_id, "seq_id": seq_id, "forward_input": {"data": [datum]}}
        response = raw.http.post("/forward", json=body)
        assert response.status_code == 200, response.text
        answer = raw.result(response.json()["request_id"])
        if datum is bad:
            assert answer["category"] == "user" and "malformed" in answer["error"], answer
        else:
            assert answer["metrics"]["loss:sum"] > 0, answer
    client.close("success")


@pytest.fixture(scope="module")
def capped(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("capped") / "treadle"
    args = ["--max-body-bytes", "1000000", "--max-decompressed-bytes", "2000000"]
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, args)
    yield server
    server.stop()


def test_bodies_past_the_caps_are_refused_while_they_stream(capped: Server):
    """A declared length past the cap, a chunked body that keeps coming, and a 20 KB zstd
    body that would expand to 600 MB: each refused with a JSON body naming its cap, and
    the server still trains."""
    import zstandard

    from tests.sdk.test_ordering import Raw, _fwdbwd_body

    raw = Raw(capped)
    response = raw.http.post("/create_session", content=b"{" + b" " * 2_000_000 + b"}")
    assert response.status_code == 413 and "--max-body-bytes" in response.json()["detail"]

    def chunks():
        for _ in range(40):
            yield b" " * 100_000

    response = raw.http.post(
        "/create_session", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413 and "--max-body-bytes" in response.json()["detail"]

    client = tinker.ServiceClient(base_url=capped.url, api_key=API_KEY)
    model_id = client.create_lora_training_client(base_model=QWEN, rank=4).result().model_id
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 600_000_000)
    assert len(bomb) < 100_000
    response = raw.http.post(
        "/forward_backward",
        content=bomb,
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
    )
    assert response.status_code == 400
    assert "--max-decompressed-bytes" in response.json()["detail"]
    small = zstandard.ZstdCompressor().compress(_fwdbwd_body(model_id, 1, [1, 2, 3, 4]))
    response = raw.http.post(
        "/forward_backward",
        content=small,
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
    )
    assert response.status_code == 200
    assert raw.result(response.json()["request_id"])["metrics"]["loss:sum"] > 0
    client.close("success")


def test_each_size_cap_names_itself(server: Server):
    """Sizes a thousand times past what the SDK sends are refused before any work, each
    with the cap's flag in the message."""
    from tinker.proto.request_conv import forward_backward_request_to_proto

    from tests.sdk.test_ordering import Raw

    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    sampler = client.create_sampling_client(base_model=QWEN).result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    many = types.SamplingParams(max_tokens=400, stop=[f"s{i}" for i in range(100_000)])
    with pytest.raises(Exception, match="--max-stop-strings"):
        sampler.sample(prompt, 1, many).result()
    long = types.SamplingParams(max_tokens=4, stop=["x" * 10_000])
    with pytest.raises(Exception, match="--max-stop-string-chars"):
        sampler.sample(prompt, 1, long).result()

    metadata = {"blob": "x" * 20_000_000}
    with pytest.raises(Exception, match="--max-metadata-bytes"):
        client.create_lora_training_client(base_model=QWEN, rank=4, user_metadata=metadata).result()

    # The SDK splits big batches into requests of 1024 datums; a raw client need not.
    tc = client.create_lora_training_client(base_model=QWEN, rank=4).result()
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[_datum([1, 2, 3])] * 20_000, loss_fn="cross_entropy"
        ),
        model_id=tc.model_id,
        seq_id=1,
    )
    raw = Raw(server)
    body = forward_backward_request_to_proto(request).SerializeToString()
    failure = raw.result(raw.fwdbwd_body(body))
    assert failure["category"] == "user" and "--max-datums-per-request" in failure["error"]
    after = raw.result(raw.fwdbwd(tc.model_id, 2, [1, 2, 3]))
    assert after["metrics"]["loss:sum"] > 0

    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": API_KEY})
    for route in ("/training_runs", "/checkpoints", "/sessions"):
        for query in ({"limit": 10**9}, {"limit": -1}, {"offset": -5}):
            response = http.get(route, params=query)
            assert response.status_code == 400, (route, query, response.text)
            assert "--max-list-limit" in response.json()["detail"]
    client.close("success")


def _routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, from its OpenAPI schema."""
    from treadle.server.app import create_app
    from treadle.settings import Settings

    app = create_app(Settings(), lambda entry, settings: None)  # type: ignore[arg-type,return-value]
    paths = app.openapi()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops]


def _step_and_sample(server: Server) -> dict[str, Any]:
    """One seeded training step and one seeded sample from its weights: the numbers a
    barrage of junk must not change."""
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    tc = client.create_lora_training_client(base_model=QWEN, rank=4, seed=11).result()
    fb = tc.forward_backward([_datum(PROBE, weights=[1.0] * N)], "cross_entropy").result()
    step = tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    after_step = _probe(tc)
    sampler = tc.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=5, stop=[])
    sample = sampler.sample(types.ModelInput.from_ints(PROBE), 1, params).result()
    client.close("success")
    return {
        "loss": fb.metrics["loss:sum"],
        "logprobs": fb.loss_fn_outputs[0]["logprobs"].to_numpy().tolist(),
        "grad_norm": step.metrics["grad_norm:mean"],
        "tokens": sample.sequences[0].tokens,
        "sampled_logprobs": sample.sequences[0].logprobs,
        "after_step": after_step,
    }


_JUNK_HEADERS: list[dict[str, str | bytes]] = [
    {},
    {"Content-Encoding": "gzip"},
    {"Content-Encoding": "zstd, zstd"},
    {"Content-Encoding": "x" * 4000},
    {"Content-Type": "application/x-protobuf; charset=\u00ff".encode("latin-1")},
    {"Content-Type": b"\xff\xfejunk"},
    {"Accept": "application/x-protobuf"},
    {"Accept-Encoding": "zstd;q=nan"},
    {"X-API-Key": "tml-" + "z" * 5000},
    {"X-API-Key": b"\xe9\xff"},
    {"X-Stainless-Retry-Count": "-1e309"},
    {"Idempotency-Key": "\u00e9".encode("latin-1") * 100},
]


def test_a_barrage_of_junk_on_every_route_gets_no_5xx(server: Server, victim):
    """Random bodies, headers and path parameters on every route: 4xx (or a 2xx that
    fails its future), never a 5xx. The server still serves, and a seeded training step
    and sample give the same numbers after the barrage as before it (the victim's own
    numbers are checked when the module's fixture ends)."""
    import random

    before = _step_and_sample(server)
    rng = random.Random(0)
    http = httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60)
    junk_values = [None, -1, 2**63, 1e308, "", "x" * 1000, [], {}, [1, "a"], {"a": [None]}]
    seen = 0
    for method, path in _routes():
        for _ in range(12):
            url = path
            for part in ("{session_id}", "{run_id}", "{kind}", "{name}", "{sampler_id}"):
                url = url.replace(part, rng.choice(["..", "x", "%00", "a" * 300, "weights"]))
            kind = rng.randrange(4)
            headers: dict[str, str | bytes]
            if kind == 0:
                content, headers = bytes(rng.randrange(256) for _ in range(64)), {}
            elif kind == 1:
                content = json.dumps(
                    {rng.choice(["model_id", "seq_id", "data", "x"]): rng.choice(junk_values)}
                ).encode()
                headers = {"Content-Type": "application/json"}
            elif kind == 2:
                content = bytes(rng.randrange(256) for _ in range(128))
                headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
            else:
                content, headers = b"[" * 10_000, {"Content-Type": "application/json"}
            headers = {**headers, **rng.choice(_JUNK_HEADERS)}
            params = rng.choice([{}, {"limit": "1e9"}, {"offset": "x"}, {"\u00e9": "\x00"}])
            response = http.request(method, url, content=content, headers=headers, params=params)
            assert response.status_code < 500, (method, url, headers, response.text)
            assert response.headers["content-type"].startswith("application/json"), url
            seen += 1
    assert seen > 100
    _framing_junk(server)
    assert http.get("/api/v1/healthz").json() == {"status": "ok"}
    after = _step_and_sample(server)
    np.testing.assert_array_equal(after.pop("after_step"), before.pop("after_step"))
    assert after == before


def _framing_junk(server: Server) -> None:
    """HTTP framing no client library would send, over a raw socket: each gets a 4xx or
    a closed connection, never a 5xx."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    cases = [
        b"Content-Length: abc\r\n\r\n{}",
        b"Content-Length: -5\r\n\r\n{}",
        b"Content-Length: 99999999999999999999999\r\n\r\n{}",
        b"Content-Length: 2\r\nContent-Length: 7\r\n\r\n{}",
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"Content-Length: 100\r\n\r\n{}",  # and then the client goes away
        b"X-Junk: \x00\xff\r\nContent-Length: 2\r\n\r\n{}",
        b"Content-Length: 2\r\nContent-Encoding: \xff\r\n\r\n{}",
    ]
    for extra in cases:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\n"
                b"X-API-Key: " + API_KEY.encode() + b"\r\n"
                b"Content-Type: application/json\r\n" + extra
            )
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        if answer:
            status = int(answer.split(b" ", 2)[1])
            assert 400 <= status < 500, (extra, answer[:300])


@pytest.mark.parametrize(
    ("body", "flag"),
    [
        ({"tags": ["x" * 10_000]}, "--max-name-chars"),
        ({"tags": [f"t{i}" for i in range(1000)]}, "at most 64"),
        ({"project_id": "p" * 10_000}, "--max-name-chars"),
        ({"display_name": "d" * 10_000}, "--max-name-chars"),
        ({"sdk_version": "v" * 10_000}, "--max-name-chars"),
        ({"user_metadata": {"blob": "x" * 1_000_000}}, "--max-metadata-bytes"),
    ],
)
def test_sessions_refuse_oversized_names_and_metadata(server: Server, body: dict, flag: str):
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": API_KEY})
    response = http.post("/create_session", json=body)
    assert response.status_code == 400 and flag in response.json()["detail"], response.text
    assert http.post("/create_session", json={"tags": ["ok"]}).status_code == 200
