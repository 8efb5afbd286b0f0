"""Users sharing one base model: packed together with the same numbers as alone, a fair
share of each training cycle, and decoding that goes on during long cycles."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.conftest import QWEN
from tests.fixtures.server import Server
from tests.fixtures.tiny_models import make_tiny_model
from tests.sdk.test_keys import _new_key
from tests.sdk.test_ordering import Raw


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("fairness") / "treadle"
    data_dir.mkdir()
    keys = {user: _new_key(data_dir, user) for user in ("alice", "bob")}
    args = ["--max-tokens-per-pass", "16", "--cycle-tokens", "64", "--long-poll-seconds", "2"]
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, args)
    yield server, keys
    server.stop()


def _data(seed: int, count: int, length: int = 15) -> list[types.Datum]:
    data = []
    for d in range(count):
        tokens = [(seed * 31 + d * 7 + i * 13) % 250 + 1 for i in range(length + 1)]
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:]},
            )
        )
    return data


def _losses(tc: tinker.TrainingClient, seed: int, steps: int = 3) -> list[float]:
    out = []
    for step in range(steps):
        result = tc.forward_backward(_data(seed + step, 3), "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
        out.append(result.result().metrics["loss:sum"])
    return out


def test_two_users_training_at_once_get_what_they_get_alone(shared):
    server, keys = shared
    clients = {u: tinker.ServiceClient(base_url=server.url, api_key=k) for u, k in keys.items()}
    alone = {}
    for user, seed in (("alice", 1), ("bob", 2)):
        tc = clients[user].create_lora_training_client(base_model=QWEN, rank=4, seed=seed)
        alone[user] = _losses(tc.result(), seed)
    models = {
        user: clients[user].create_lora_training_client(base_model=QWEN, rank=4, seed=seed)
        for user, seed in (("alice", 1), ("bob", 2))
    }
    together: dict[str, list[float]] = {}
    threads = [
        threading.Thread(
            target=lambda u=user, s=seed: together.__setitem__(u, _losses(models[u].result(), s))
        )
        for user, seed in (("alice", 1), ("bob", 2))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for user in keys:
        assert together[user] == pytest.approx(alone[user], rel=1e-4, abs=1e-4)
    for client in clients.values():
        client.close("success")


class _Raw(Raw):
    def model(self) -> str:
        session = self.http.post("/create_session", json={}).json()["session_id"]
        body = {"session_id": session, "base_model": QWEN, "lora_config": {"rank": 4}}
        created = self.http.post("/create_model", json=body).json()
        self.result(created["request_id"])
        return str(created["model_id"])


def test_a_huge_queue_cannot_push_a_small_request_back(shared):
    """Alice queues twenty 60-token requests (one fills a 64-token cycle); bob's small one
    sent after them runs within a cycle or two, ahead of almost all of alice's. Alice's
    are sent last-first, so all twenty are released at once when the first arrives."""
    server, keys = shared
    alice, bob = _Raw(server, keys["alice"]), _Raw(server, keys["bob"])
    alice_model, bob_model = alice.model(), bob.model()
    tokens = list(range(1, 62))
    alice_ids = [alice.fwdbwd(alice_model, seq, tokens) for seq in range(20, 0, -1)]
    bob_id = bob.fwdbwd(bob_model, 1, list(range(1, 12)))
    bob_cycle = bob.result(bob_id)["metrics"]["clock_cycle:unique"]
    alice_cycles = [alice.result(i)["metrics"]["clock_cycle:unique"] for i in alice_ids]
    # Each of alice's requests had a cycle of its own: the budget held.
    assert len(set(alice_cycles)) == 20
    ahead = sum(cycle < bob_cycle for cycle in alice_cycles)
    assert ahead <= 2, (ahead, bob_cycle, alice_cycles)


def test_sampling_goes_on_between_the_passes_of_a_long_cycle(shared):
    """A forward_backward of 200 passes (16-token budget) and a 6-token sample sent just
    after it: the sample is decoded between the passes, so it is done first."""
    server, keys = shared
    raw = _Raw(server, keys["alice"])
    model_id = raw.model()
    client = tinker.ServiceClient(base_url=server.url, api_key=keys["alice"])
    sampler = client.create_sampling_client(base_model=QWEN).result()
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, params).result()  # warm
    done: list[str] = []
    big = _data(3, 200)
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=big, loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=1,
    )
    training_id = raw.fwdbwd_body(forward_backward_request_to_proto(request).SerializeToString())
    sample = sampler.sample(types.ModelInput.from_ints([4, 5, 6]), 1, params)

    def wait_training() -> None:
        raw.result(training_id)
        done.append("training")

    thread = threading.Thread(target=wait_training)
    thread.start()
    assert len(sample.result().sequences[0].tokens) == 6
    done.append("sample")
    thread.join()
    assert done == ["sample", "training"]
    client.close("success")


def test_usage_is_metered_per_user_and_kind(shared):
    """Tokens trained, read (prefill) and sampled, counted for the user who spent them:
    through GET /usage for that user, and `treadle usage` from the data dir."""
    server, keys = shared
    carol_key = _new_key(server.data_dir, "carol")
    carol = tinker.ServiceClient(base_url=server.url, api_key=carol_key)
    http = Raw(server, carol_key).http
    for _ in range(20):  # the server re-reads keys within a second
        if http.get("/usage").status_code == 200:
            break
        time.sleep(0.2)
    tc = carol.create_lora_training_client(base_model=QWEN, rank=4).result()
    data = _data(5, 3, length=10)
    tc.forward_backward(data, "cross_entropy").result()
    tc.forward(data[:1], "cross_entropy").result()
    sampler = carol.create_sampling_client(base_model=QWEN).result()
    params = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
    out = sampler.sample(types.ModelInput.from_ints([1, 2, 3, 4]), 2, params).result()
    sampled = sum(len(s.tokens) for s in out.sequences)
    usage = http.get("/usage").json()
    assert usage["user"] == "carol"
    assert usage["totals"] == {"trained": 30, "forward": 10, "prefill": 4, "sampled": sampled}
    assert {row["base_model"] for row in usage["hours"]} == {QWEN}
    # Another user's usage is not carol's.
    assert Raw(server, keys["bob"]).http.get("/usage").json()["user"] == "bob"
    carol.close("success")
    done = subprocess.run(
        [sys.executable, "-m", "treadle", "usage", "--user", "carol"]
        + ["--data-dir", str(server.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"carol\t{QWEN}\ttrained\t30" in done.stdout
    assert f"carol\t{QWEN}\tsampled\t{sampled}" in done.stdout


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A deeper tiny model, one pass per request (8192-token budget), sampling first."""
    root = tmp_path_factory.mktemp("deep")
    folder = make_tiny_model(root / "model", hidden_size=256, num_layers=8, seed=3)
    data_dir = root / "treadle"
    data_dir.mkdir()
    args = ["--max-tokens-per-pass", "8192", "--decode-share", "1", "--long-poll-seconds", "2"]
    server = Server({QWEN: folder}, data_dir, args)
    yield server
    server.stop()


def test_sampling_goes_on_between_the_layers_of_one_pass(deep):
    """One forward_backward of 4,000 tokens is one pass; a greedy sample sent while it
    runs is decoded between its layers (forward and backward), so it is done first, with
    the tokens it gets alone; the training numbers are those of the same step with
    nothing else running."""
    client = tinker.ServiceClient(base_url=deep.url, api_key="tml-local")
    sampler = client.create_sampling_client(base_model=QWEN).result()
    params = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
    prompt = types.ModelInput.from_ints([4, 5, 6])
    alone = sampler.sample(prompt, 1, params).result().sequences[0].tokens
    data = _data(3, 8, length=500)
    adam = types.AdamParams(learning_rate=0.05)
    models = [
        client.create_lora_training_client(base_model=QWEN, rank=4, seed=7).result()
        for _ in range(2)
    ]
    quiet_loss = models[0].forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    models[0].optim_step(adam).result()
    quiet_next = models[0].forward(data, "cross_entropy").result().metrics["loss:sum"]

    done: list[str] = []
    training = models[1].forward_backward(data, "cross_entropy")
    time.sleep(0.3)  # let the pass begin (it takes seconds)
    sample = sampler.sample(prompt, 1, params)
    waiter = threading.Thread(target=lambda: (training.result(), done.append("training")))
    waiter.start()
    tokens = sample.result().sequences[0].tokens
    done.append("sample")
    waiter.join()
    assert done == ["sample", "training"]
    assert tokens == alone
    assert training.result().metrics["loss:sum"] == pytest.approx(quiet_loss, rel=1e-5)
    models[1].optim_step(adam).result()
    busy_next = models[1].forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert busy_next == pytest.approx(quiet_next, rel=1e-5)
    assert busy_next != pytest.approx(quiet_loss, rel=1e-3)  # the step changed the model
    client.close("success")
