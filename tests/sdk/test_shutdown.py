"""SIGTERM: no new work, what runs finishes (or fails past the deadline), every pending
request is answered, the data dir is flushed, and the process exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.conftest import API_KEY, QWEN
from tests.fixtures.server import Server
from tests.fixtures.tiny_models import make_tiny_model
from tests.sdk.test_fairness import _data, _Raw


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """Deep enough that one 4,000-token forward_backward takes seconds."""
    root = tmp_path_factory.mktemp("deep-model")
    return make_tiny_model(root / "model", hidden_size=256, num_layers=8, seed=5)


def _start(tmp_path: Path, model: Path, seconds: float) -> Server:
    data_dir = tmp_path / "treadle"
    data_dir.mkdir()
    args = ["--max-tokens-per-pass", "8192", "--long-poll-seconds", "2"]
    return Server({QWEN: model}, data_dir, [*args, "--shutdown-seconds", str(seconds)])


def _long_request(raw: _Raw, model_id: str) -> str:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=_data(4, 8, length=500), loss_fn="cross_entropy"
        ),
        model_id=model_id,
        seq_id=1,
    )
    return raw.fwdbwd_body(forward_backward_request_to_proto(request).SerializeToString())


def test_sigterm_finishes_what_runs_answers_everything_and_exits_0(tmp_path, deep_model):
    server = _start(tmp_path, deep_model, seconds=120)
    raw = _Raw(server, API_KEY)
    model_id = raw.model()
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    sampler = client.create_sampling_client(base_model=QWEN).result()
    training_id = _long_request(raw, model_id)
    params = types.SamplingParams(max_tokens=40, temperature=0.0, stop=[])
    sample = sampler.sample(types.ModelInput.from_ints([3, 4, 5]), 1, params)
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = raw.http.post("/create_session", json={})
    assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]

    answers: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: answers.update(sample=sample.result()))
    waiter.start()
    training = raw.result(training_id)
    waiter.join(timeout=60)
    assert training["metrics"]["loss:sum"] > 0, training
    assert len(answers["sample"].sequences[0].tokens) == 40
    assert server.process.wait(timeout=60) == 0
    # The usage counts were written before exit: the 4,000 trained tokens are there.
    done = subprocess.run(
        [sys.executable, "-m", "treadle", "usage", "--data-dir", str(server.data_dir)],
        capture_output=True,
        text=True,
    )
    trained = [line for line in done.stdout.splitlines() if "\ttrained\t" in line]
    assert trained and int(trained[0].split("\t")[-1]) == 8 * 500, done.stdout


def test_work_still_running_at_the_deadline_fails_as_a_server_error(tmp_path, deep_model):
    server = _start(tmp_path, deep_model, seconds=0.3)
    raw = _Raw(server, API_KEY)
    model_id = raw.model()
    training_id = _long_request(raw, model_id)
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    answer = raw.result(training_id)
    assert answer["category"] == "server" and "shut down" in answer["error"], answer
    assert server.process.wait(timeout=60) == 0
