"""The checks that turn bad training data (:class:`~treadle.types.Datum`) and loss
choices into user errors, naming the datum and the fix. They run before a request is
queued, so a rejected request never touches a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

from treadle.engine.losses import LOSSES, Config, Inputs, LossSpec
from treadle.errors import UserInputError
from treadle.types import Datum


def _runs_elsewhere(lp: Tensor, inputs: Inputs, config: Config) -> Tensor:
    raise AssertionError("a custom loss runs through treadle.engine.custom_loss")


# ``custom``: what every uploaded loss needs, checked here like a built-in loss's data; its
# own inputs are checked against its graph (treadle.engine.custom_graph.check_data).
_CUSTOM = LossSpec(_runs_elsewhere, ("target_tokens",))


def loss_spec(loss_fn: str) -> LossSpec:
    if loss_fn == "custom":
        return _CUSTOM
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise UserInputError(
            f"loss_fn {loss_fn!r} is not supported by treadle; use one of"
            f" {', '.join(LOSSES)}, or forward_backward_custom for anything else"
        )
    return spec


def resolve_config(
    spec: LossSpec, loss_fn: str, config: Mapping[str, float | str]
) -> dict[str, float]:
    """The loss's config with defaults filled in; unknown keys and non-numbers are errors
    (a misspelt key would otherwise silently train with the default)."""
    resolved = dict(spec.config)
    for key, value in config.items():
        if key not in spec.config:
            known = ", ".join(spec.config) or "none"
            raise UserInputError(
                f"loss_fn_config key {key!r} is not used by {loss_fn}; its keys are: {known}"
            )
        if isinstance(value, str) or not np.isfinite(value):
            raise UserInputError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        resolved[key] = float(value)
    return resolved


def check_data(
    data: Sequence[Datum], spec: LossSpec, loss_fn: str, vocab_size: int, max_context: int
) -> None:
    """Reject anything the model or the loss cannot take, naming the datum and the fix."""
    if not data:
        raise UserInputError("forward_backward needs at least one Datum")
    for i, datum in enumerate(data):
        n = datum.num_tokens
        if datum.tokens.ndim != 1 or n == 0:
            raise UserInputError(f"datum {i}: model_input is empty; give it at least one token")
        if n > max_context:
            raise UserInputError(
                f"datum {i}: model_input has {n} tokens but the model's context is"
                f" {max_context}; shorten or split the sequence"
            )
        _check_vocab(f"datum {i}: model_input", datum.tokens, vocab_size)
        missing = [key for key in spec.required if key not in datum.inputs]
        if missing:
            raise UserInputError(
                f"datum {i}: loss_fn_inputs lacks {', '.join(missing)}, which {loss_fn}"
                f" requires (it takes {', '.join(spec.required + spec.optional)})"
            )
        targets = datum.inputs["target_tokens"]
        if targets.ndim not in (1, 2) or targets.shape[0] != n:
            raise UserInputError(
                f"datum {i}: target_tokens has shape {tuple(targets.shape)} but model_input has"
                f" {n} tokens; target_tokens must be ({n},) or ({n}, K) — position t of"
                " model_input predicts target_tokens[t]"
            )
        _check_vocab(f"datum {i}: target_tokens", targets, vocab_size)
        for key in spec.required + spec.optional:
            if key == "target_tokens" or key not in datum.inputs:
                continue
            values = datum.inputs[key]
            if values.shape != targets.shape:
                raise UserInputError(
                    f"datum {i}: loss_fn_inputs[{key!r}] has shape {tuple(values.shape)} but"
                    f" target_tokens has shape {tuple(targets.shape)}; give it one value per"
                    " target token"
                )
            if not np.isfinite(values).all():
                raise UserInputError(
                    f"datum {i}: loss_fn_inputs[{key!r}] contains NaN or infinity; every"
                    " value must be finite"
                )
        mask = datum.inputs.get("sequence_ratio_mask")
        if "sequence_ratio_mask" in spec.required and mask is not None and not mask.any():
            raise UserInputError(
                f"datum {i}: sequence_ratio_mask is zero everywhere, so {loss_fn} has no"
                " sequence ratio; mark the sampled tokens with 1"
            )


def _check_vocab(what: str, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)].flat[0]
        raise UserInputError(
            f"{what} contains token id {int(bad)}, outside the model's vocabulary"
            f" [0, {vocab_size}); tokenize with this model's tokenizer"
        )
