"""``GET /metrics`` after real SDK traffic of two users, and the JSON request log.

Counters are compared as deltas of two scrapes around traffic whose sizes the test
knows independently: the datums' tokens it built, the tokens the samples returned, the
raw HTTP requests it sent itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import tinker
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

from tests.conftest import QWEN
from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key

PROMPT = [72, 101, 108, 108, 111, 44, 32]
SHORT = [3, 1, 4, 1, 5]
MAX_TOKENS = 6
BODY_CAP = 1 << 20

# Every label a treadle series may carry (``le``: a histogram bucket's bound).
ALLOWED_LABELS = {"model", "kind", "outcome", "route", "method", "status", "le"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": [*tokens[1:], 1]},
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[Server, str, str]]:
    from tests.fixtures.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("metrics")
    data_dir = root / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    args = ["--long-poll-seconds", "2", "--max-body-bytes", str(BODY_CAP)]
    args += ["--log-format", "json", "--log-level", "info"]
    model = make_tiny_model(root / "qwen3", "qwen3", seed=0)
    server = Server({QWEN: model}, data_dir, args)
    yield server, alice, bob
    server.stop()


def _scrape(server: Server) -> Samples:
    response = httpx.get(f"{server.url}/metrics")  # no key: Prometheus sends none
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def test_metrics_count_two_users_traffic_and_log_each_request(served):
    server, alice_key, bob_key = served
    before = _scrape(server)

    alice = tinker.ServiceClient(base_url=server.url, api_key=alice_key)
    training = alice.create_lora_training_client(base_model=QWEN, rank=4, seed=3).result()
    training.forward_backward([_datum(PROMPT), _datum(SHORT)], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=0.01)).result()
    with pytest.raises(Exception, match="vocab"):  # a token past the vocabulary: user error
        training.forward_backward([_datum([10**7, 1, 2])], "cross_entropy").result()
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    alice_sample = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, params).result()
    bob = tinker.ServiceClient(base_url=server.url, api_key=bob_key)
    bob_sampler = bob.create_sampling_client(base_model=QWEN).result()
    bob_sample = bob_sampler.sample(types.ModelInput.from_ints(SHORT), 1, params).result()
    alice_sampled = sum(len(s.tokens) for s in alice_sample.sequences)
    bob_sampled = sum(len(s.tokens) for s in bob_sample.sequences)

    # Raw HTTP an attacker or a typo sends: each must land in one bounded series.
    raw = httpx.Client(base_url=server.url, headers={"X-API-Key": alice_key})
    assert raw.get("/api/v1/training_runs/sess-made-up:train:0").status_code == 404
    assert httpx.post(f"{server.url}/api/v1/create_session", json={}).status_code == 401
    assert raw.get("/no/such/path/12345").status_code == 404
    assert raw.request("FROBNICATE", "/api/v1/healthz").status_code == 405
    too_big = raw.post("/api/v1/forward_backward", content=b"x" * (2 * BODY_CAP))
    assert too_big.status_code == 413
    # A base model name the user made up fails the create; it must not become a label.
    session_id = training.model_id.split(":train:")[0]
    body = {"session_id": session_id, "model_seq_id": 99, "base_model": "made-up-model"}
    made_up = raw.post("/api/v1/create_model", json=body)
    assert made_up.status_code == 200
    answer = raw.post("/api/v1/retrieve_future", json={"request_id": made_up.json()["request_id"]})
    assert "made-up-model" in answer.json()["error"]

    live = _scrape(server)
    alice.close("success")
    bob.close("success")
    after = _scrape(server)

    # Tokens: the datums' tokens as built, the tokens the samples returned.
    trained = _delta(
        before, live, "treadle_training_tokens_total", model=QWEN, kind="forward_backward"
    )
    assert trained == len(PROMPT) + len(SHORT)
    assert _delta(before, live, "treadle_sampled_tokens_total", model=QWEN) == (
        alice_sampled + bob_sampled
    )
    assert _delta(before, live, "treadle_prompt_tokens_total", model=QWEN) == len(PROMPT) + len(
        SHORT
    )

    # Finished requests by kind and outcome.
    def finished(kind: str, outcome: str = "ok") -> float:
        return _delta(
            before, live, "treadle_requests_total", model=QWEN, kind=kind, outcome=outcome
        )

    assert finished("create_model") == 1
    assert finished("forward_backward") == 1
    assert finished("forward_backward", "user_error") == 1
    assert finished("optim_step") == 1
    assert finished("save_weights_for_sampler") == 1
    assert finished("sample") == 2
    made_up_labels = {"model": "", "kind": "create_model", "outcome": "user_error"}
    assert _delta(before, live, "treadle_requests_total", **made_up_labels) == 1

    # Histograms: one observation per sample, one cycle for the one forward_backward
    # that ran (the refused one never reached a pass), a decode step per token at most.
    def count(name: str, **labels: str) -> float:
        return _delta(before, live, f"{name}_count", model=QWEN, **labels)

    assert count("treadle_e2e_sample_latency_seconds") == 2
    assert count("treadle_time_to_first_token_seconds") == 2
    assert count("treadle_cycle_seconds") == 1
    assert 1 <= count("treadle_decode_step_seconds") <= 2 * MAX_TOKENS
    assert count("treadle_request_queue_seconds", kind="optim_step") == 1
    assert count("treadle_request_run_seconds", kind="forward_backward") == 2
    e2e = _delta(before, live, "treadle_e2e_sample_latency_seconds_sum", model=QWEN)
    ttft = _delta(before, live, "treadle_time_to_first_token_seconds_sum", model=QWEN)
    assert 0 < ttft <= e2e

    # HTTP by route template (never the raw path), method and status.
    def http(route: str, method: str, status: str) -> float:
        return _delta(
            before, live, "treadle_http_requests_total", route=route, method=method, status=status
        )

    assert http("/api/v1/forward_backward", "POST", "200") == 2
    assert http("/api/v1/forward_backward", "POST", "413") == 1
    assert http("/api/v1/optim_step", "POST", "200") == 1
    assert http("/api/v1/training_runs/{run_id}", "GET", "404") == 1
    assert http("/api/v1/create_session", "POST", "401") == 1
    assert http("unmatched", "GET", "404") == 1
    assert http("/api/v1/healthz", "other", "405") == 1
    assert http("/metrics", "GET", "200") >= 1

    # Live gauges: what the two users held while their sessions lived, then nothing.
    assert _value(live, "treadle_sessions") == 2
    assert _value(live, "treadle_training_models", model=QWEN) == 1
    assert _value(live, "treadle_samplers", model=QWEN) == 2
    for state in (live, after):
        assert _value(state, "treadle_queue_requests", model=QWEN, kind="training") == 0
        assert _value(state, "treadle_queue_requests", model=QWEN, kind="sample") == 0
        assert _value(state, "treadle_queue_tokens", model=QWEN) == 0
        assert _value(state, "treadle_decoding_sequences", model=QWEN) == 0
    assert _value(after, "treadle_sessions") == 0
    assert _value(after, "treadle_training_models", model=QWEN) == 0
    assert _value(after, "treadle_samplers", model=QWEN) == 0
    assert _value(after, "process_resident_memory_bytes") > 10 << 20

    # Bounded labels: no user, key, id or raw path in any series.
    secrets = ("alice", "bob", alice_key, bob_key, "req-", "sess-", "12345", "made-up")
    for name, labels in after:
        if name.startswith("treadle_"):
            assert {key for key, _ in labels} <= ALLOWED_LABELS, name
        for _, value in labels:
            assert not any(secret in value for secret in secrets), (name, value)

    # The request log: one JSON object per line, one line per finished request.
    lines = [line for line in server.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    requests = [r for r in records if r["logger"] == "treadle.requests"]
    ids = [r["request_id"] for r in requests]
    assert len(ids) == len(set(ids))
    mine = [r for r in requests if r["model_id"] == training.model_id]
    assert [(r["kind"], r["outcome"]) for r in mine] == [
        ("create_model", "ok"),
        ("forward_backward", "ok"),
        ("optim_step", "ok"),
        ("forward_backward", "user_error"),
        ("save_weights_for_sampler", "ok"),
    ]
    for record in mine:
        assert record["user"] == "alice" and record["base_model"] == QWEN
        assert record["queue_seconds"] >= 0 and record["run_seconds"] >= 0
        assert record["level"] == "INFO" and record["request_id"].startswith("req-")
    assert mine[1]["tokens"] == len(PROMPT) + len(SHORT)
    assert mine[3]["tokens"] == 3
    samples = {r["user"]: r for r in requests if r["kind"] == "sample"}
    assert set(samples) == {"alice", "bob"}
    assert (samples["alice"]["tokens"], samples["alice"]["sampled_tokens"]) == (
        len(PROMPT),
        alice_sampled,
    )
    assert (samples["bob"]["tokens"], samples["bob"]["sampled_tokens"]) == (
        len(SHORT),
        bob_sampled,
    )
    assert all(r["outcome"] == "ok" and r["base_model"] == QWEN for r in samples.values())
    # (bob's base-model sampler has no training model; alice's is her ephemeral one)
    assert samples["alice"]["model_id"].startswith(training.model_id.split(":train:")[0])
