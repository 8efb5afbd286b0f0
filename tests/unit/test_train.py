"""The engine's forward/backward and AdamW step against independent plain-torch
computations on the same tiny real-architecture models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.fixtures.tiny_models import ARCHS, make_tiny_model
from treadle.engine.lora import new_adapter
from treadle.engine.losses import LOSSES
from treadle.engine.models import BaseLM, load_base_model
from treadle.engine.train import ForwardBackwardWork, LoraModel, forward_backward, optim_step
from treadle.types import AdamParams, Datum, LoraSpec


@pytest.fixture(scope="module", params=ARCHS)
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BaseLM:
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", request.param)
    return load_base_model("tiny", str(folder), folder.parent)


def _data(seed: int, lengths: list[int], vocab: int = 250) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        tokens = rng.integers(0, vocab, n + 1)
        out.append(
            Datum(
                tokens[:-1].astype(np.int64),
                {
                    "target_tokens": tokens[1:].astype(np.int64),
                    "weights": rng.uniform(-0.5, 1.5, n).astype(np.float32),
                },
            )
        )
    return out


def _model(base: BaseLM, seed: int, rank: int = 4, **flags: bool) -> LoraModel:
    adapter = new_adapter(LoraSpec(rank, **flags), base.layers, seed)
    # A fresh B is zero; perturb it so the LoRA path and every gradient are exercised.
    gen = torch.Generator().manual_seed(seed + 100)
    for pair in adapter.pairs.values():
        with torch.no_grad():
            pair.b.copy_(torch.randn(pair.b.shape, generator=gen) * 0.05)
    return LoraModel.create(adapter)


class _Reference:
    """Plain transformers model; the adapter applied through forward hooks; each datum
    alone, full log-softmax. Shares nothing with the engine but the weights."""

    def __init__(self, folder: Path, model: LoraModel) -> None:
        self.net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        spec = model.adapter.spec
        self.a = {k: p.a.detach().clone().requires_grad_() for k, p in model.adapter.pairs.items()}
        self.b = {k: p.b.detach().clone().requires_grad_() for k, p in model.adapter.pairs.items()}
        for name, module in self.net.named_modules():
            if name in self.a:
                module.register_forward_hook(
                    lambda mod, inp, out, name=name: (
                        out + (inp[0] @ self.a[name].t()) @ self.b[name].t() * spec.scale
                    )
                )

    def logprobs(self, datum: Datum) -> torch.Tensor:
        logits = self.net(torch.from_numpy(datum.tokens)[None]).logits[0].float()
        targets = torch.from_numpy(datum.inputs["target_tokens"])
        index = targets if targets.dim() == 2 else targets[:, None]
        lp = torch.log_softmax(logits, -1).gather(-1, index)
        return lp if targets.dim() == 2 else lp[:, 0]


def _grads(model: LoraModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k: (p.a.grad.clone(), p.b.grad.clone()) for k, p in model.adapter.pairs.items()}


def test_logprobs_loss_and_gradients_match_plain_transformers(base: BaseLM):
    model = _model(base, seed=1)
    data = _data(0, [5, 9, 3, 12])
    [out] = forward_backward(
        base, [ForwardBackwardWork(model, data, LOSSES["cross_entropy"], {}, False)], 16
    )
    ref = _Reference(base.folder, model)
    total = torch.zeros(())
    for i, datum in enumerate(data):
        lp = ref.logprobs(datum)
        np.testing.assert_allclose(out.logprobs[i], lp.detach().numpy(), atol=2e-6, rtol=0)
        total = total - (lp * torch.from_numpy(datum.inputs["weights"])).sum()
    total.backward()
    assert out.loss == pytest.approx(total.item(), rel=1e-5)
    for key, (ga, gb) in _grads(model).items():
        torch.testing.assert_close(ga, ref.a[key].grad, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(gb, ref.b[key].grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("max_tokens", [1, 7, 20, 4096])
def test_packing_does_not_change_results(base: BaseLM, max_tokens: int):
    data = _data(1, [4, 8, 2, 6, 5])
    one = _model(base, seed=2)
    [a] = forward_backward(
        base, [ForwardBackwardWork(one, data, LOSSES["cross_entropy"], {}, False)], 1
    )
    other = _model(base, seed=2)
    [b] = forward_backward(
        base, [ForwardBackwardWork(other, data, LOSSES["cross_entropy"], {}, False)], max_tokens
    )
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert not base.model.training  # the checkpointed long passes switch training mode back off
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        np.testing.assert_allclose(x, y, atol=2e-6)
    for (ga, gb), (ha, hb) in zip(_grads(one).values(), _grads(other).values(), strict=True):
        torch.testing.assert_close(ga, ha, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(gb, hb, atol=2e-5, rtol=1e-4)


def test_adapters_sharing_a_pass_match_separate_passes(base: BaseLM):
    """Two models' work packed into one pass: each gets exactly its own result."""
    d1, d2 = _data(2, [6, 3]), _data(3, [5, 7, 4])
    m1, m2 = _model(base, seed=3), _model(base, seed=4)
    r1, r2 = forward_backward(
        base,
        [
            ForwardBackwardWork(m1, d1, LOSSES["cross_entropy"], {}, False),
            ForwardBackwardWork(m2, d2, LOSSES["cross_entropy"], {}, False),
        ],
        4096,
    )
    s1, s2 = _model(base, seed=3), _model(base, seed=4)
    [t1] = forward_backward(
        base, [ForwardBackwardWork(s1, d1, LOSSES["cross_entropy"], {}, False)], 4096
    )
    [t2] = forward_backward(
        base, [ForwardBackwardWork(s2, d2, LOSSES["cross_entropy"], {}, False)], 4096
    )
    assert r1.loss == pytest.approx(t1.loss, rel=1e-5)
    assert r2.loss == pytest.approx(t2.loss, rel=1e-5)
    for mine, alone in ((m1, s1), (m2, s2)):
        for (ga, gb), (ha, hb) in zip(_grads(mine).values(), _grads(alone).values(), strict=True):
            torch.testing.assert_close(ga, ha, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(gb, hb, atol=2e-5, rtol=1e-4)


def test_forward_only_leaves_no_gradient(base: BaseLM):
    model = _model(base, seed=5)
    [out] = forward_backward(
        base, [ForwardBackwardWork(model, _data(4, [5]), LOSSES["cross_entropy"], {}, True)], 64
    )
    assert out.loss != 0
    assert all(t.grad is None for t in model.adapter.parameters())
    assert model.pending_datums == 0


def test_fresh_adapter_reproduces_base_model(base: BaseLM):
    adapter = new_adapter(LoraSpec(8), base.layers, seed=0)
    assert all(not p.b.any() for p in adapter.pairs.values())
    data = _data(5, [7])
    [out] = forward_backward(
        base,
        [ForwardBackwardWork(LoraModel.create(adapter), data, LOSSES["cross_entropy"], {}, True)],
        64,
    )
    net = AutoModelForCausalLM.from_pretrained(base.folder, dtype=torch.float32).eval()
    logits = net(torch.from_numpy(data[0].tokens)[None]).logits[0]
    expected = torch.log_softmax(logits, -1).gather(
        -1, torch.from_numpy(data[0].inputs["target_tokens"])[:, None]
    )[:, 0]
    np.testing.assert_allclose(out.logprobs[0], expected.detach().numpy(), atol=2e-6)


def test_two_dimensional_targets(base: BaseLM):
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 250, 6).astype(np.int64)
    targets = rng.integers(0, 250, (6, 3)).astype(np.int64)
    weights = rng.random((6, 3)).astype(np.float32)
    datum = Datum(tokens, {"target_tokens": targets, "weights": weights})
    model = _model(base, seed=6)
    [out] = forward_backward(
        base, [ForwardBackwardWork(model, [datum], LOSSES["cross_entropy"], {}, True)], 64
    )
    ref = _Reference(base.folder, model).logprobs(datum).detach().numpy()
    assert out.logprobs[0].shape == (6, 3)
    np.testing.assert_allclose(out.logprobs[0], ref, atol=2e-6)
    assert out.loss == pytest.approx(float(-(ref * weights).sum()), rel=1e-5)


@pytest.mark.parametrize(
    ("flags", "leaves"),
    [
        (
            {},
            {
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "lm_head",
            },
        ),
        (
            {"train_unembed": False},
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        ),
        ({"train_mlp": False, "train_unembed": False}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ({"train_attn": False, "train_unembed": False}, {"gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_lora_targets_follow_train_flags(base: BaseLM, flags: dict[str, bool], leaves: set[str]):
    adapter = new_adapter(LoraSpec(5, **flags), base.layers, seed=0)
    assert {path.rsplit(".", 1)[-1] for path in adapter.pairs} == leaves
    layers = base.model.config.num_hidden_layers
    per_layer = len(leaves - {"lm_head"})
    assert len(adapter.pairs) == per_layer * layers + ("lm_head" in leaves)
    for pair in adapter.pairs.values():
        assert pair.a.shape[0] == 5 and pair.b.shape[1] == 5


def _adamw_reference(params, grads_per_step, hypers):
    """AdamW written out from the formula (decoupled decay, bias correction, global clip)."""
    params = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, (grads, h) in enumerate(zip(grads_per_step, hypers, strict=True), start=1):
        grads = [g.clone() for g in grads]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        if h.grad_clip_norm > 0 and norm > h.grad_clip_norm:
            grads = [g * (h.grad_clip_norm / (norm + 1e-6)) for g in grads]
        for i, p in enumerate(params):
            p.mul_(1 - h.learning_rate * h.weight_decay)
            m[i] = h.beta1 * m[i] + (1 - h.beta1) * grads[i]
            v[i] = h.beta2 * v[i] + (1 - h.beta2) * grads[i] ** 2
            m_hat = m[i] / (1 - h.beta1**t)
            v_hat = v[i] / (1 - h.beta2**t)
            p.sub_(h.learning_rate * m_hat / (v_hat.sqrt() + h.eps))
    return params


def test_optim_step_is_adamw_with_every_param(base: BaseLM):
    model = _model(base, seed=7)
    start = [p.detach().clone() for p in model.adapter.parameters()]
    hypers = [
        AdamParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=0.5),
        AdamParams(learning_rate=5e-3, beta1=0.8, beta2=0.9, eps=1e-6, grad_clip_norm=0.0),
        AdamParams(learning_rate=2e-3, weight_decay=0.0, grad_clip_norm=1e6),
    ]
    grads_per_step = []
    for step, h in enumerate(hypers):
        forward_backward(
            base,
            [
                ForwardBackwardWork(
                    model, _data(10 + step, [6, 4]), LOSSES["cross_entropy"], {}, False
                )
            ],
            64,
        )
        grads_per_step.append([p.grad.clone() for p in model.adapter.parameters()])
        metrics = optim_step(model, h)
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads_per_step[-1]))
        assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-4)
        assert all(p.grad is None for p in model.adapter.parameters())
    expected = _adamw_reference(start, grads_per_step, hypers)
    for got, want in zip(model.adapter.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)
    assert any(
        not torch.equal(p.detach(), s)
        for p, s in zip(model.adapter.parameters(), start, strict=True)
    )


def test_a_datum_longer_than_the_budget_is_recomputed_not_stored(
    base: BaseLM, monkeypatch: pytest.MonkeyPatch
):
    """Such a pass runs with activation checkpointing: each layer runs again in backward."""
    mlp = base.backbone.layers[-1].mlp
    calls: list[int] = []
    original = mlp.forward

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", counted)
    data = _data(8, [10])
    work = ForwardBackwardWork(_model(base, 8), data, LOSSES["cross_entropy"], {}, False)
    forward_backward(base, [work], 4)
    assert len(calls) == 2
    calls.clear()
    forward_backward(base, [work], 64)
    assert len(calls) == 1
