"""The data that crosses layers, torch-free: the server decodes requests into these, the
service checks and queues them, the engine computes on them and answers with them.

Arrays are numpy; tensors exist only inside :mod:`treadle.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What the API reports about a served base model."""

    name: str  # what clients call it (the hub id, e.g. Qwen/Qwen3-4B-Instruct-2507)
    arch: str  # its family (llama, qwen2, qwen3)
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]  # where sampling stops unless told otherwise
    tokenizer_dir: Path  # a local folder: clients load the tokenizer offline from it


@dataclass
class Datum:
    """The SDK's ``Datum`` with its text tokens flattened and every ``loss_fn_inputs``
    tensor dense: ``target_tokens`` int64, everything else float32."""

    tokens: np.ndarray  # int64 [N]: model_input
    inputs: dict[str, np.ndarray]  # loss_fn_inputs: target_tokens int64 [N] or [N, K]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class LoraSpec:
    """The shape of an adapter, as chosen at ``create_model``; which module names each
    flag covers is the model family's business (:mod:`treadle.engine.families`)."""

    rank: int
    # Tinker's LoRA scale is alpha / rank with alpha fixed at 32 (the cookbook's
    # learning-rate heuristics assume it); recorded in every checkpoint as lora_alpha.
    alpha: float = 32.0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def covers(self, group: str) -> bool:
        """Whether the adapter has LoRA pairs on modules of ``group``."""
        return {"attn": self.train_attn, "mlp": self.train_mlp, "unembed": self.train_unembed}[
            group
        ]


@dataclass(frozen=True)
class AdamParams:
    """Tinker's AdamW hyper-parameters (its defaults differ from torch's: β2 0.95,
    eps 1e-12, no weight decay, no clipping)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass(frozen=True)
class ForwardBackwardResult:
    """What ``forward``/``forward_backward`` return: per-datum target logprobs and metrics
    (``name:reduction`` keys, as the SDK requires)."""

    logprobs: list[Any]  # numpy float32 arrays, one per datum, shaped like target_tokens
    metrics: dict[str, float]


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]  # log p(token) at temperature 1, unfiltered, unpenalised
    stop_reason: str  # "stop" (stop token or string) or "length" (max_tokens)


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: np.ndarray | None  # float32 [len(prompt)], NaN at position 0
    # (ids int32 [n, k], logprobs float32 [n, k]); row 0 empty: ids 0, logprobs -99999.0
    topk_prompt_logprobs: tuple[np.ndarray, np.ndarray] | None
