"""``SamplingClient.get_sampler_handle`` / ``from_sampler_handle``: another process samples
through a handle the first one made, with a clone id from ``join_sampling_session``; for
another user the sampler does not exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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

# Run in a fresh interpreter: the handle, key and server come in the environment.
_CHILD = """
import json, os
import tinker
from tinker import types

sampler = tinker.SamplingClient.from_sampler_handle(os.environ["HANDLE"])
try:
    result = sampler.sample(
        types.ModelInput.from_ints(json.loads(os.environ["PROMPT"])),
        2,
        types.SamplingParams(max_tokens=8, seed=3, temperature=1.0, stop=[]),
    ).result()
except tinker.NotFoundError as exc:
    answer = {"not_found": str(exc)}
else:
    answer = {
        "tokens": [s.tokens for s in result.sequences],
        "sequence_ids": [s.sequence_id for s in result.sequences],
    }
print(json.dumps(answer), flush=True)
# Interpreter shutdown with the SDK's rebuilt (shadow) client still running its background
# thread was seen to abort (SIGABRT) after the answer was printed: leave at once.
os._exit(0)
"""


@pytest.fixture(scope="module")
def two_users(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("sampler-handle") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, ["--long-poll-seconds", "2"])
    yield server, alice, bob
    server.stop()


def _sample_in_child(server: Server, key: str, handle: str) -> dict:
    env = dict(
        os.environ,
        HANDLE=handle,
        PROMPT=json.dumps(PROMPT),
        TINKER_BASE_URL=server.url,
        TINKER_API_KEY=key,
        TINKER_TELEMETRY="0",
    )
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_another_process_samples_through_a_sampler_handle(two_users):
    server, alice_key, bob_key = two_users
    client = tinker.ServiceClient(base_url=server.url, api_key=alice_key)
    training = client.create_lora_training_client(base_model=QWEN, rank=4, seed=5).result()
    training.forward_backward([DATUM], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=0.1)).result()
    sampler = training.save_weights_and_get_sampling_client().result()
    handle = sampler.get_sampler_handle()
    assert alice_key not in handle  # the handle carries no credentials

    params = types.SamplingParams(max_tokens=8, seed=3, temperature=1.0, stop=[])
    here = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, params).result()
    base = client.create_sampling_client(base_model=QWEN).result()
    untrained = base.sample(types.ModelInput.from_ints(PROMPT), 2, params).result()

    first = _sample_in_child(server, alice_key, handle)
    second = _sample_in_child(server, alice_key, handle)
    # The same trained adapter and seed: the same tokens as in this process (and not the
    # base model's, so the child really sampled this sampler).
    assert first["tokens"] == second["tokens"] == [s.tokens for s in here.sequences]
    assert first["tokens"] != [s.tokens for s in untrained.sequences]
    # Each rebuilt client joined the sampling session and got its own clone id, so its
    # seq_ids start at clone x 10**9: no collision with this process's or each other's.
    sampler_id = here.sequences[0].sequence_id.split(":seq:")[0]
    assert [s.sequence_id for s in here.sequences] == [f"{sampler_id}:seq:0:{i}" for i in (0, 1)]
    assert first["sequence_ids"] == [f"{sampler_id}:seq:1000000000:{i}" for i in (0, 1)]
    assert second["sequence_ids"] == [f"{sampler_id}:seq:2000000000:{i}" for i in (0, 1)]

    # For bob, alice's sampler does not exist: the join is not found, and so is a sample.
    refused = _sample_in_child(server, bob_key, handle)
    assert "unknown sampling session" in refused["not_found"]
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": bob_key})
    join = http.post("/join_sampling_session", json={"sampling_session_id": sampler_id})
    assert join.status_code == 404 and "unknown sampling session" in join.json()["detail"]
    client.close("success")
