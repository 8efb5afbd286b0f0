"""Each built-in loss against an independent plain-torch transcription of the documented
formula (as Tinker documents it), on the same random logits: values and gradients."""

from __future__ import annotations

import pytest
import torch

from treadle.engine.losses import LOSSES


def _reference(
    name: str, lp: torch.Tensor, inp: dict[str, torch.Tensor], cfg: dict
) -> torch.Tensor:
    q, adv = inp.get("logprobs"), inp.get("advantages")
    if name == "cross_entropy":
        return (-lp * inp["weights"]).sum()
    ratio = torch.exp(lp - q)
    if name == "importance_sampling":
        return -(ratio * adv).sum()
    if name == "ppo":
        clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
        return -torch.min(ratio * adv, clipped * adv).sum()
    if name == "cispo":
        clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
        return -(clipped.detach() * lp * adv).sum()
    if name == "dro":
        return -(lp * adv - 0.5 * cfg["beta"] * (lp - q) ** 2).sum()
    if name == "gspo":
        mask = inp["sequence_ratio_mask"] != 0
        seq = torch.exp((lp.detach() - q)[mask].mean() + lp - lp.detach())
        clipped = torch.clamp(seq, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
        return -torch.min(seq * adv, clipped * adv).sum()
    raise AssertionError(name)


def _case(seed: int, n: int = 12, vocab: int = 17):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, vocab, (n,), generator=g)
    inputs = {
        "weights": torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.5,
        # Sampler logprobs near the learner's, so ratios land on both sides of the clips.
        "logprobs": torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        + torch.randn(n, generator=g, dtype=torch.float64) * 0.4,
        "advantages": torch.randn(n, generator=g, dtype=torch.float64),
        "sequence_ratio_mask": (torch.arange(n) >= 3).double(),
    }
    return logits, targets, inputs


CONFIGS = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": 0.05},
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}


def test_registry_has_exactly_the_documented_losses():
    assert set(LOSSES) == set(CONFIGS)
    for name, cfg in CONFIGS.items():
        assert dict(LOSSES[name].config) == cfg, name


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_value_and_gradient_match_formula(name: str, seed: int):
    logits, targets, inputs = _case(seed)
    cfg = CONFIGS[name]
    ours_logits = logits.clone().requires_grad_()
    lp = torch.log_softmax(ours_logits, -1).gather(-1, targets[:, None])[:, 0]
    ours = LOSSES[name].fn(lp, inputs, cfg)
    ours.backward()
    ref_logits = logits.clone().requires_grad_()
    ref_lp = torch.log_softmax(ref_logits, -1).gather(-1, targets[:, None])[:, 0]
    ref = _reference(name, ref_lp, inputs, cfg)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad, rtol=1e-10, atol=1e-12)
    assert ours_logits.grad.abs().sum() > 0


def test_ppo_clipping_changes_value_and_zeroes_clipped_gradients():
    lp = torch.tensor([-1.0, -1.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([-2.0, -1.0], dtype=torch.float64)  # ratio e ≈ 2.72 (clipped), 1
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss = LOSSES["ppo"].fn(lp, {"logprobs": q, "advantages": adv}, CONFIGS["ppo"])
    loss.backward()
    assert loss.item() == pytest.approx(-(1.2 + 1.0))
    assert lp.grad.tolist() == pytest.approx([0.0, -1.0])


def test_cispo_never_zeroes_gradients_where_ppo_does():
    lp = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    inputs = {
        "logprobs": torch.tensor([-2.0], dtype=torch.float64),
        "advantages": torch.ones(1, dtype=torch.float64),
    }
    LOSSES["cispo"].fn(lp, inputs, CONFIGS["cispo"]).backward()
    assert lp.grad.item() == pytest.approx(-1.2)


def test_per_token_clip_thresholds_override_config():
    lp = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    inputs = {
        "logprobs": torch.tensor([-2.0, -2.0], dtype=torch.float64),
        "advantages": torch.ones(2, dtype=torch.float64),
        "clip_high_threshold": torch.tensor([1.5, 2.0], dtype=torch.float64),
    }
    loss = LOSSES["ppo"].fn(lp, inputs, CONFIGS["ppo"])
    assert loss.item() == pytest.approx(-(1.5 + 2.0))


def test_cross_entropy_two_dimensional_targets():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (5, 3), generator=g)
    weights = torch.rand(5, 3, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(logits, -1).gather(-1, targets)
    expected = sum(
        -weights[t, k] * torch.log_softmax(logits[t], -1)[targets[t, k]]
        for t in range(5)
        for k in range(3)
    )
    assert LOSSES["cross_entropy"].fn(lp, {"weights": weights}, {}).item() == pytest.approx(
        float(expected)
    )


def test_cross_entropy_without_weights_weighs_every_token_one():
    lp = torch.tensor([-0.5, -1.5], dtype=torch.float64)
    assert LOSSES["cross_entropy"].fn(lp, {}, {}).item() == pytest.approx(2.0)
