"""A served base model as the service sees it: what the API reports about it, the worker
that computes on it (:mod:`treadle.engine.worker`, behind the :class:`Worker` protocol)
and the engine loop that feeds that worker."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from treadle.errors import UserInputError
from treadle.sampling_params import SamplingParams
from treadle.types import AdamParams, Datum, LoraSpec, ModelInfo, SampleResult

if TYPE_CHECKING:
    from treadle.service.engine_loop import EngineLoop

# Opaque to the service: the engine's training model (adapter + AdamW state), a frozen
# adapter for samplers, a checked loss, a forward/backward work item and its outcome.
TrainingModel = Any
Adapter = Any
SampleDone = Callable[[SampleResult | BaseException], None]
# A streaming sample's new tokens, ``(sequence index, token, logprob)`` each, after each
# decode step and before ``done``; called on an engine thread (hop to the event loop).
SampleProgress = Callable[[list[tuple[int, int, float]]], None]


class Outcome(Protocol):
    logprobs: list[Any]
    loss: float
    metrics: dict[str, float]  # a custom loss's custom/… metrics
    error: str | None  # a custom loss that failed (the user's error); nothing accumulated


class Worker(Protocol):
    """What the service asks of a base model's engine. ``check_*`` may run on any
    thread; everything else runs on the model's engine-loop thread."""

    info: ModelInfo

    def claim_thread(self) -> None: ...
    def release_memory(self) -> None: ...
    def check_forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, float | str]
    ) -> Any: ...
    def work(
        self, model: TrainingModel, data: Sequence[Datum], loss: Any, forward_only: bool
    ) -> Any: ...
    def forward_backward(
        self, works: list[Any], pause: Callable[[], None]
    ) -> Sequence[Outcome]: ...
    def new_model(self, spec: LoraSpec, seed: int | None) -> TrainingModel: ...
    def optim_step(self, model: TrainingModel, params: AdamParams) -> dict[str, float]: ...
    def spec_of(self, model: TrainingModel) -> LoraSpec: ...
    def snapshot(self, model: TrainingModel) -> Adapter: ...
    def save_model(self, folder: Path, model: TrainingModel) -> int: ...
    def save_adapter(self, folder: Path, adapter: Adapter) -> int: ...
    def load(self, folder: Path, with_optimizer: bool) -> TrainingModel: ...
    def load_adapter(self, folder: Path) -> Adapter: ...
    def add_sample(
        self,
        prompt: Any,
        num_samples: int,
        params: SamplingParams,
        adapter: Adapter | None,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        done: SampleDone,
        progress: SampleProgress | None = None,
    ) -> None: ...
    def sampling(self) -> bool: ...
    def sample_step(self) -> None: ...
    # The model's tokenizer, for APIs that speak text (the OpenAI-compatible one); any
    # thread. A chat template that cannot render ``messages`` raises UserInputError.
    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]: ...


@dataclass
class ServedModel:
    worker: Worker
    loop: EngineLoop

    @property
    def info(self) -> ModelInfo:
        return self.worker.info


def find_model(models: Mapping[str, ServedModel], base_model: str) -> ServedModel:
    """The served model called ``base_model``; a user error naming the served ones if none."""
    model = models.get(base_model)
    if model is None:
        raise UserInputError(
            f"base model {base_model!r} is not served here; served models: {', '.join(models)}"
        )
    return model
