"""The OpenAI-compatible endpoint (``/oai/api/v1``) through the official ``openai`` client:
its answers equal the SDK's samples of the same prompt tokens (one sampler, one decode
path), checkpoints are read under the SDK's ownership rules, and bad input is a 4xx in
OpenAI's error shape."""

from __future__ import annotations

from collections import Counter

import httpx
import numpy as np
import openai
import pytest
import tinker
from tinker import types
from transformers import AutoTokenizer

from tests.conftest import LLAMA, QWEN
from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key
from tests.sdk.test_usage import _totals
from treadle.sampling_params import SamplingParams
from treadle.service.openai_compat import ChoiceStream

EOS = 258  # <|im_end|> of the tiny models' tokenizer
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    """One server for the module, with keys of alice and bob."""
    data_dir = tmp_path_factory.mktemp("openai") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    models = {QWEN: tiny_models[QWEN], LLAMA: tiny_models[LLAMA]}
    server = Server(models, data_dir, ["--long-poll-seconds", "2"])
    sdk = tinker.ServiceClient(base_url=server.url, api_key=alice)
    yield server, alice, bob, sdk
    sdk.close("success")
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models[QWEN])


def _client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/oai/api/v1", api_key=key, max_retries=0)


def _text(tokenizer, tokens: list[int]) -> str:
    """What the endpoint shows of sampled tokens: an end-of-sequence stop is not shown."""
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == EOS else tokens)


def _sdk_sample(sampler, prompt: list[int], n: int = 1, **params) -> list[types.SampledSequence]:
    params = types.SamplingParams(**params)
    return sampler.sample(types.ModelInput.from_ints(prompt), n, params).result().sequences


def _chat_prompt(tokenizer) -> list[int]:
    """The chat template applied to MESSAGES, independently of the server."""
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_greedy_chat_and_completions_equal_the_sdks_greedy_sample(env, tokenizer):
    server, alice, _, sdk = env
    client = _client(server, alice)
    sampler = sdk.create_sampling_client(base_model=QWEN).result()

    chat = client.chat.completions.create(
        model=QWEN, messages=MESSAGES, max_tokens=12, temperature=0
    )
    prompt = _chat_prompt(tokenizer)
    [expected] = _sdk_sample(sampler, prompt, max_tokens=12, temperature=0.0)
    assert chat.choices[0].message.content == _text(tokenizer, expected.tokens)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == expected.stop_reason
    assert chat.usage.prompt_tokens == len(prompt)
    assert chat.usage.completion_tokens == len(expected.tokens)
    assert chat.object == "chat.completion" and chat.model == QWEN

    text = client.completions.create(
        model=QWEN, prompt="Hello, world", max_tokens=10, temperature=0
    )
    ids = tokenizer.encode("Hello, world")
    [expected] = _sdk_sample(sampler, ids, max_tokens=10, temperature=0.0)
    assert text.choices[0].text == _text(tokenizer, expected.tokens)
    assert text.usage.prompt_tokens == len(ids)

    # Token ids as the prompt, and several prompts in one request (choices in order).
    several = client.completions.create(
        model=QWEN, prompt=[ids, [1, 2, 3]], max_tokens=10, temperature=0
    )
    [other] = _sdk_sample(sampler, [1, 2, 3], max_tokens=10, temperature=0.0)
    assert [c.index for c in several.choices] == [0, 1]
    assert [c.text for c in several.choices] == [
        _text(tokenizer, expected.tokens),
        _text(tokenizer, other.tokens),
    ]
    assert several.usage.prompt_tokens == len(ids) + 3

    # completions' default max_tokens is OpenAI's: 16.
    default = client.completions.create(model=QWEN, prompt=[1, 2, 3], temperature=0, stop=[])
    assert default.usage.completion_tokens <= 16


def test_streams_reassemble_to_the_unstreamed_answer(env):
    server, alice, _, _ = env
    client = _client(server, alice)
    whole = client.chat.completions.create(
        model=QWEN, messages=MESSAGES, max_tokens=20, temperature=0
    )
    stream = client.chat.completions.create(
        model=QWEN,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    whole_text = client.completions.create(
        model=QWEN, prompt="Once upon", max_tokens=20, temperature=0, n=2
    )
    streamed = list(
        client.completions.create(
            model=QWEN, prompt="Once upon", max_tokens=20, temperature=0, n=2, stream=True
        )
    )
    for choice in whole_text.choices:
        pieces = [c.choices[0].text for c in streamed if c.choices[0].index == choice.index]
        assert "".join(pieces) == choice.text


def test_streams_send_text_as_it_is_decoded(env):
    """Content arrives in chunks as tokens are decoded: several chunks before the finish,
    and an n=2 request's choices interleave (chunks sent at the end come choice by
    choice); either way they join to the unstreamed text."""
    server, alice, _, _ = env
    client = _client(server, alice)
    greedy = {"model": QWEN, "prompt": "Once upon", "max_tokens": 48, "temperature": 0}
    extra = {"ignore_eos": True}
    whole = client.completions.create(**greedy, extra_body=extra)
    chunks = list(client.completions.create(**greedy, extra_body=extra, stream=True))
    assert whole.usage.completion_tokens == 48
    finish = next(i for i, c in enumerate(chunks) if c.choices[0].finish_reason)
    assert finish == len(chunks) - 1 and chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks[:finish] if c.choices[0].text) > 1
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text

    chat = {"model": QWEN, "messages": MESSAGES, "max_tokens": 40, "seed": 5, "n": 2}
    whole_chat = client.chat.completions.create(**chat, extra_body=extra)
    streamed = list(
        client.chat.completions.create(
            **chat, extra_body=extra, stream=True, stream_options={"include_usage": True}
        )
    )
    shown = [c.choices[0].index for c in streamed if c.choices and c.choices[0].delta.content]
    assert set(shown) == {0, 1} and shown != sorted(shown)  # interleaved, as decoded
    for choice in whole_chat.choices:
        mine = [c.choices[0] for c in streamed if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    assert whole_chat.choices[0].message.content != whole_chat.choices[1].message.content
    assert streamed[-1].choices == [] and streamed[-1].usage == whole_chat.usage


def test_a_streamed_stop_string_is_never_sent(env):
    server, alice, _, _ = env
    client = _client(server, alice)
    sample = {"model": QWEN, "prompt": [1, 2, 3], "max_tokens": 40, "seed": 9}
    text = client.completions.create(**sample, stop=[]).choices[0].text
    # Two printable characters from the middle of the text: the first may arrive (and be
    # held back) a step before the second decides it.
    start = next(i for i in range(len(text) // 3, len(text) - 1) if text[i : i + 2].isprintable())
    stop = text[start : start + 2]
    cut = text[: text.index(stop)]
    assert cut  # the stop comes mid-stream, after some text
    chunks = list(client.completions.create(**sample, stop=[stop], stream=True))
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == cut
    assert not any(stop in piece for piece in pieces)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("stops", "shown"),
    [
        ((), "Grüße, 世界! bis später"),
        (("später",), "Grüße, 世界! bis "),
        (("界!", "Grüße, x"), "Grüße, 世"),  # the second begins the text, then fails
    ],
)
def test_choice_streams_hold_back_split_characters_and_stop_strings(tokenizer, stops, shown):
    """Token by token (the tiny tokenizer has a token per byte, so characters split), the
    pieces sent are always a beginning of the shown text and join to all of it; text that
    may begin a stop string is held back until decided."""
    text = "Grüße, 世界! bis später"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    assert len(tokens) > len(text)  # multi-byte characters span several tokens
    params = SamplingParams(max_tokens=100, stop_token_ids=(EOS,), stop_strings=stops)
    stream = ChoiceStream(params, tokenizer.decode)
    sent = ""
    for token in [*tokens, EOS]:
        sent += stream.add(token)
        assert shown.startswith(sent) and "\ufffd" not in sent
    assert sent == shown


def test_a_client_that_leaves_mid_stream_leaves_the_server_serving(env):
    server, alice, _, _ = env
    client = _client(server, alice)
    long = {"model": QWEN, "prompt": "Once upon", "max_tokens": 400, "temperature": 0}
    for _ in range(2):
        stream = client.completions.create(**long, extra_body={"ignore_eos": True}, stream=True)
        first = next(iter(stream))
        assert first.choices[0].finish_reason is None
        stream.close()
    after = client.completions.create(model=QWEN, prompt="Once upon", max_tokens=5, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length") and after.usage.completion_tokens
    assert "Traceback" not in server.log()


def test_n_seeded_samples_equal_the_sdks_seeded_samples(env, tokenizer):
    server, alice, _, sdk = env
    client = _client(server, alice)
    sampler = sdk.create_sampling_client(base_model=QWEN).result()
    answer = client.completions.create(
        model=QWEN, prompt=[5, 6, 7, 8], max_tokens=8, temperature=1.0, seed=11, n=3, top_p=0.9
    )
    expected = _sdk_sample(
        sampler, [5, 6, 7, 8], 3, max_tokens=8, temperature=1.0, seed=11, top_p=0.9
    )
    assert [c.text for c in answer.choices] == [_text(tokenizer, s.tokens) for s in expected]
    assert len({c.text for c in answer.choices}) > 1  # the n samples differ
    assert answer.usage.completion_tokens == sum(len(s.tokens) for s in expected)

    # Penalties reach the sampler. They act on generated tokens only, so the first token
    # is the same; greedy on the tiny random model repeats itself, which they change.
    penalised, plain = (
        client.completions.create(
            model=QWEN,
            prompt=[5, 6, 7, 8],
            max_tokens=8,
            temperature=0,
            presence_penalty=penalty,
            frequency_penalty=penalty,
            logprobs=0,
        )
        .choices[0]
        .logprobs.tokens
        for penalty in (2.0, 0.0)
    )
    assert penalised[0] == plain[0] and penalised != plain


def test_stop_strings_cut_the_text(env, tokenizer):
    server, alice, _, _ = env
    client = _client(server, alice)
    # Seeded sampling: varied text (greedy on a random model repeats itself), the same twice.
    sample = {"model": QWEN, "prompt": [1, 2, 3], "max_tokens": 30, "seed": 7}
    full = client.completions.create(**sample, stop=[])
    text = full.choices[0].text
    # A character of that text: the answer stops at its first occurrence, without it.
    stop = next(ch for ch in text[1:] if ch.isascii() and ch.isprintable())
    cut = client.completions.create(**sample, stop=[stop, "never seen"])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert full.choices[0].finish_reason == "length"


def test_logprobs_agree_with_the_sdks(env, tokenizer):
    server, alice, _, sdk = env
    client = _client(server, alice)
    sampler = sdk.create_sampling_client(base_model=QWEN).result()
    chat = client.chat.completions.create(
        model=QWEN, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    prompt = _chat_prompt(tokenizer)
    [expected] = _sdk_sample(sampler, prompt, max_tokens=6, temperature=0.0)
    content = chat.choices[0].logprobs.content
    shown = [t for t in expected.tokens if t != EOS]
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in shown]
    np.testing.assert_allclose(
        [c.logprob for c in content], expected.logprobs[: len(shown)], atol=1e-5
    )
    # Top logprobs: the SDK's top-k prompt logprobs of prompt + completion, at the
    # completion's positions; greedy picked the most likely token each time.
    scored = sampler.sample(
        types.ModelInput.from_ints(prompt + expected.tokens),
        1,
        types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
    ).result()
    for position, entry in enumerate(content):
        top = scored.topk_prompt_logprobs[len(prompt) + position]
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i, _ in top]
        np.testing.assert_allclose(
            [t.logprob for t in entry.top_logprobs], [lp for _, lp in top], atol=1e-4
        )
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)

    text = client.completions.create(
        model=QWEN, prompt=[1, 2, 3], max_tokens=5, temperature=0, logprobs=2
    )
    [expected] = _sdk_sample(sampler, [1, 2, 3], max_tokens=5, temperature=0.0)
    logprobs = text.choices[0].logprobs
    np.testing.assert_allclose(logprobs.token_logprobs, expected.logprobs, atol=1e-5)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_checkpoint_paths_and_their_owners(env, tokenizer):
    server, alice, bob, sdk = env
    tc = sdk.create_lora_training_client(base_model=QWEN, rank=8, seed=3).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5, 6]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6, 7]},
    )
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    path = tc.save_weights_for_sampler("oai").result().path
    assert "/sampler_weights/" in path
    adapter = sdk.create_sampling_client(model_path=path).result()
    [expected] = _sdk_sample(adapter, [1, 2, 3], max_tokens=12, temperature=0.0)
    [base] = _sdk_sample(
        sdk.create_sampling_client(base_model=QWEN).result(),
        [1, 2, 3],
        max_tokens=12,
        temperature=0.0,
    )
    assert expected.tokens != base.tokens  # the adapter matters

    client = _client(server, alice)
    for model in (path, f"{QWEN};{path}"):
        answer = client.completions.create(
            model=model, prompt=[1, 2, 3], max_tokens=12, temperature=0
        )
        assert answer.choices[0].text == _text(tokenizer, expected.tokens)

    with pytest.raises(openai.BadRequestError, match="trained on"):
        client.completions.create(model=f"{LLAMA};{path}", prompt=[1, 2, 3], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=path + "x", prompt=[1, 2, 3], max_tokens=2)

    # Bob: alice's private checkpoint is not found (as if it did not exist); published,
    # he may sample it.
    bob_client = _client(server, bob)
    with pytest.raises(openai.NotFoundError, match="no checkpoint"):
        bob_client.completions.create(model=path, prompt=[1, 2, 3], max_tokens=2)
    rest = tinker.RestClient(base_url=server.url, api_key=alice)
    rest.publish_checkpoint_from_tinker_path(path).result()
    answer = bob_client.completions.create(
        model=path, prompt=[1, 2, 3], max_tokens=12, temperature=0
    )
    assert answer.choices[0].text == _text(tokenizer, expected.tokens)
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    with pytest.raises(openai.NotFoundError):
        bob_client.chat.completions.create(model=path, messages=MESSAGES, max_tokens=2)


def test_keys_are_required(env):
    server, _, _, _ = env
    body = {"model": QWEN, "prompt": [1, 2], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer tml-wrong"}, {"Authorization": "Basic abc"}):
        answer = httpx.post(f"{server.url}/oai/api/v1/completions", json=body, headers=headers)
        assert answer.status_code == 401
        assert "key" in answer.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        _client(server, "tml-nobody").chat.completions.create(model=QWEN, messages=MESSAGES)
    models = _client(server, env[1]).models.list()
    assert sorted(m.id for m in models.data) == sorted([QWEN, LLAMA])


def _post(server: Server, key: str, path: str, body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{server.url}/oai/api/v1/{path}", content=body, headers=headers)
    return httpx.post(f"{server.url}/oai/api/v1/{path}", json=body, headers=headers)


def test_bad_input_is_a_4xx_in_openais_shape(env):
    server, alice, _, _ = env
    chat = {"model": QWEN, "messages": MESSAGES}
    cases: list[tuple[str, object, int, str | None]] = [
        ("chat/completions", {**chat, "tools": [{"type": "function"}]}, 400, "tools"),
        ("chat/completions", {**chat, "logit_bias": {"1": 5}}, 400, "logit_bias"),
        ("chat/completions", {**chat, "response_format": {"type": "json_object"}}, 400, None),
        ("chat/completions", {**chat, "frobnicate": 1}, 400, "frobnicate"),
        (
            "chat/completions",
            {**chat, "messages": [{"role": "user", "content": "x", "y": 1}]},
            400,
            None,
        ),
        ("chat/completions", {**chat, "messages": []}, 400, "messages"),
        ("chat/completions", {**chat, "messages": [{"role": "tool", "content": "x"}]}, 400, None),
        ("chat/completions", {**chat, "max_tokens": 10**12}, 400, None),
        ("chat/completions", {**chat, "n": 10**6}, 400, None),
        ("chat/completions", {**chat, "n": 0}, 400, "n"),
        ("chat/completions", {**chat, "temperature": "hot"}, 400, "temperature"),
        ("chat/completions", {**chat, "presence_penalty": 9}, 400, "presence_penalty"),
        ("chat/completions", {**chat, "top_logprobs": 3}, 400, None),
        ("chat/completions", {**chat, "logprobs": True, "top_logprobs": 10**6}, 400, None),
        ("chat/completions", {**chat, "top_p": 0}, 400, None),
        ("chat/completions", {**chat, "stop": ["x" * 10**5]}, 400, None),
        ("chat/completions", {**chat, "model": "tinker://nope/sampler_weights/x"}, 404, None),
        ("chat/completions", {**chat, "model": "tinker://../../etc"}, 400, None),
        ("chat/completions", {**chat, "model": f"{QWEN};not-a-path"}, 400, None),
        ("chat/completions", {**chat, "model": "no/such-model"}, 404, None),
        ("chat/completions", {"messages": MESSAGES}, 400, "model"),
        ("chat/completions", b"{not json", 400, None),
        ("chat/completions", b"[1, 2]", 400, None),
        ("chat/completions", b"\xff\xfe", 400, None),
        ("completions", {"model": QWEN, "prompt": [10**9]}, 400, None),
        ("completions", {"model": QWEN, "prompt": [[1], [10**30]]}, 400, None),
        ("completions", {"model": QWEN, "prompt": [-1]}, 400, None),
        ("completions", {"model": QWEN, "prompt": []}, 400, None),
        ("completions", {"model": QWEN, "prompt": "x", "echo": True}, 400, "echo"),
        ("completions", {"model": QWEN, "prompt": "x", "best_of": 3}, 400, "best_of"),
        ("completions", {"model": QWEN, "prompt": "x", "suffix": "y"}, 400, "suffix"),
        ("completions", {"model": QWEN, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
        ("completions", {"model": QWEN, "prompt": ["x"] * 10**4}, 400, None),
        ("completions", {"model": QWEN, "prompt": {"a": 1}}, 400, "prompt"),
    ]
    for path, body, status, param in cases:
        answer = _post(server, alice, path, body)
        assert answer.status_code == status, (body, answer.text)
        error = answer.json()["error"]
        assert error["message"] and error["type"], error
        if param:
            assert error["param"] == param and param in error["message"], error
    # The server keeps serving; harmless defaults that clients always send are accepted.
    fine = {**chat, "max_tokens": 2, "tools": [], "response_format": {"type": "text"}, "user": "u"}
    assert _post(server, alice, "chat/completions", fine).status_code == 200
    assert (
        _post(
            server, alice, "completions", {"model": QWEN, "prompt": "x", "echo": False}
        ).status_code
        == 200
    )


def test_usage_is_counted_for_the_caller(env):
    server, _, bob, _ = env
    before = _totals(server, bob, "bob")
    client = _client(server, bob)
    chat = client.chat.completions.create(model=QWEN, messages=MESSAGES, max_tokens=5, n=2)
    text = client.completions.create(model=QWEN, prompt="abc", max_tokens=4)
    spent = _totals(server, bob, "bob")
    spent.subtract(before)
    assert +spent == Counter(
        sampling_prefill=chat.usage.prompt_tokens + text.usage.prompt_tokens,
        sampling_sample=chat.usage.completion_tokens + text.usage.completion_tokens,
    )
