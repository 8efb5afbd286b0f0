"""Tinker's built-in losses, one small function each, per datum.

Every function takes the learner's target-token log-probabilities ``lp`` (same shape as
``target_tokens``: ``(N,)`` or ``(N, K)``), the datum's ``loss_fn_inputs`` as float32
tensors, and the loss config; it returns the datum's loss as a scalar **sum over tokens**.
The request's loss is the sum over its datums: Tinker never averages, so the SDK can add
the losses of the chunks it splits a batch into.

Alignment is the caller's business: position ``i`` of ``model_input`` predicts
``target_tokens[i]``; nothing here shifts anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

Inputs = Mapping[str, Tensor]
Config = Mapping[str, float]


def _clip(ratio: Tensor, inputs: Inputs, config: Config) -> Tensor:
    """``clip(ratio, lo, hi)``; per-token bounds in ``loss_fn_inputs`` win over the config."""
    lo = inputs.get("clip_low_threshold", config["clip_low_threshold"])
    hi = inputs.get("clip_high_threshold", config["clip_high_threshold"])
    lo_t = torch.as_tensor(lo, dtype=ratio.dtype, device=ratio.device)
    hi_t = torch.as_tensor(hi, dtype=ratio.dtype, device=ratio.device)
    return torch.clamp(ratio, lo_t, hi_t)


def cross_entropy(lp: Tensor, inputs: Inputs, config: Config) -> Tensor:
    """``loss = Σ_t -w_t · log p(x_t)``; weights are any reals (the custom-loss
    surrogate sends ``-dC/dlp``), and default to ones when the datum carries none."""
    weights = inputs.get("weights")
    if weights is None:
        return -lp.sum()
    return -(lp * weights).sum()


def importance_sampling(lp: Tensor, inputs: Inputs, config: Config) -> Tensor:
    """``loss = -Σ_t exp(log p - log q) · A_t`` with sampler logprobs ``log q``."""
    ratio = torch.exp(lp - inputs["logprobs"])
    return -(ratio * inputs["advantages"]).sum()


def ppo(lp: Tensor, inputs: Inputs, config: Config) -> Tensor:
    """``loss = -Σ_t min(r_t A_t, clip(r_t, lo, hi) A_t)``, ``r_t = exp(log p - log q)``."""
    adv = inputs["advantages"]
    ratio = torch.exp(lp - inputs["logprobs"])
    clipped = _clip(ratio, inputs, config)
    return -torch.min(ratio * adv, clipped * adv).sum()


def cispo(lp: Tensor, inputs: Inputs, config: Config) -> Tensor:
    """``loss = -Σ_t sg[clip(r_t, lo, hi)] · log p(x_t) · A_t``: the clipped ratio only
    weights the log-likelihood gradient, so no token's gradient is ever zeroed."""
    ratio = torch.exp(lp - inputs["logprobs"])
    weight = _clip(ratio, inputs, config).detach()
    return -(weight * lp * inputs["advantages"]).sum()


def dro(lp: Tensor, inputs: Inputs, config: Config) -> Tensor:
    """``loss = -Σ_t (log p · A_t - ½β (log p - log q)²)``. The quadratic term is not
    multiplied by the advantage, so zero-advantage (prompt) positions still contribute."""
    beta = config["beta"]
    quadratic = (lp - inputs["logprobs"]) ** 2
    return -(lp * inputs["advantages"] - 0.5 * beta * quadratic).sum()


def gspo(lp: Tensor, inputs: Inputs, config: Config) -> Tensor:
    """GSPO-token: every token carries the sequence ratio
    ``s = exp(mean_{t∈M}(log p - log q))`` (``M`` = ``sequence_ratio_mask != 0``) but the
    gradient of its own log-probability; then PPO's clipped objective, summed."""
    in_ratio = inputs["sequence_ratio_mask"] != 0
    log_ratio = (lp.detach() - inputs["logprobs"])[in_ratio].mean()
    ratio = torch.exp(log_ratio + lp - lp.detach())
    adv = inputs["advantages"]
    clipped = _clip(ratio, inputs, config)
    return -torch.min(ratio * adv, clipped * adv).sum()


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs: the per-datum function, the ``loss_fn_inputs`` it requires
    (all shaped like ``target_tokens``), the optional ones it reads, and its config keys
    with their defaults."""

    fn: Callable[[Tensor, Inputs, Config], Tensor]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    config: Mapping[str, float] = field(default_factory=dict)


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")

# CISPO's default follows tutorial 202, which treadle is built from ("PPO and CISPO accept
# loss_fn_config to override the default clip thresholds (0.8 and 1.2)"); pass
# {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0} for the one-sided variant.
# DRO's beta default (0.05) is the value Thinking Machines' loss comparison lists; the
# docs leave it unstated.
LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, ("target_tokens",), ("weights",)),
    "importance_sampling": LossSpec(importance_sampling, _RL_INPUTS),
    "ppo": LossSpec(ppo, _RL_INPUTS, _CLIP_INPUTS, _CLIP),
    "cispo": LossSpec(cispo, _RL_INPUTS, _CLIP_INPUTS, _CLIP),
    "dro": LossSpec(dro, _RL_INPUTS, (), {"beta": 0.05}),
    "gspo": LossSpec(gspo, (*_RL_INPUTS, "sequence_ratio_mask"), _CLIP_INPUTS, _CLIP),
}
