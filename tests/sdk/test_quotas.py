"""Per-user limits, and what a session holds being given back when it ends: by close(),
or by its heartbeats stopping."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import QWEN
from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key

LIMITS = ["--max-models-per-user", "2", "--max-samplers-per-user", "2"]
LIMITS += ["--max-queued-tokens-per-user", "40", "--max-checkpoint-bytes-per-user", "1"]
LIMITS += ["--session-timeout-seconds", "3", "--long-poll-seconds", "2"]


def _datum(n: int) -> types.Datum:
    tokens = [(7 * i) % 200 + 1 for i in range(n + 1)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("quotas") / "treadle"
    data_dir.mkdir()
    keys = {user: _new_key(data_dir, user) for user in ("alice", "bob")}
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, LIMITS)
    yield server, keys
    server.stop()


def _client(server: Server, key: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.url, api_key=key)


def test_each_limit_names_itself_and_the_current_use(limited):
    server, keys = limited
    alice = _client(server, keys["alice"])
    first = alice.create_lora_training_client(base_model=QWEN, rank=4).result()
    alice.create_lora_training_client(base_model=QWEN, rank=4).result()
    with pytest.raises(tinker.RequestFailedError, match="the limit is 2 and you have 2"):
        alice.create_lora_training_client(base_model=QWEN, rank=4).result()
    # Another user's limits are their own.
    bob = _client(server, keys["bob"])
    bob.create_lora_training_client(base_model=QWEN, rank=4).result()
    # Queued tokens: one request over the limit is refused and changes nothing.
    with pytest.raises(tinker.RequestFailedError, match="queued training tokens per user"):
        first.forward_backward([_datum(50)], "cross_entropy").result()
    assert first.forward_backward([_datum(20)], "cross_entropy").result().metrics["loss:sum"] > 0
    # Checkpoint bytes: the first save fills the 1-byte allowance, the next is refused.
    first.save_state("one").result()
    with pytest.raises(tinker.RequestFailedError, match="checkpoint bytes on disk per user"):
        first.save_state("two").result()
    # Sampling sessions.
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": keys["alice"]})
    session = http.post("/create_session", json={}).json()["session_id"]
    answers = [
        http.post(
            "/create_sampling_session",
            json={"session_id": session, "sampling_session_seq_id": i, "base_model": QWEN},
        )
        for i in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 400]
    assert (
        "sampling sessions per user: the limit is 2 and you have 2" in answers[2].json()["detail"]
    )
    alice.close("success")
    bob.close("success")
    http.post(f"/sessions/{session}/finish", json={})


def test_a_closed_session_unloads_what_it_held(limited):
    server, keys = limited
    alice = _client(server, keys["alice"])
    models = [alice.create_lora_training_client(base_model=QWEN, rank=4).result() for _ in "ab"]
    sampler = models[0].save_weights_and_get_sampling_client().result()
    alice.close("success")
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": keys["alice"]})
    for model in models:
        response = http.post("/get_info", json={"model_id": model.model_id})
        assert response.status_code == 404 and "no longer loaded" in response.json()["detail"]
    assert http.get(f"/samplers/{sampler._sampling_session_id}").status_code == 404
    session = models[0].model_id.split(":train:")[0]
    assert http.post("/session_heartbeat", json={"session_id": session}).status_code == 410
    # Its models no longer count: alice can make two again.
    again = _client(server, keys["alice"])
    for _ in "ab":
        again.create_lora_training_client(base_model=QWEN, rank=4).result()
    again.close("success")


def _until(check, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def test_a_silent_client_is_ended_and_others_are_not(limited):
    server, keys = limited
    silent = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": keys["alice"]})
    session = silent.post("/create_session", json={}).json()["session_id"]
    body = {"session_id": session, "base_model": QWEN, "lora_config": {"rank": 4}}
    model_id = silent.post("/create_model", json=body).json()["model_id"]
    # Bob's client keeps heartbeating (the SDK does, every 10 s; here faster than the
    # 3 s timeout) while alice's raw client sends nothing.
    bob = _client(server, keys["bob"])
    tc = bob.create_lora_training_client(base_model=QWEN, rank=4).result()
    bob_session = tc.model_id.split(":train:")[0]
    beat = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": keys["bob"]})

    def gone() -> bool:
        assert beat.post("/session_heartbeat", json={"session_id": bob_session}).status_code == 200
        return silent.post("/get_info", json={"model_id": model_id}).status_code == 404

    assert _until(gone)
    assert silent.post("/session_heartbeat", json={"session_id": session}).status_code == 410
    assert tc.forward([_datum(5)], "cross_entropy").result().metrics["loss:sum"] > 0
    bob.close("success")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_memory_comes_back_when_a_session_of_50_models_ends(embedded_data_dir: Path):
    """On the built-in model, a rank-32 adapter is ~20 MB: 50 of them are ~1 GB, and all of
    it goes back to the OS when their session ends."""
    server = Server({}, embedded_data_dir, ["--max-models-per-user", "64"])
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    try:

        def fill(count: int) -> None:
            client = _client(server, "tml-local")
            for _ in range(count):
                client.create_lora_training_client(base_model=model, rank=32).result()
            client.close("success")

        fill(1)  # warm up what a first model allocates once
        idle = _rss_mb(server.process.pid)
        client = _client(server, "tml-local")
        last = [client.create_lora_training_client(base_model=model, rank=32).result()][-1]
        for _ in range(49):
            last = client.create_lora_training_client(base_model=model, rank=32).result()
        full = _rss_mb(server.process.pid)
        client.close("success")
        http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": "tml-local"})
        # close() sends the finish in the background: wait until the models are gone.
        assert _until(
            lambda: http.post("/get_info", json={"model_id": last.model_id}).status_code == 404
        )
        # The memory goes back off the event loop, a moment after the session ends.
        returned = _until(lambda: _rss_mb(server.process.pid) < idle * 1.10, 20)
        after = _rss_mb(server.process.pid)
        print(f"RSS idle {idle:.0f} MB, with 50 models {full:.0f} MB, after {after:.0f} MB")
        assert full > idle + 500
        assert returned, after
        _samplers_of_one_checkpoint_share_its_adapter(server, model, http)
    finally:
        server.stop()


def _samplers_of_one_checkpoint_share_its_adapter(
    server: Server, model: str, http: httpx.Client
) -> None:
    """Five sampling sessions on one checkpoint (read from disk: the run that saved it has
    ended) hold one copy of its adapter, not five."""
    owner = _client(server, "tml-local")
    tc = owner.create_lora_training_client(base_model=model, rank=128).result()
    path = tc.save_weights_for_sampler("shared").result().path
    owner.close("success")
    assert _until(lambda: http.post("/get_info", json={"model_id": tc.model_id}).status_code == 404)
    run, kind, name = path.removeprefix("tinker://").split("/")
    folder = server.data_dir / "checkpoints" / run / kind / name
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    client = _client(server, "tml-local")
    samplers = [client.create_sampling_client(model_path=path).result()]
    first = _rss_mb(server.process.pid)
    samplers += [client.create_sampling_client(model_path=path).result() for _ in range(4)]
    grown = _rss_mb(server.process.pid) - first
    print(f"adapter {size_mb:.0f} MB; four more samplers of it: +{grown:.0f} MB")
    assert size_mb > 50 and grown < size_mb / 2
    client.close("success")
