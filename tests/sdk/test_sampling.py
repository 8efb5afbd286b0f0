"""SamplingClient through the official SDK: parameters, stops, seeds, logprobs that agree
with the trainer, samplers from memory and from checkpoints, and bad input."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.conftest import API_KEY, LLAMA, QWEN
from tests.fixtures.reference import greedy_tokens
from tests.fixtures.server import Server

PROMPT = [72, 101, 108, 108, 111, 44, 32]
EOS = 258  # <|im_end|> of the tiny models' tokenizer


def _prompt(tokens: list[int] = PROMPT) -> types.ModelInput:
    return types.ModelInput.from_ints(tokens)


@pytest.fixture()
def trained(service_client) -> tinker.TrainingClient:
    """A model one optimizer step away from the base, so adapters matter."""
    tc = service_client.create_lora_training_client(base_model=QWEN, rank=8, seed=1).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT + [1, 2, 3]),
        loss_fn_inputs={"target_tokens": PROMPT[1:] + [1, 2, 3, 4], "weights": [1.0] * 10},
    )
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    return tc


def _forward_logprobs(tc: tinker.TrainingClient, tokens: list[int]) -> np.ndarray:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )
    return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def test_sampled_logprobs_agree_with_the_trainer(trained: tinker.TrainingClient):
    sampler = trained.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop=[])
    result = sampler.sample(_prompt(), 3, params).result()
    assert len(result.sequences) == 3
    for seq in result.sequences:
        assert len(seq.tokens) == 12 and seq.stop_reason == "length"
        trainer = _forward_logprobs(trained, PROMPT + seq.tokens)[len(PROMPT) - 1 :]
        np.testing.assert_allclose(seq.logprobs, trainer, atol=1e-4)
    # prompt logprobs agree too (compute_logprobs)
    full = PROMPT + result.sequences[0].tokens
    computed = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    assert computed[0] is None
    np.testing.assert_allclose(computed[1:], _forward_logprobs(trained, full), atol=1e-4)


def test_greedy_and_seeds(service_client, tiny_models):
    sampler = service_client.create_sampling_client(base_model=QWEN).result()
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    tokens = sampler.sample(_prompt(), 1, greedy).result().sequences[0].tokens
    # Greedy = argmax of the base model at every step (plain transformers on the weights).
    expected = greedy_tokens(tiny_models[QWEN], PROMPT, 6)
    assert tokens == expected
    seeded = types.SamplingParams(max_tokens=10, temperature=1.0, seed=123, stop=[])
    a = sampler.sample(_prompt(), 2, seeded).result().sequences
    b = sampler.sample(_prompt(), 2, seeded).result().sequences
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert a[0].tokens != a[1].tokens  # samples of one request differ
    other = types.SamplingParams(max_tokens=10, temperature=1.0, seed=124, stop=[])
    assert sampler.sample(_prompt(), 2, other).result().sequences[0].tokens != a[0].tokens
    top1 = types.SamplingParams(max_tokens=6, temperature=1.0, top_k=1, stop=[], seed=9)
    assert sampler.sample(_prompt(), 1, top1).result().sequences[0].tokens == expected
    tiny_p = types.SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-6, stop=[], seed=9)
    assert sampler.sample(_prompt(), 1, tiny_p).result().sequences[0].tokens == expected


def test_stops(service_client):
    sampler = service_client.create_sampling_client(base_model=QWEN).result()
    free = types.SamplingParams(max_tokens=20, temperature=0.0, stop=[])
    tokens = sampler.sample(_prompt(), 1, free).result().sequences[0].tokens
    stop_at = tokens[3]
    first = tokens.index(stop_at)
    by_token = types.SamplingParams(max_tokens=20, temperature=0.0, stop=[stop_at])
    seq = sampler.sample(_prompt(), 1, by_token).result().sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens == tokens[: first + 1]
    text = bytes(t for t in tokens[first : first + 2] if t < 256).decode("latin-1")
    if len(text) == 2:
        by_string = types.SamplingParams(max_tokens=20, temperature=0.0, stop=[text])
        seq = sampler.sample(_prompt(), 1, by_string).result().sequences[0]
        assert seq.stop_reason == "stop"
        assert seq.tokens == tokens[: len(seq.tokens)] and len(seq.tokens) <= first + 2
    length = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
    seq = sampler.sample(_prompt(), 1, length).result().sequences[0]
    assert seq.stop_reason == "length" and len(seq.tokens) == 5


def test_sampler_from_a_saved_checkpoint_and_snapshot_isolation(service_client, trained):
    path = trained.save_weights_for_sampler("snap").result().path
    from_path = service_client.create_sampling_client(model_path=path).result()
    assert from_path.get_base_model() == QWEN
    ephemeral = trained.save_weights_and_get_sampling_client().result()
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    a = from_path.sample(_prompt(), 1, greedy).result().sequences[0]
    b = ephemeral.sample(_prompt(), 1, greedy).result().sequences[0]
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    base = service_client.create_sampling_client(base_model=QWEN).result()
    c = base.sample(_prompt(), 1, greedy).result().sequences[0]
    assert not np.allclose(a.logprobs, c.logprobs, atol=1e-3)  # the adapter is applied
    # Training on after the snapshot does not change what the snapshot samples.
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT),
        loss_fn_inputs={"target_tokens": PROMPT[1:] + [9], "weights": [1.0] * 7},
    )
    trained.forward_backward([datum], "cross_entropy").result()
    trained.optim_step(types.AdamParams(learning_rate=0.1)).result()
    again = ephemeral.sample(_prompt(), 1, greedy).result().sequences[0]
    np.testing.assert_allclose(again.logprobs, b.logprobs, atol=1e-6)


def test_concurrent_samples_from_different_adapters(service_client, trained):
    """Requests of several adapters and the base model in flight at once each get the
    answer they get alone."""
    other = service_client.create_lora_training_client(base_model=QWEN, rank=4, seed=7).result()
    samplers = [
        trained.save_weights_and_get_sampling_client().result(),
        other.save_weights_and_get_sampling_client().result(),
        service_client.create_sampling_client(base_model=QWEN).result(),
    ]
    params = types.SamplingParams(max_tokens=10, temperature=1.0, seed=3, stop=[])
    futures = [s.sample(_prompt(PROMPT[: 3 + i]), 2, params) for i, s in enumerate(samplers)]
    together = [[seq.tokens for seq in f.result().sequences] for f in futures]
    alone = [
        [seq.tokens for seq in s.sample(_prompt(PROMPT[: 3 + i]), 2, params).result().sequences]
        for i, s in enumerate(samplers)
    ]
    assert together == alone


def test_llama_sampling(service_client):
    sampler = service_client.create_sampling_client(base_model=LLAMA).result()
    out = sampler.sample(_prompt(), 2, types.SamplingParams(max_tokens=4, stop=[])).result()
    assert [len(s.tokens) for s in out.sequences] == [4, 4]


def _sample_error(server: Server, sampler_id: str, **overrides) -> httpx.Response:
    body = {
        "sampling_session_id": sampler_id,
        "seq_id": 0,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": {"max_tokens": 4},
    }
    for key, value in overrides.items():
        if key in ("max_tokens", "temperature", "top_p", "top_k", "min_p"):
            body["sampling_params"][key] = value
        else:
            body[key] = value
    return httpx.post(f"{server.url}/api/v1/asample", json=body, headers={"X-API-Key": API_KEY})


@pytest.mark.parametrize(
    ("case", "overrides", "hint"),
    [
        ("zero max_tokens", {"max_tokens": 0}, "max_tokens must be between 1 and"),
        ("max_tokens past context", {"max_tokens": 600}, "max_tokens must be between 1 and"),
        ("empty prompt", {"prompt": {"chunks": [{"type": "encoded_text", "tokens": []}]}}, "empty"),
        (
            "prompt too long",
            {"prompt": {"chunks": [{"tokens": list(range(200)) * 3}]}},
            "context is 512",
        ),
        ("top_p zero", {"top_p": 0.0}, "top_p must be in (0, 1]"),
        ("top_p above one", {"top_p": 1.5}, "top_p must be in (0, 1]"),
        ("negative temperature", {"temperature": -0.5}, "temperature must be >= 0"),
        (
            "token outside vocabulary",
            {"prompt": {"chunks": [{"tokens": [1, 99999]}]}},
            "vocabulary",
        ),
    ],
)
def test_bad_sampling_requests(service_client, server: Server, case, overrides, hint):
    sampler = service_client.create_sampling_client(base_model=QWEN).result()
    response = _sample_error(server, sampler._sampling_session_id, **overrides)
    assert response.status_code == 400, case
    assert hint in response.json()["detail"], response.json()
    ok = sampler.sample(_prompt(), 1, types.SamplingParams(max_tokens=2)).result()
    assert len(ok.sequences[0].tokens) <= 2


def test_bad_sampler_references(service_client, server: Server, trained):
    response = _sample_error(server, "sess-nope:sample:0")
    assert response.status_code == 404 and "unknown sampling session" in response.json()["detail"]
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        service_client.create_sampling_client(
            model_path="tinker://sess-x:train:0/sampler_weights/none"
        ).result()
    llama = service_client.create_lora_training_client(base_model=LLAMA, rank=4).result()
    path = llama.save_weights_for_sampler("llama-snap").result().path
    # A Llama checkpoint asked for as a Qwen sampler.
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": API_KEY})
    session = http.post("/create_session", json={}).json()["session_id"]
    response = http.post(
        "/create_sampling_session",
        json={
            "session_id": session,
            "sampling_session_seq_id": 0,
            "base_model": QWEN,
            "model_path": path,
        },
    )
    assert response.status_code == 400 and "trained on meta-llama" in response.json()["detail"]
    # The server still samples after each of these.
    sampler = service_client.create_sampling_client(base_model=QWEN).result()
    ok = sampler.sample(_prompt(), 1, types.SamplingParams(max_tokens=2)).result()
    assert 1 <= len(ok.sequences[0].tokens) <= 2


def test_top_k_zero_means_no_top_k(service_client):
    """The one sampling check accepts top_k=0 as "off" (like -1), as the engine always
    treated it: the same seeded draw as with top_k=-1."""
    sampler = service_client.create_sampling_client(base_model=QWEN).result()

    def draw(top_k: int) -> list[int]:
        params = types.SamplingParams(max_tokens=8, temperature=1.0, top_k=top_k, seed=5, stop=[])
        return sampler.sample(_prompt(), 1, params).result().sequences[0].tokens

    assert draw(0) == draw(-1)
    assert len(draw(0)) == 8


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory, tiny_models):
    srv = Server(
        {QWEN: tiny_models[QWEN]},
        tmp_path_factory.mktemp("limited") / "treadle",
        ["--max-num-samples", "3", "--retry-window", "2", "--long-poll-seconds", "2"],
    )
    yield srv
    srv.stop()


def test_sampling_limits_come_from_the_settings(limited_server: Server):
    client = tinker.ServiceClient(base_url=limited_server.url, api_key=API_KEY)
    sampler_id = client.create_sampling_client(base_model=QWEN).result()._sampling_session_id
    response = _sample_error(limited_server, sampler_id, num_samples=4)
    assert response.status_code == 400
    assert "num_samples must be between 1 and 3, got 4" in response.json()["detail"]
    # Retried submits are recognised while remembered; the memory of them is bounded by
    # --retry-window (2), so the third submit after seq 0 pushes it out.
    ids = [
        _sample_error(limited_server, sampler_id, seq_id=seq, num_samples=3).json()["request_id"]
        for seq in (0, 0, 1, 2, 0)
    ]
    assert ids[0] == ids[1]
    assert len(set(ids)) == 4
    client.close("success")
