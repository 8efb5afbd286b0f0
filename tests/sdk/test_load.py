"""Many clients at once on the built-in model: 32 SDK clients of three users training,
sampling and sending bad input get sane results or clear user errors while /healthz stays
fast, and the memory comes back once they are gone; a client killed mid-run is cleaned up
after the session timeout while another user trains on undisturbed."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key
from tests.sdk.test_quotas import _rss_mb, _until

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
VOCAB = 49152
WAIT = 120.0  # seconds any one SDK future may take on a busy 2-core machine


def _datum(seed: int, length: int = 8) -> types.Datum:
    tokens = [(seed * 37 + i * 11) % 4000 + 100 for i in range(length + 1)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


def _http(server: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": key}, timeout=30)


def _unloaded(server: Server, key: str, model_id: str) -> bool:
    return _http(server, key).post("/get_info", json={"model_id": model_id}).status_code == 404


def _server(
    tmp_path_factory, embedded_data_dir: Path, name: str, users: list[str], args: Sequence[str] = ()
) -> tuple[Server, dict[str, str]]:
    """A server of the built-in model with a data dir (and keys) of its own; the shared
    embedded data dir must stay keyless for the other tests."""
    data_dir = tmp_path_factory.mktemp(name) / "treadle"
    data_dir.mkdir()
    keys = {user: _new_key(data_dir, user) for user in users}
    folder = embedded_data_dir / "models" / "SmolLM2-135M-Instruct"
    return Server({MODEL: folder}, data_dir, ["--long-poll-seconds", "2", *args]), keys


def _sane_sample(sampler: tinker.SamplingClient, prompt: list[int], n: int, tokens: int) -> None:
    params = types.SamplingParams(max_tokens=tokens, temperature=1.0, stop=[])
    out = sampler.sample(types.ModelInput.from_ints(prompt), n, params).result(timeout=WAIT)
    assert len(out.sequences) == n
    for seq in out.sequences:
        assert len(seq.tokens) == tokens and all(0 <= t < VOCAB for t in seq.tokens)
        assert seq.logprobs is not None and len(seq.logprobs) == tokens
        assert all(math.isfinite(lp) and lp <= 0 for lp in seq.logprobs)


def _train(tc: tinker.TrainingClient, seed: int, steps: int) -> list[float]:
    """``steps`` forward_backward + optim_step on the same two short sequences."""
    losses = []
    data = [_datum(seed), _datum(seed + 1)]
    for _ in range(steps):
        result = tc.forward_backward(data, "cross_entropy")
        optim = tc.optim_step(types.AdamParams(learning_rate=0.01))
        losses.append(result.result(timeout=WAIT).metrics["loss:sum"])
        assert optim.result(timeout=WAIT).metrics["grad_norm:mean"] > 0
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    return losses


class _Health(threading.Thread):
    """Polls GET /healthz back to back; records (status, seconds) of every answer."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.url}/api/v1/healthz"
        self.answers: list[tuple[int, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.done.is_set():
                started = time.monotonic()
                try:
                    status = http.get(self.url).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((status, time.monotonic() - started))
                time.sleep(0.05)


@pytest.fixture(scope="module")
def crowd(tmp_path_factory, embedded_data_dir: Path):
    server, keys = _server(tmp_path_factory, embedded_data_dir, "load", ["ann", "ben", "cat"])
    yield server, keys
    server.stop()


def _warm_up(server: Server, keys: dict[str, str]) -> str:
    """One request of each kind (first use allocates caches) by ann, ended and unloaded;
    returns the path of ann's sampler checkpoint, for the others to try to steal."""
    client = tinker.ServiceClient(base_url=server.url, api_key=keys["ann"])
    tc = client.create_lora_training_client(base_model=MODEL, rank=8).result(timeout=WAIT)
    _train(tc, 0, 1)
    path = tc.save_weights_for_sampler("warm").result(timeout=WAIT).path
    _sane_sample(client.create_sampling_client(model_path=path).result(timeout=WAIT), [5], 1, 3)
    _sane_sample(client.create_sampling_client(base_model=MODEL).result(timeout=WAIT), [5], 2, 3)
    _sane_sample(tc.save_weights_and_get_sampling_client().result(timeout=WAIT), [5], 1, 3)
    client.close("success").result(timeout=WAIT)
    assert _until(lambda: _unloaded(server, keys["ann"], tc.model_id), 30)
    return path


def _trainer(
    i: int, client: tinker.ServiceClient, model_ids: list[str]
) -> tinker.SamplingClient | None:
    """Two steps; then clients 0, 8, 16, 24 open a sampler on a checkpoint they saved,
    1, 9, 17, 25 one on their current weights (returned: they sample last)."""
    tc = client.create_lora_training_client(base_model=MODEL, rank=(8, 16, 32)[i % 3], seed=i)
    tc = tc.result(timeout=WAIT)
    model_ids.append(tc.model_id)
    losses = _train(tc, i, 2)
    assert losses[1] < losses[0], losses  # the same data, trained on: the loss went down
    if i % 8 == 0:
        path = tc.save_weights_for_sampler(f"c{i}").result(timeout=WAIT).path
        return client.create_sampling_client(model_path=path).result(timeout=WAIT)
    if i % 8 == 1:
        return tc.save_weights_and_get_sampling_client().result(timeout=WAIT)
    return None


def _sampler(i: int, client: tinker.ServiceClient) -> str:
    sampler = client.create_sampling_client(base_model=MODEL).result(timeout=WAIT)
    for round_ in range(2):
        _sane_sample(sampler, [i + 3, round_ + 10, 42], 2, 3)
    return "sampled"


def _user_error(future, *hints: str) -> None:
    with pytest.raises(tinker.RequestFailedError) as info:
        future.result(timeout=WAIT)
    assert info.value.category == "user", info.value
    for hint in hints:
        assert hint in str(info.value), str(info.value)


def _bad(i: int, client: tinker.ServiceClient, stolen: str, model_ids: list[str]) -> str:
    """Bad input of four kinds, each refused with a message; then the client still works."""
    tc = client.create_lora_training_client(base_model=MODEL, rank=8).result(timeout=WAIT)
    model_ids.append(tc.model_id)
    beyond = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, VOCAB + 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8]},
    )
    _user_error(tc.forward_backward([beyond], "cross_entropy"), f"token id {VOCAB + 7}")
    _user_error(tc.forward_backward([_datum(i)], "no_such_loss"), "not supported")
    sampler = client.create_sampling_client(base_model=MODEL).result(timeout=WAIT)
    params = types.SamplingParams(max_tokens=3)
    with pytest.raises(tinker.BadRequestError, match="vocabulary"):
        sampler.sample(types.ModelInput.from_ints([5, 2**20]), 1, params).result(timeout=WAIT)
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        client.create_sampling_client(model_path=stolen).result(timeout=WAIT)
    _user_error(client.create_training_client_from_state(stolen), "no checkpoint")
    # Nothing of that stuck: the model trains, the sampler samples.
    _train(tc, i, 1)
    _sane_sample(sampler, [5, 6], 1, 3)
    return "refused"


def test_32_clients_of_three_users_at_once(crowd):
    server, keys = crowd
    stolen = _warm_up(server, keys)  # ann's: ben and cat may not read it
    idle = _rss_mb(server.process.pid)
    health = _Health(server)
    health.start()
    users = ["ann", "ben", "cat"]
    model_ids: dict[str, list[str]] = {user: [] for user in users}
    outcomes: dict[int, str] = {}
    peak: list[float] = []
    # Everyone holds their models until all are done, so the peak holds all 32 at once;
    # then eight trainers sample from their adapters together, and all close.
    together = threading.Barrier(32, action=lambda: peak.append(_rss_mb(server.process.pid)))
    lora_samplers = threading.Barrier(8)

    def user_of(i: int) -> str:
        # Clients 7, 15, 23, 31 send bad input: as ben or cat, who may not read ann's path.
        return ("ben", "cat")[i // 8 % 2] if i % 8 == 7 else users[i % 3]

    def client_thread(i: int) -> None:
        user = user_of(i)
        client = tinker.ServiceClient(base_url=server.url, api_key=keys[user])
        try:
            lora = None
            if i % 8 in (0, 1, 2):
                lora, outcome = _trainer(i, client, model_ids[user]), "trained"
            elif i % 8 == 7:
                outcome = _bad(i, client, stolen, model_ids[user])
            else:
                outcome = _sampler(i, client)
            together.wait(timeout=4 * WAIT)
            if lora is not None:
                # The last work of all: eight adapters in one decode batch, then closed.
                lora_samplers.wait(timeout=4 * WAIT)
                _sane_sample(lora, [i + 1, 7, 9], 1, 3)
            client.close("success").result(timeout=WAIT)
            outcomes[i] = outcome
        except BaseException as exc:
            outcomes[i] = "FAILED: " + "".join(traceback.format_exception(exc)[-3:])
            together.abort()
            lora_samplers.abort()
            client.close("errored")

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=6 * WAIT)
    took = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    failures = {i: o for i, o in outcomes.items() if o.startswith("FAILED")}
    # (The others then stop at a broken barrier: the first failures say what happened.)
    assert not failures, {i: o for i, o in failures.items() if "BrokenBarrier" not in o}
    assert sorted(outcomes.values()) == sorted(
        ["trained"] * 12 + ["sampled"] * 16 + ["refused"] * 4
    ), outcomes
    # All sessions closed: every model is unloaded, and the memory goes back to idle.
    left = [(keys[user], model_id) for user, ids in model_ids.items() for model_id in ids]
    assert len(left) == 16
    assert _until(lambda: all(_unloaded(server, key, m) for key, m in left), 30)
    returned = _until(lambda: _rss_mb(server.process.pid) < idle * 1.10, 30)
    after = _rss_mb(server.process.pid)
    health.done.set()
    health.join(timeout=60)
    slowest = max(seconds for _, seconds in health.answers)
    report = (
        f"32 clients in {took:.0f} s; RSS idle {idle:.0f} MB, all loaded {peak[0]:.0f} MB,"
        f" after {after:.0f} MB; {len(health.answers)} healthz answers, slowest {slowest:.3f} s"
    )
    print(report)
    # The 16 clients' models pushed RSS far outside the band a leak would have to hide in.
    assert peak[0] > idle * 1.25, report
    assert returned, report
    assert len(health.answers) > 50
    assert {status for status, _ in health.answers} == {200}
    assert slowest < 1.0
    assert server.alive()
    assert "Traceback" not in server.log() and "Exception in ASGI" not in server.log()


# The client that disappears: its own key, a heartbeat faster than the test server's
# timeout (see _Beat), two training runs, six forward_backward requests queued and a
# 64-token sample started; then it prints its ids and waits to be killed.
GHOST = """
import json, sys, threading, time
import httpx, tinker
from tinker import types

url, key, model = sys.argv[1:4]
client = tinker.ServiceClient(base_url=url, api_key=key)
session = client.holder.get_session_id()
http = httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": key})

def beat():
    while True:
        http.post("/session_heartbeat", json={"session_id": session})
        time.sleep(0.5)

threading.Thread(target=beat, daemon=True).start()
runs = [client.create_lora_training_client(base_model=model, rank=32).result() for _ in "ab"]
tokens = [(i * 13) % 3000 + 50 for i in range(129)]
datum = types.Datum(
    model_input=types.ModelInput.from_ints(tokens[:-1]),
    loss_fn_inputs={"target_tokens": tokens[1:]},
)
queued = [runs[0].forward_backward([datum, datum], "cross_entropy") for _ in range(6)]
queued[0].result()
sampler = client.create_sampling_client(base_model=model).result()
sampler.sample(types.ModelInput.from_ints(tokens[:8]), 1, types.SamplingParams(max_tokens=64))
time.sleep(0.5)
ids = {"models": [r.model_id for r in runs], "session": session,
       "sampler": sampler._sampling_session_id}
print(json.dumps(ids), flush=True)
time.sleep(600)
"""


class _Beat(threading.Thread):
    """Heartbeats for a ServiceClient's session every 0.5 s, from its creation on: the
    SDK's own come every 10 s, slower than the 4 s timeout of the server below."""

    def __init__(self, server: Server, key: str, client: tinker.ServiceClient) -> None:
        super().__init__(daemon=True)
        self.session = client.holder.get_session_id()
        self.http = _http(server, key)
        self.answers: list[int] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while True:
            body = {"session_id": self.session}
            self.answers.append(self.http.post("/session_heartbeat", json=body).status_code)
            if self.done.wait(0.5):
                return

    def stop(self) -> list[int]:
        self.done.set()
        self.join(timeout=30)
        return self.answers


def _first_line(process: subprocess.Popen, seconds: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    assert ready, "the ghost client never got going"
    line = process.stdout.readline().decode()
    assert line, f"the ghost client died early (exit status {process.wait()})"
    return line


@pytest.fixture(scope="module")
def short_timeout(tmp_path_factory, embedded_data_dir: Path):
    # Small training cycles: the dead client's queue is still there when it is killed.
    args = ["--session-timeout-seconds", "4", "--max-models-per-user", "2", "--cycle-tokens", "512"]
    server, keys = _server(
        tmp_path_factory, embedded_data_dir, "timeout", ["ghost", "steady"], args
    )
    yield server, keys
    server.stop()


def test_a_killed_client_is_cleaned_up_while_another_trains_on(short_timeout):
    server, keys = short_timeout
    steady = tinker.ServiceClient(base_url=server.url, api_key=keys["steady"])
    beat = _Beat(server, keys["steady"], steady)
    tc = steady.create_lora_training_client(base_model=MODEL, rank=8, seed=5).result(timeout=WAIT)
    stop = threading.Event()
    losses: list[float] = []
    done_at: list[float] = []
    errors: list[str] = []

    def keep_training() -> None:
        try:
            for step in range(200):
                if stop.is_set():
                    return
                losses.append(_train(tc, 100 + step, 1)[0])
                done_at.append(time.monotonic())
        except BaseException:
            errors.append(traceback.format_exc())

    trainer = threading.Thread(target=keep_training, daemon=True)
    trainer.start()
    ghost = subprocess.Popen(
        [sys.executable, "-c", GHOST, server.url, keys["ghost"], MODEL],
        stdout=subprocess.PIPE,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    try:
        ids = json.loads(_first_line(ghost, 2 * WAIT))
        ghost.send_signal(signal.SIGKILL)
        ghost.wait(timeout=30)
        killed = time.monotonic()
        http = _http(server, keys["ghost"])
        trained = http.get("/usage").json()["totals"].get("trained", 0)
        # Right after the kill its runs are still there (its last heartbeat was < 1 s ago)
        # and count against ghost's limit of two models.
        for model_id in ids["models"]:
            assert http.post("/get_info", json={"model_id": model_id}).status_code == 200
        probe = tinker.ServiceClient(base_url=server.url, api_key=keys["ghost"])
        probe_beat = _Beat(server, keys["ghost"], probe)
        with pytest.raises(tinker.RequestFailedError, match="the limit is 2 and you have 2"):
            probe.create_lora_training_client(base_model=MODEL, rank=8).result(timeout=WAIT)
        assert set(probe_beat.stop()) == {200}
        probe.close("success").result(timeout=WAIT)
        # After the 4 s timeout everything the dead client held is gone ...
        assert _until(lambda: _unloaded(server, keys["ghost"], ids["models"][0]), 30)
        gone = time.monotonic()
        assert _unloaded(server, keys["ghost"], ids["models"][1])
        assert http.get(f"/samplers/{ids['sampler']}").status_code == 404
        answer = http.post("/session_heartbeat", json={"session_id": ids["session"]})
        assert answer.status_code == 410
        # ... and no longer counts: a new client of ghost's may make a model again.
        again = tinker.ServiceClient(base_url=server.url, api_key=keys["ghost"])
        again_beat = _Beat(server, keys["ghost"], again)
        fresh = again.create_lora_training_client(base_model=MODEL, rank=8).result(timeout=WAIT)
        _train(fresh, 7, 1)
        assert set(again_beat.stop()) == {200}
        again.close("success").result(timeout=WAIT)
        # Steady trained all along: before the kill, and after the dead client's end ...
        assert _until(lambda: bool(errors) or sum(t > gone for t in done_at) >= 2, 2 * WAIT)
        stop.set()
        trainer.join(timeout=2 * WAIT)
        assert not errors and not trainer.is_alive(), errors
        assert any(t < killed for t in done_at)
        # ... and got exactly the numbers it gets alone: replayed on a new run, same seed.
        alone = steady.create_lora_training_client(base_model=MODEL, rank=8, seed=5)
        alone = alone.result(timeout=WAIT)
        replay = [_train(alone, 100 + step, 1)[0] for step in range(len(losses))]
        print(
            f"ghost killed with {trained} of 1536 tokens trained, gone {gone - killed:.1f} s"
            f" later; steady trained {len(losses)} steps meanwhile"
        )
        assert losses == pytest.approx(replay, rel=1e-4)
        assert set(beat.stop()) == {200}
        steady.close("success").result(timeout=WAIT)
    finally:
        stop.set()
        beat.stop()
        ghost.kill()
        ghost.wait(timeout=30)
        trainer.join(timeout=2 * WAIT)
    assert server.alive()
    assert "Traceback" not in server.log() and "Exception in ASGI" not in server.log()
