"""Per-model seq_id ordering, de-duplication of retried submits, and a free event loop,
checked with raw HTTP (the SDK always sends in order) carrying the SDK's own encodings."""

from __future__ import annotations

import httpx
import pytest
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.conftest import API_KEY, QWEN
from tests.fixtures.server import Server


def _fwdbwd_body(model_id: str, seq_id: int, tokens: list[int], weight: float = 1.0) -> bytes:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [weight] * (len(tokens) - 1)},
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


class Raw:
    def __init__(self, server: Server, key: str = API_KEY) -> None:
        self.http = httpx.Client(
            base_url=f"{server.url}/api/v1", headers={"X-API-Key": key}, timeout=60
        )

    def fwdbwd(self, model_id: str, seq_id: int, tokens: list[int]) -> str:
        return self.fwdbwd_body(_fwdbwd_body(model_id, seq_id, tokens))

    def fwdbwd_body(self, body: bytes) -> str:
        response = self.http.post(
            "/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"}
        )
        response.raise_for_status()
        return response.json()["request_id"]

    def optim(self, model_id: str, seq_id: int) -> str:
        body = {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": 0.01}}
        response = self.http.post("/optim_step", json=body)
        response.raise_for_status()
        return response.json()["request_id"]

    def poll(self, request_id: str) -> dict:
        """One long-poll; the JSON answer (try_again, a failure, or a JSON result)."""
        response = self.http.post("/retrieve_future", json={"request_id": request_id})
        response.raise_for_status()
        return response.json()

    def result(self, request_id: str) -> dict:
        while True:
            answer = self.poll(request_id)
            if answer.get("type") != "try_again":
                return answer


@pytest.fixture()
def raw(server: Server) -> Raw:
    return Raw(server)


def _model(service_client, seed: int = 1) -> str:
    tc = service_client.create_lora_training_client(base_model=QWEN, rank=4, seed=seed).result()
    return tc.model_id


TOKENS = [11, 22, 33, 44, 55, 66]


def test_requests_run_in_seq_id_order_whatever_the_arrival(service_client, raw: Raw):
    model_id = _model(service_client)
    # optim_step (seq 2) arrives before the forward_backward (seq 1) it depends on; run
    # out of order it would fail for lack of gradients.
    optim = raw.optim(model_id, 2)
    fwdbwd = raw.fwdbwd(model_id, 1, TOKENS)
    assert "error" not in raw.result(fwdbwd)
    step = raw.result(optim)
    assert "error" not in step, step
    assert step["metrics"]["grad_norm:mean"] > 0


def test_a_request_waits_for_its_gap_to_fill(service_client, raw: Raw):
    model_id = _model(service_client)
    later = raw.fwdbwd(model_id, 2, TOKENS)
    assert raw.poll(later)["type"] == "try_again"  # seq 1 has not arrived yet
    first = raw.fwdbwd(model_id, 1, TOKENS)
    assert "error" not in raw.result(first)
    assert "error" not in raw.result(later)


def test_a_retried_submit_runs_once(service_client, raw: Raw):
    twice, once = _model(service_client, seed=9), _model(service_client, seed=9)
    first = raw.fwdbwd(twice, 1, TOKENS)
    again = raw.fwdbwd(twice, 1, TOKENS)
    assert again == first
    raw.fwdbwd(once, 1, TOKENS)
    g_twice = raw.result(raw.optim(twice, 2))["metrics"]["grad_norm:mean"]
    g_once = raw.result(raw.optim(once, 2))["metrics"]["grad_norm:mean"]
    assert g_twice == pytest.approx(g_once, rel=1e-5)


def test_a_failed_request_does_not_block_the_next(service_client, raw: Raw):
    model_id = _model(service_client)
    bad = raw.fwdbwd(model_id, 1, [1, 100000, 2])  # out of vocabulary
    assert raw.result(bad)["category"] == "user"
    assert "error" not in raw.result(raw.fwdbwd(model_id, 2, TOKENS))


def test_healthz_answers_while_a_long_forward_backward_runs(
    service_client, raw: Raw, server: Server
):
    """A forward_backward of ~100k tokens keeps the engine busy for seconds. If compute
    blocked the event loop, /healthz could only be answered once the job had finished,
    and the poll right after it would return the result instead of try_again."""
    model_id = _model(service_client)
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints([(7 * i + t) % 256 for t in range(500)]),
            loss_fn_inputs={"target_tokens": [(7 * i + t + 1) % 256 for t in range(500)]},
        )
        for i in range(200)
    ]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=1,
    )
    response = raw.http.post(
        "/forward_backward",
        content=forward_backward_request_to_proto(request).SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    )
    request_id = response.json()["request_id"]
    assert httpx.get(f"{server.url}/api/v1/healthz", timeout=60).json() == {"status": "ok"}
    assert raw.poll(request_id)["type"] == "try_again"
    assert "error" not in raw.result(request_id)


def test_rejected_numbered_requests_leave_no_gap(service_client, raw: Raw):
    """The SDK has already spent a seq_id on a request the server rejects; the rejection
    must take that turn, or everything after it would wait forever."""
    model_id = _model(service_client)
    dimuon = raw.http.post(
        "/optim_step",
        json={"model_id": model_id, "seq_id": 1, "optimizer_params": {"type": "dimuon"}},
    ).json()["request_id"]
    bad_json = raw.http.post(
        "/forward_backward",
        json={
            "model_id": model_id,
            "seq_id": 2,
            "forward_backward_input": {
                "loss_fn": "cross_entropy",
                "data": [{"model_input": {"chunks": [{"type": "image", "data": ""}]}}],
            },
        },
    ).json()["request_id"]
    good = raw.fwdbwd(model_id, 3, TOKENS)
    assert "not supported" in raw.result(dimuon)["error"]
    assert "encoded_text" in raw.result(bad_json)["error"]
    assert "error" not in raw.result(good)


def test_a_retried_create_model_answers_with_the_first_future(server: Server):
    """A retried create of a live model gets the first create's future; once the model is
    unloaded, creating it again under the same id is refused (its run is on record)
    instead of silently making a second one."""
    raw = Raw(server)
    session = raw.http.post("/create_session", json={}).json()["session_id"]
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": QWEN,
        "lora_config": {"rank": 4},
    }
    first = raw.http.post("/create_model", json=body).json()
    again = raw.http.post("/create_model", json=body).json()
    assert again == first
    assert raw.result(first["request_id"])["model_id"] == first["model_id"]
    unload = raw.http.post("/unload_model", json={"model_id": first["model_id"]}).json()
    raw.result(unload["request_id"])
    third = raw.http.post("/create_model", json=body).json()
    assert third["request_id"] != first["request_id"]
    failure = raw.result(third["request_id"])
    assert failure["category"] == "user" and "created before and is gone" in failure["error"]
