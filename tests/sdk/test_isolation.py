"""Two users on one server: for bob, everything alice made does not exist, on every route
of the SDK and the REST API — except checkpoints alice published, which bob may read,
load and sample but never change."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import QWEN
from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key
from tests.sdk.test_ordering import _fwdbwd_body

DATUM = types.Datum(
    model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
    loss_fn_inputs={"target_tokens": [6, 7, 8, 9]},
)


@pytest.fixture(scope="module")
def two_users(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("two-users") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, ["--long-poll-seconds", "2"])
    yield server, alice, bob
    server.stop()


class _Alice:
    """What alice made: a session, a trained model, checkpoints, a sampler, a future."""

    def __init__(self, server: Server, key: str) -> None:
        self.client = tinker.ServiceClient(base_url=server.url, api_key=key)
        self.rest = tinker.RestClient(base_url=server.url, api_key=key)
        self.tc = self.client.create_lora_training_client(base_model=QWEN, rank=4, seed=2)
        self.tc = self.tc.result() if hasattr(self.tc, "result") else self.tc
        self.tc.forward_backward([DATUM], "cross_entropy").result()
        self.tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
        self.model_id = self.tc.model_id
        self.session_id = self.model_id.split(":train:")[0]
        self.state = self.tc.save_state("first-state").result().path
        self.weights = self.tc.save_weights_for_sampler("first-weights").result().path
        self.sampler = self.tc.save_weights_and_get_sampling_client()
        self.sampler = self.sampler.result() if hasattr(self.sampler, "result") else self.sampler
        self.http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": key})
        self.request_id = self.http.post(
            "/forward_backward",
            content=_fwdbwd_body(self.model_id, 3, [5, 6, 7, 8, 9]),
            headers={"Content-Type": "application/x-protobuf"},
        ).json()["request_id"]

    def loss(self) -> float:
        return self.tc.forward([DATUM], "cross_entropy").result().metrics["loss:sum"]


def _failure(http: httpx.Client, response: httpx.Response) -> dict:
    """The answer of a future-returning call, polled to its end."""
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    while True:
        answer = http.post("/retrieve_future", json={"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer


def _folder(server: Server, tinker_path: str) -> Path:
    run, kind, name = tinker_path.removeprefix("tinker://").split("/")
    return server.data_dir / "checkpoints" / run / kind / name


def test_another_users_things_do_not_exist_on_any_route(two_users):
    server, alice_key, bob_key = two_users
    alice = _Alice(server, alice_key)
    before = alice.loss()
    bob = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": bob_key})
    bob_session = bob.post("/create_session", json={}).json()["session_id"]
    run, model, path = alice.model_id, {"model_id": alice.model_id}, alice.state
    sampler_id = alice.sampler._sampling_session_id
    _, kind, name = path.removeprefix("tinker://").split("/")
    not_found = {
        "GET run": bob.get(f"/training_runs/{run}"),
        "GET run checkpoints": bob.get(f"/training_runs/{run}/checkpoints"),
        "DELETE checkpoint": bob.delete(f"/training_runs/{run}/checkpoints/{kind}/{name}"),
        "publish": bob.post(f"/training_runs/{run}/checkpoints/{kind}/{name}/publish"),
        "unpublish": bob.delete(f"/training_runs/{run}/checkpoints/{kind}/{name}/publish"),
        "weights_info": bob.post("/weights_info", json={"tinker_path": path}),
        "get_info": bob.post("/get_info", json=model),
        "forward_backward": bob.post(
            "/forward_backward",
            content=_fwdbwd_body(run, 4, [5, 6, 7, 8, 9]),
            headers={"Content-Type": "application/x-protobuf"},
        ),
        "optim_step": bob.post("/optim_step", json={**model, "seq_id": 4, "adam_params": {}}),
        "save_weights": bob.post("/save_weights", json={**model, "path": "mine", "seq_id": 4}),
        "save_for_sampler": bob.post(
            "/save_weights_for_sampler", json={**model, "path": "mine", "seq_id": 4}
        ),
        "load_state": bob.post("/load_weights", json={**model, "path": path, "seq_id": 4}),
        "unload_model": bob.post("/unload_model", json=model),
        "sampler from path": bob.post(
            "/create_sampling_session",
            json={"session_id": bob_session, "sampling_session_seq_id": 0, "model_path": path},
        ),
        "sampler in alice's session": bob.post(
            "/create_sampling_session",
            json={"session_id": alice.session_id, "base_model": QWEN},
        ),
        "get_sampler": bob.get(f"/samplers/{sampler_id}"),
        "asample": bob.post(
            "/asample",
            json={
                "sampling_session_id": sampler_id,
                "seq_id": 0,
                "prompt": {"chunks": [{"tokens": [1, 2]}]},
                "sampling_params": {"max_tokens": 2},
            },
        ),
        "retrieve_future": bob.post("/retrieve_future", json={"request_id": alice.request_id}),
        "heartbeat": bob.post("/session_heartbeat", json={"session_id": alice.session_id}),
        "finish": bob.post(f"/sessions/{alice.session_id}/finish", json={}),
        "get_session": bob.get(f"/sessions/{alice.session_id}"),
    }
    for what, response in not_found.items():
        assert response.status_code == 404, (what, response.status_code, response.text)
        # The same answer as for an id that never existed: nothing about its owner.
        assert response.json()["detail"] and "alice" not in response.text, what
    # Futures: creating a model in alice's session, or one from alice's checkpoint.
    create = bob.post(
        "/create_model",
        json={"session_id": alice.session_id, "base_model": QWEN, "lora_config": {"rank": 4}},
    )
    answer = _failure(bob, create)
    assert answer["category"] == "user" and "unknown session" in answer["error"]
    load = bob.post(
        "/load_weights", json={"session_id": bob_session, "model_seq_id": 0, "path": path}
    )
    answer = _failure(bob, load)
    assert answer["category"] == "user" and "no checkpoint" in answer["error"]
    # Listings show bob nothing of alice's.
    assert alice.model_id not in bob.get("/training_runs").text
    assert alice.model_id not in bob.get("/checkpoints").text
    assert alice.session_id not in bob.get("/sessions").text
    # Alice's things are as they were.
    assert _folder(server, path).is_dir()
    assert alice.loss() == pytest.approx(before)
    listed = alice.rest.list_checkpoints(alice.model_id).result().checkpoints
    assert {c.tinker_path for c in listed} == {alice.state, alice.weights}
    assert alice.session_id in alice.http.get("/sessions").text
    alice.client.close("success")


def test_ids_that_cross_the_wire_are_unguessable(two_users):
    server, alice_key, _ = two_users
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": alice_key})
    session = http.post("/create_session", json={}).json()["session_id"]
    assert re.fullmatch(r"sess-[0-9a-f]{32}", session)
    created = http.post(
        "/create_model",
        json={"session_id": session, "base_model": QWEN, "lora_config": {"rank": 4}},
    ).json()
    assert re.fullmatch(r"req-[0-9a-f]{32}", created["request_id"])
    # A repeated create_model of that id with other parameters is refused, not reused.
    other = http.post(
        "/create_model",
        json={"session_id": session, "base_model": QWEN, "lora_config": {"rank": 8}},
    )
    answer = _failure(http, other)
    assert answer["category"] == "user" and "other parameters" in answer["error"]


def test_a_published_checkpoint_is_readable_by_all_and_changed_by_its_owner_only(two_users):
    server, alice_key, bob_key = two_users
    alice = _Alice(server, alice_key)
    bob = tinker.ServiceClient(base_url=server.url, api_key=bob_key)
    bob_rest = tinker.RestClient(base_url=server.url, api_key=bob_key)
    for path in (alice.state, alice.weights):
        alice.rest.publish_checkpoint_from_tinker_path(path).result()
    listed = alice.rest.list_checkpoints(alice.model_id).result().checkpoints
    assert all(c.public for c in listed)
    assert bob_rest.get_weights_info_by_tinker_path(alice.state).result().lora_rank == 4
    copy = bob.create_training_client_from_state(alice.state).result()
    assert copy.forward([DATUM], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
        alice.loss(), rel=1e-5
    )
    sampler = bob.create_sampling_client(model_path=alice.weights).result()
    out = sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2))
    assert len(out.result().sequences[0].tokens) >= 1
    with pytest.raises(tinker.NotFoundError):
        bob_rest.delete_checkpoint_from_tinker_path(alice.state).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.unpublish_checkpoint_from_tinker_path(alice.state).result()
    assert _folder(server, alice.state).is_dir()
    alice.rest.unpublish_checkpoint_from_tinker_path(alice.state).result()
    with pytest.raises(tinker.RequestFailedError, match="no checkpoint"):
        bob.create_training_client_from_state(alice.state).result()
    alice.client.close("success")
    bob.close("success")


def test_malformed_checkpoint_references_are_400s(two_users):
    server, alice_key, _ = two_users
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": alice_key})
    for response in (
        http.post("/training_runs/x/checkpoints/bogus/name/publish"),
        http.delete("/training_runs/x/checkpoints/weights/bad%20name/publish"),
        http.post("/weights_info", json={"tinker_path": "not-a-tinker-path"}),
        http.post("/weights_info", json={"tinker_path": "tinker://a/weights/../../x"}),
    ):
        assert response.status_code == 400, response.text
        assert response.json()["detail"]
    assert httpx.get(f"{server.url}/api/v1/usage").status_code == 401
    assert http.get("/usage").json()["user"] == "alice"
