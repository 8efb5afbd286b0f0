"""``cancel_future`` and ``retrieve_futures``, the futures calls the SDK makes only when
the server turns them on (``--sample-cancel``, ``--sample-retrieve-futures``): a sample
still queued is cancelled and never runs; a sampling session's completions come through
one long-poll with cursor semantics, and the SDK's samples come out the same through it."""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.conftest import QWEN
from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key

PROMPT = [72, 101, 108, 108, 111, 44, 32]
# Long enough that a few of them keep a one-sequence sampler busy while a test looks on.
BLOCKER = {"max_tokens": 400, "stop": [], "temperature": 1.0}


@pytest.fixture(scope="module")
def flagged(tmp_path_factory, tiny_models):
    """A server with both features on and a sampler that decodes one sequence at a time
    (so samples queue behind each other), with keys of alice and bob."""
    data_dir = tmp_path_factory.mktemp("futures-api") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    args = ["--long-poll-seconds", "2", "--sample-cancel", "--sample-retrieve-futures"]
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, [*args, "--sampler-max-batch", "1"])
    yield server, alice, bob
    server.stop()


def _http(server: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": key}, timeout=60)


def _sampling_session(http: httpx.Client) -> str:
    session = http.post("/create_session", json={"tags": [], "user_metadata": {}}).json()
    body = {"session_id": session["session_id"], "sampling_session_seq_id": 0, "base_model": QWEN}
    return http.post("/create_sampling_session", json=body).json()["sampling_session_id"]


def _asample(http: httpx.Client, sampler: str, seq_id: int, params: dict) -> str:
    body = {
        "sampling_session_id": sampler,
        "seq_id": seq_id,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": params,
    }
    response = http.post("/asample", json=body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def _answer(http: httpx.Client, request_id: str) -> httpx.Response:
    """retrieve_future polled past try_again (results come as JSON without an Accept)."""
    while True:
        response = http.post("/retrieve_future", json={"request_id": request_id})
        if response.status_code != 200 or response.json().get("type") != "try_again":
            return response


def _poll(http: httpx.Client, sampler: str, cursor: int, **extra) -> dict:
    body = {"target": {"type": "sampling_session", "sampling_session_id": sampler}}
    body["target"].update(extra.pop("target", {}))
    response = http.post("/retrieve_futures", json={**body, "prev_cursor": cursor, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_cancel_future_cancels_a_queued_sample_only(flagged):
    server, alice_key, bob_key = flagged
    alice, bob = _http(server, alice_key), _http(server, bob_key)
    sampler = _sampling_session(alice)
    blockers = [_asample(alice, sampler, i, {**BLOCKER, "seed": i}) for i in range(4)]
    queued = _asample(alice, sampler, 4, {"max_tokens": 3, "seed": 9})

    # Behind four 400-token samples on a one-sequence sampler: not started.
    answer = alice.post("/cancel_future", json={"request_id": queued})
    assert answer.status_code == 200
    assert answer.json()["cancelled"] is True and "before it started" in answer.json()["detail"]
    failed = _answer(alice, queued).json()
    assert failed["category"] == "user" and "cancelled" in failed["error"]
    again = alice.post("/cancel_future", json={"request_id": queued}).json()
    assert again["cancelled"] is False and "already finished" in again["detail"]

    # The first blocker decodes by now (or has finished): it runs to its end.
    running = alice.post("/cancel_future", json={"request_id": blockers[0]}).json()
    assert running["cancelled"] is False
    assert "already started" in running["detail"] or "already finished" in running["detail"]

    # Unknown ids, and alice's ids for bob, are not found, with a message.
    for http, request_id in [(alice, "req-nothing"), (bob, blockers[-1])]:
        missing = http.post("/cancel_future", json={"request_id": request_id})
        assert missing.status_code == 404 and "unknown request_id" in missing.json()["detail"]
    assert alice.post("/cancel_future", json={}).status_code == 422

    for request_id in blockers:  # the others were untouched and sample to the end
        assert len(_answer(alice, request_id).json()["sequences"][0]["tokens"]) == 400
    # The cancelled sample completed as failed on its session's completions.
    completions: dict[str, str] = {}
    cursor = 0
    while len(completions) < 5:
        polled = _poll(alice, sampler, cursor)
        completions |= {c["request_id"]: c["state"] for c in polled["completions"]}
        cursor = polled["cursor"]
    assert completions == {queued: "failed"} | {r: "finished" for r in blockers}


def test_retrieve_futures_cursor_acknowledgement_and_clones(flagged):
    server, alice_key, bob_key = flagged
    alice, bob = _http(server, alice_key), _http(server, bob_key)
    sampler = _sampling_session(alice)
    params = {"max_tokens": 4, "seed": 1}
    first = [_asample(alice, sampler, i, params) for i in range(2)]
    clone = _asample(alice, sampler, 3 * 1_000_000_000, params)  # clone 3's block

    seen: dict[str, int] = {}
    cursor = 0
    while len(seen) < 2:  # long-polls (timeout null) until both have completed
        polled = _poll(alice, sampler, cursor)
        assert all(c["state"] == "finished" for c in polled["completions"])
        for completion in polled["completions"]:
            seen[completion["request_id"]] = polled["cursor"]
        assert polled["cursor"] >= cursor
        cursor = polled["cursor"]
    assert set(seen) == set(first)  # clone 3's sample is not on the original's channel
    of_clone = _poll(alice, sampler, 0, target={"cloned_sampler_id": 3})["completions"]
    assert [c["request_id"] for c in of_clone] == [clone]

    # Polling with the cursor acknowledges: nothing new, and the acknowledged are gone.
    assert _poll(alice, sampler, cursor, timeout=0) == {"completions": [], "cursor": cursor}
    assert _poll(alice, sampler, 0, timeout=0)["completions"] == []

    # Retrieved results may be dropped: a later retrieve_future no longer finds them.
    assert _answer(alice, first[0]).status_code == 200
    _poll(alice, sampler, cursor, timeout=0, retrieved_request_ids=[first[0]])
    gone = alice.post("/retrieve_future", json={"request_id": first[0]})
    assert gone.status_code == 404
    assert _answer(alice, first[1]).status_code == 200  # not reported retrieved: kept

    # Another user's sampling session does not exist; a bad cursor is a 422 with a body.
    missing = bob.post(
        "/retrieve_futures",
        json={"target": {"type": "sampling_session", "sampling_session_id": sampler}},
    )
    assert missing.status_code == 404 and "unknown sampling session" in missing.json()["detail"]
    bad = alice.post(
        "/retrieve_futures",
        json={"target": {"sampling_session_id": sampler}, "prev_cursor": -1},
    )
    assert bad.status_code == 422 and bad.json()["detail"]


def _samples(url: str, key: str) -> tuple[bool, list[list[int]], list[list[float]]]:
    """Seeded samples through the SDK: whether it used retrieve_futures, and the tokens
    and logprobs of each sequence."""
    client = tinker.ServiceClient(base_url=url, api_key=key)
    try:
        via_futures = client.holder.get_client_config().sample_use_retrieve_futures
        sampler = client.create_sampling_client(base_model=QWEN).result()
        futures = [
            sampler.sample(
                types.ModelInput.from_ints(PROMPT[: 3 + i]),
                2,
                types.SamplingParams(max_tokens=6, seed=10 + i, temperature=1.0, stop=[]),
            )
            for i in range(4)
        ]
        results = [future.result() for future in futures]
    finally:
        client.close("success")
    sequences = [s for result in results for s in result.sequences]
    return via_futures, [s.tokens for s in sequences], [s.logprobs for s in sequences]


def test_the_sdk_samples_the_same_with_retrieve_futures_on(flagged, server):
    flagged_server, alice_key, _ = flagged
    on, tokens_on, logprobs_on = _samples(flagged_server.url, alice_key)
    off, tokens_off, logprobs_off = _samples(server.url, "tml-test")
    assert on and not off
    assert tokens_on == tokens_off and len(tokens_on) == 8
    np.testing.assert_allclose(np.array(logprobs_on), np.array(logprobs_off), atol=1e-5)


def _trace(url: str, key: str, session_id: str) -> list[dict]:
    rest = tinker.RestClient(base_url=url, api_key=key)
    link = rest.export_session_trace(session_id).result()
    return [e for e in httpx.get(link).json()["traceEvents"] if e["ph"] == "X"]


def test_the_sdk_cancels_an_abandoned_queued_sample(flagged):
    server, alice_key, _ = flagged
    client = tinker.ServiceClient(base_url=server.url, api_key=alice_key)
    sampler = client.create_sampling_client(base_model=QWEN).result()
    handle = json.loads(base64.urlsafe_b64decode(sampler.get_sampler_handle()))
    session_id = handle["session_id"]
    prompt = types.ModelInput.from_ints(PROMPT)
    blockers = [
        sampler.sample(prompt, 1, types.SamplingParams(**BLOCKER, seed=i)) for i in range(6)
    ]
    abandoned = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=3, seed=7))

    def waiting_two_sequence_sample() -> str | None:
        for event in _trace(server.url, alice_key, session_id):
            args = event["args"]
            if args.get("waiting") and args.get("sequences") == 2:
                return str(args["request_id"])
        return None

    deadline = time.monotonic() + 120
    while (request_id := waiting_two_sequence_sample()) is None:
        assert time.monotonic() < deadline, "the sample never showed up queued"
    abandoned.future().cancel()

    def cancelled() -> bool:
        for event in _trace(server.url, alice_key, session_id):
            if event["args"]["request_id"] == request_id and event["args"].get("cancelled"):
                return True
        return False

    while not cancelled():  # the SDK sends cancel_future from its background task
        assert time.monotonic() < deadline, "the SDK never cancelled the abandoned sample"
    assert all(len(f.result().sequences[0].tokens) == 400 for f in blockers)
    spans = [e for e in _trace(server.url, alice_key, session_id) if e["name"] == "sample"]
    assert len(spans) == 6 and request_id not in {e["args"]["request_id"] for e in spans}
    client.close("success")
