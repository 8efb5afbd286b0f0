"""The training path through the official SDK against a live treadle, checked against
plain transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker import TensorData, types

from tests.conftest import LLAMA, QWEN
from tests.fixtures.reference import base_logprobs


def _datum(tokens: list[int], **inputs: list[float] | list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
    )


def _probe(tc: tinker.TrainingClient, tokens: list[int]) -> np.ndarray:
    out = tc.forward([_datum(tokens)], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


@pytest.fixture()
def qwen(service_client) -> tinker.TrainingClient:
    return service_client.create_lora_training_client(base_model=QWEN, rank=16).result()


def test_tutorial_202_losses_match_the_formulas(qwen, tiny_models: dict[str, Path]):
    """The tutorial's data and calls; every number checked against the base model's
    logprobs (a fresh adapter is the base model) through the documented formulas."""
    tokenizer = qwen.get_tokenizer()
    prompt_ids = tokenizer.encode("The capital of France is")
    target_ids = tokenizer.encode(" Paris.")
    all_ids = prompt_ids + target_ids
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(target_ids)
    sft = types.Datum(
        model_input=tinker.ModelInput.from_ints(all_ids[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_torch(torch.tensor(all_ids[1:])),
            "weights": TensorData.from_torch(torch.tensor(weights)),
        },
    )
    lp = base_logprobs(tiny_models[QWEN], all_ids[:-1], all_ids[1:])
    # Sampler logprobs near the learner's (the tutorial's constant -1.5 would put every
    # ratio of a random tiny model far below the clips), so the clip configs matter.
    n_prompt = len(prompt_ids) - 1
    offsets = torch.linspace(-0.6, 0.6, len(target_ids), dtype=torch.float64)
    q = torch.cat([torch.zeros(n_prompt, dtype=torch.float64), lp[n_prompt:] + offsets])
    q = q.float().double()  # what the wire carries
    adv = torch.tensor([0.0] * n_prompt + [1.0, -1.0] * len(target_ids), dtype=torch.float64)
    adv = adv[: len(lp)]
    rl = types.Datum(
        model_input=tinker.ModelInput.from_ints(all_ids[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_torch(torch.tensor(all_ids[1:])),
            "logprobs": TensorData.from_torch(q.float()),
            "advantages": TensorData.from_torch(adv.float()),
        },
    )
    ratio = torch.exp(lp - q)

    def ppo(lo: float, hi: float) -> float:
        return float(-torch.min(ratio * adv, torch.clamp(ratio, lo, hi) * adv).sum())

    expected = {
        ("cross_entropy", None): float(-(lp * torch.tensor(weights)).sum()),
        ("importance_sampling", None): float(-(ratio * adv).sum()),
        ("ppo", None): ppo(0.8, 1.2),
        ("ppo", (0.9, 1.1)): ppo(0.9, 1.1),
        ("ppo", (0.5, 1.5)): ppo(0.5, 1.5),
        ("cispo", None): float(-(torch.clamp(ratio, 0.8, 1.2) * lp * adv).sum()),
        ("dro", None): float(-(lp * adv - 0.5 * 0.05 * (lp - q) ** 2).sum()),
    }
    for (loss_fn, clip), want in expected.items():
        config = (
            None
            if clip is None
            else {"clip_low_threshold": clip[0], "clip_high_threshold": clip[1]}
        )
        datum = sft if loss_fn == "cross_entropy" else rl
        result = qwen.forward_backward([datum], loss_fn=loss_fn, loss_fn_config=config).result()
        assert result.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-5), (
            loss_fn,
            clip,
        )
        got_lp = result.loss_fn_outputs[0]["logprobs"]
        assert got_lp.dtype == "float32" and list(got_lp.shape) == [len(all_ids) - 1]
        np.testing.assert_allclose(got_lp.to_numpy(), lp.numpy(), atol=1e-5)
    # The ratios straddle the PPO clips, so the configs really matter.
    assert len({round(v, 6) for v in expected.values()}) == len(expected)


def test_gspo_and_dro_config(qwen, tiny_models: dict[str, Path]):
    tokens = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]
    n = len(tokens) - 1
    q = torch.linspace(-3, -1, n)
    adv = torch.linspace(-1, 1, n)
    mask = torch.tensor([0.0] * 3 + [1.0] * (n - 3))
    lp = base_logprobs(tiny_models[QWEN], tokens[:-1], tokens[1:])
    datum = _datum(
        tokens, logprobs=q.tolist(), advantages=adv.tolist(), sequence_ratio_mask=mask.tolist()
    )
    seq_ratio = torch.exp((lp - q.double())[mask.bool()].mean())
    want = float(-torch.min(seq_ratio * adv, torch.clamp(seq_ratio, 0.8, 1.2) * adv).sum())
    got = qwen.forward_backward([datum], "gspo").result().metrics["loss:sum"]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    dro = qwen.forward_backward([datum], "dro", {"beta": 0.5}).result().metrics["loss:sum"]
    assert dro == pytest.approx(float(-(lp * adv - 0.25 * (lp - q.double()) ** 2).sum()), rel=1e-4)


def test_get_info_tokenizer_and_capabilities(service_client, qwen, tiny_models: dict[str, Path]):
    info = qwen.get_info()
    assert info.model_data.model_name == QWEN
    assert info.lora_rank == 16
    assert qwen.get_tokenizer().encode("héllo") == list("héllo".encode())
    caps = service_client.create_rest_client().get_server_capabilities().result()
    names = {m.model_name: m for m in caps.supported_models}
    assert set(names) == {QWEN, LLAMA}
    assert names[QWEN].max_context_length == 512


def test_llama_model_served_alongside(service_client, tiny_models: dict[str, Path]):
    tc = service_client.create_lora_training_client(base_model=LLAMA, rank=4).result()
    assert tc.get_info().model_data.arch == "llama"
    tokens = [5, 17, 99, 3, 250, 7]
    np.testing.assert_allclose(
        _probe(tc, tokens),
        base_logprobs(tiny_models[LLAMA], tokens[:-1], tokens[1:]).numpy(),
        atol=1e-5,
    )


def _pair(service_client, seed: int = 7) -> tuple[tinker.TrainingClient, tinker.TrainingClient]:
    make = service_client.create_lora_training_client
    return make(base_model=QWEN, rank=8, seed=seed).result(), make(
        base_model=QWEN, rank=8, seed=seed
    ).result()


def _batch(seed: int, count: int, length: int) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    return [
        _datum(
            rng.integers(0, 256, length + 1).tolist(), weights=rng.uniform(0, 1, length).tolist()
        )
        for _ in range(count)
    ]


ADAM = types.AdamParams(learning_rate=1e-2)
PROBE = [10, 20, 30, 40, 50, 60, 70]


def test_split_batch_gives_same_loss_and_update(service_client):
    one, split = _pair(service_client)
    data = _batch(1, 6, 9)
    whole = one.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    parts = [split.forward_backward(data[i : i + 2], "cross_entropy") for i in (0, 2, 4)]
    assert sum(p.result().metrics["loss:sum"] for p in parts) == pytest.approx(whole, rel=1e-5)
    before = _probe(one, PROBE)
    m1 = one.optim_step(ADAM).result().metrics
    m2 = split.optim_step(ADAM).result().metrics
    assert m1["grad_norm:mean"] == pytest.approx(m2["grad_norm:mean"], rel=1e-4)
    after = _probe(one, PROBE)
    np.testing.assert_allclose(after, _probe(split, PROBE), atol=1e-5)
    assert np.abs(after - before).max() > 1e-3


def test_sdk_chunking_of_a_large_batch(service_client):
    """1100 datums: the SDK sends chunks of 1024 and 76 with the first chunk last."""
    chunked, by_hand = _pair(service_client, seed=11)
    data = _batch(2, 1100, 2)
    total = chunked.forward_backward(data, "cross_entropy").result()
    assert len(total.loss_fn_outputs) == 1100
    pieces = [
        by_hand.forward_backward(data[i : i + 100], "cross_entropy") for i in range(0, 1100, 100)
    ]
    assert sum(p.result().metrics["loss:sum"] for p in pieces) == pytest.approx(
        total.metrics["loss:sum"], rel=1e-5
    )
    chunked.optim_step(ADAM).result()
    by_hand.optim_step(ADAM).result()
    np.testing.assert_allclose(_probe(chunked, PROBE), _probe(by_hand, PROBE), atol=1e-5)


def test_gradients_accumulate_until_optim_step_and_forward_adds_none(service_client):
    twice, once = _pair(service_client, seed=3)
    data = _batch(3, 2, 6)
    twice.forward(data, "cross_entropy").result()
    twice.forward_backward(data, "cross_entropy").result()
    twice.forward_backward(data, "cross_entropy").result()
    doubled = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": TensorData.from_numpy(d.loss_fn_inputs["weights"].to_numpy() * 2),
            },
        )
        for d in data
    ]
    once.forward_backward(doubled, "cross_entropy").result()
    g2 = twice.optim_step(ADAM).result().metrics["grad_norm:mean"]
    g1 = once.optim_step(ADAM).result().metrics["grad_norm:mean"]
    assert g2 == pytest.approx(g1, rel=1e-4)
    np.testing.assert_allclose(_probe(twice, PROBE), _probe(once, PROBE), atol=1e-5)


def test_custom_loss_equal_to_cross_entropy_gives_same_update(service_client):
    custom, builtin = _pair(service_client, seed=5)
    data = _batch(4, 3, 7)

    def ce(batch: list[types.Datum], logprobs: list[torch.Tensor]):
        loss = sum(
            -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
            for d, lp in zip(batch, logprobs, strict=True)
        )
        return loss, {"ce": float(loss.detach())}

    c = custom.forward_backward_custom(data, ce).result()
    b = builtin.forward_backward(data, "cross_entropy").result()
    assert c.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
    gc = custom.optim_step(ADAM).result().metrics["grad_norm:mean"]
    gb = builtin.optim_step(ADAM).result().metrics["grad_norm:mean"]
    assert gc == pytest.approx(gb, rel=1e-4)
    np.testing.assert_allclose(_probe(custom, PROBE), _probe(builtin, PROBE), atol=1e-5)


def test_tutorial_dpo_custom_loss(qwen, tiny_models: dict[str, Path]):
    chosen, rejected = [1, 50, 60, 70, 80], [1, 50, 90, 100, 110, 120]

    def dpo_loss(data, logprobs_list):
        preferred_lp = logprobs_list[0].sum()
        rejected_lp = logprobs_list[1].sum()
        beta = 0.1
        loss = -torch.nn.functional.logsigmoid(beta * (preferred_lp - rejected_lp))
        return loss, {"dpo_loss": loss.item()}

    result = qwen.forward_backward_custom([_datum(chosen), _datum(rejected)], dpo_loss).result()
    lp_c = base_logprobs(tiny_models[QWEN], chosen[:-1], chosen[1:]).sum()
    lp_r = base_logprobs(tiny_models[QWEN], rejected[:-1], rejected[1:]).sum()
    want = float(-torch.nn.functional.logsigmoid(0.1 * (lp_c - lp_r)))
    assert result.metrics["dpo_loss"] == pytest.approx(want, rel=1e-4)
    assert result.metrics["loss:sum"] == pytest.approx(want, rel=1e-4)
    assert qwen.optim_step(ADAM).result().metrics["grad_norm:mean"] > 0


def test_two_dimensional_targets_through_the_wire(qwen, tiny_models: dict[str, Path]):
    tokens = [3, 40, 41, 42, 43]
    targets = torch.tensor([[40, 7], [41, 8], [42, 9], [43, 10]])
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_torch(targets),
            "weights": TensorData.from_torch(weights),
        },
    )
    out = qwen.forward_backward([datum], "cross_entropy").result()
    lp = out.loss_fn_outputs[0]["logprobs"]
    assert list(lp.shape) == [4, 2]
    ref = torch.stack(
        [base_logprobs(tiny_models[QWEN], tokens[:-1], targets[:, k].tolist()) for k in range(2)],
        -1,
    )
    np.testing.assert_allclose(lp.to_numpy().reshape(4, 2), ref.numpy(), atol=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(
        float(-(ref * weights.double()).sum()), rel=1e-5
    )
