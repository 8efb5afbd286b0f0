"""``export_session_trace`` (and ``tinker session export-trace``): a session's requests as
a Chrome JSON trace that Perfetto opens, with each request's queue wait and what it ran as
(packed forward/backward pass, optimizer step, save, sample); only for the session's
owner."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import QWEN
from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key

PROMPT = [72, 101, 108, 108, 111, 44, 32]
DATUM = types.Datum(
    model_input=types.ModelInput.from_ints(PROMPT),
    loss_fn_inputs={"target_tokens": PROMPT[1:] + [1]},
)
STEPS = 3


@pytest.fixture(scope="module")
def two_users(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("trace") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, ["--long-poll-seconds", "2"])
    yield server, alice, bob
    server.stop()


def _export_with_cli(server: Server, key: str, session_id: str, output: Path) -> dict:
    """``tinker session export-trace`` as a user runs it: it downloads the file itself."""
    env = dict(os.environ, TINKER_BASE_URL=server.url, TINKER_API_KEY=key)
    done = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "session", "export-trace", session_id],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=output.parent,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(output.read_text()))


def test_a_training_loop_and_a_sample_export_as_a_trace(two_users, tmp_path: Path):
    server, alice_key, bob_key = two_users
    client = tinker.ServiceClient(base_url=server.url, api_key=alice_key)
    training = client.create_lora_training_client(base_model=QWEN, rank=4, seed=3).result()
    for _ in range(STEPS):
        training.forward_backward([DATUM], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=0.01)).result()
    training.save_state("traced").result()
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=5)
    samples = [sampler.sample(types.ModelInput.from_ints(PROMPT), 2, params) for _ in range(2)]
    assert all(len(sample.result().sequences) == 2 for sample in samples)
    session_id = training.model_id.split(":train:")[0]

    link = tinker.RestClient(base_url=server.url, api_key=alice_key).export_session_trace(
        session_id
    )
    downloaded = httpx.get(link.result())  # no API key: the link is the grant
    assert downloaded.status_code == 200
    trace = _export_with_cli(server, alice_key, session_id, tmp_path / f"{session_id}.pftrace")
    assert downloaded.json()["traceEvents"] == trace["traceEvents"]

    lanes = {
        e["tid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "thread_name"
    }
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    by_request: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        by_request[span["args"]["request_id"]].append(span)
    # One queue wait and one span of work per request, the wait ending where the work
    # starts, on the lane of the request's model or sampling session.
    for request_spans in by_request.values():
        assert [s["name"] == "queue_wait" for s in request_spans] == [True, False]
        wait, work = request_spans
        assert wait["ts"] + wait["dur"] == work["ts"] and work["dur"] >= 0 and wait["dur"] >= 0
        assert wait["tid"] == work["tid"]
    work = sorted((s for s in spans if s["name"] != "queue_wait"), key=lambda s: s["ts"])
    model_lane = [s for s in work if lanes[s["tid"]] == training.model_id]
    assert [s["name"] for s in model_lane] == [
        "create_model",
        *["forward_backward", "optim_step"] * STEPS,
        "save_weights",
        "save_weights_for_sampler",
    ]
    for earlier, later in itertools.pairwise(model_lane):  # in seq_id order, one at a time
        assert earlier["ts"] + earlier["dur"] <= later["ts"]
    passes = [s for s in work if s["name"] == "forward_backward"]
    assert all(s["args"]["tokens"] == len(PROMPT) for s in passes)
    samples = [s for s in work if s["name"] == "sample"]
    assert len(samples) == 2 and all(s["args"]["sequences"] == 2 for s in samples)
    assert {lanes[s["tid"]] for s in samples} == {f"{session_id}:sample:0"}

    # Bob cannot export alice's session; a made-up link finds nothing.
    bob = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": bob_key})
    refused = bob.get(f"/sessions/{session_id}/trace_export")
    assert refused.status_code == 404 and "unknown session" in refused.json()["detail"]
    made_up = httpx.get(f"{server.url}/api/v1/trace_downloads/not-a-token")
    assert made_up.status_code == 404 and "export it again" in made_up.json()["detail"]
    client.close("success")
