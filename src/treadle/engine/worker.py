"""The engine's one seam: everything the service asks of a base model, in this process.

The service (torch-free) drives each served base model through a :class:`Worker`: check
a request, build and train adapters, save and load them, hand samples to the sampler. It
never touches a tensor; adapters and training models are opaque handles to it. All
methods but the ``check_*`` ones, which are pure checks of numpy data, run on the
model's engine-loop thread. (Several rank processes behind this same interface are the
way beyond one process.)
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from treadle.engine.checkpoint import load_adapter, load_optimizer_state, save_adapter
from treadle.engine.datum import check_data, loss_spec, resolve_config
from treadle.engine.lora import Adapter, new_adapter
from treadle.engine.models import BaseLM, load_base_model
from treadle.engine.process import claim_compute_threads, return_freed_memory
from treadle.engine.sample import Done, Progress, Sampler, SampleRequest
from treadle.engine.thin_matmul import set_thin_matmul
from treadle.engine.train import (
    ForwardBackwardOutcome,
    ForwardBackwardWork,
    LoraModel,
    forward_backward,
    optim_step,
)
from treadle.errors import UserInputError
from treadle.sampling_params import SampleLimits, SamplingParams
from treadle.settings import ModelEntry, Settings
from treadle.types import AdamParams, Datum, LoraSpec, ModelInfo


class Loss:
    """A checked loss choice: the built-in loss and its config with defaults filled in."""

    def __init__(self, loss_fn: str, config: dict[str, float | str]) -> None:
        self.spec = loss_spec(loss_fn)
        self.name = loss_fn
        self.config = resolve_config(self.spec, loss_fn, config)


class Worker:
    """One base model held in this process, its sampler, and its packed training passes."""

    def __init__(
        self,
        base: BaseLM,
        max_tokens_per_pass: int,
        max_batch: int,
        max_prefill_tokens: int,
        limits: SampleLimits,
    ) -> None:
        self.base = base
        self.info: ModelInfo = base.info
        self._max_tokens_per_pass = max_tokens_per_pass
        self._sampler = Sampler(base, base.decode, max_batch, max_prefill_tokens, limits)
        # Encoding may reconfigure the fast tokenizer, which must not happen on two
        # threads at once; decoding (the sampler's stop strings) reads it only.
        self._text_lock = threading.Lock()

    @staticmethod
    def claim_thread() -> None:
        """Give the calling (engine-loop) thread the compute cores."""
        claim_compute_threads()

    @staticmethod
    def release_memory() -> None:
        """Return memory freed by dropped models and adapters to the OS. A finished
        sample's request and sequences refer to each other, so adapters they held are
        only freed by the cycle collector: collect first, then trim."""
        gc.collect()
        return_freed_memory()

    # -- training ---------------------------------------------------------------------

    def check_forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, float | str]
    ) -> Loss:
        loss = Loss(loss_fn, loss_fn_config)
        check_data(data, loss.spec, loss_fn, self.base.vocab_size, self.base.max_context)
        return loss

    @staticmethod
    def work(
        model: LoraModel, data: Sequence[Datum], loss: Loss, forward_only: bool
    ) -> ForwardBackwardWork:
        return ForwardBackwardWork(model, data, loss.spec, loss.config, forward_only)

    def forward_backward(
        self, works: list[ForwardBackwardWork], pause: Callable[[], None]
    ) -> list[ForwardBackwardOutcome]:
        """One clock cycle: every request's data in shared packed passes, offering
        ``pause`` between passes and between their layers (forward and backward)."""
        return forward_backward(self.base, works, self._max_tokens_per_pass, pause)

    def new_model(self, spec: LoraSpec, seed: int | None) -> LoraModel:
        return LoraModel.create(new_adapter(spec, self.base.layers, seed))

    @staticmethod
    def optim_step(model: LoraModel, params: AdamParams) -> dict[str, float]:
        if model.pending_datums == 0:
            raise UserInputError(
                "optim_step with no gradients: call forward_backward since the last"
                " optim_step first (forward() computes no gradients)"
            )
        return optim_step(model, params)

    @staticmethod
    def spec_of(model: LoraModel) -> LoraSpec:
        return model.adapter.spec

    @staticmethod
    def snapshot(model: LoraModel) -> Adapter:
        """A frozen copy of the model's adapter for samplers (later steps don't reach it)."""
        return model.adapter.detached()

    def save_model(self, folder: Path, model: LoraModel) -> int:
        """Write ``model``'s adapter and AdamW state as a PEFT folder; returns its bytes."""
        family, name = self.base.family, self.base.name
        return save_adapter(model.adapter, folder, family, name, model.optimizer)

    def save_adapter(self, folder: Path, adapter: Adapter) -> int:
        """Write ``adapter`` alone as a PEFT folder; returns its size in bytes."""
        return save_adapter(adapter, folder, self.base.family, self.base.name)

    def load(self, folder: Path, with_optimizer: bool) -> LoraModel:
        """A training model from a checkpoint folder, with its AdamW state when asked for."""
        model = LoraModel.create(load_adapter(folder, self.base.layers))
        if with_optimizer:
            state = load_optimizer_state(folder)
            if state is None:
                raise UserInputError(
                    f"{folder.name} has no optimizer state (a save_weights_for_sampler"
                    " checkpoint, or an imported adapter); load it without the optimizer"
                    " (create_training_client_from_state), or save one with save_state"
                )
            model.optimizer.load_state_dict(state)
        return model

    def load_adapter(self, folder: Path) -> Adapter:
        """A frozen adapter from a checkpoint folder, for a sampler."""
        return load_adapter(folder, self.base.layers).detached()

    # -- sampling ---------------------------------------------------------------------

    def add_sample(
        self,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        adapter: Adapter | None,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        done: Done,
        progress: Progress | None = None,
    ) -> None:
        """Queue a sample; ``done`` gets its result, and ``progress`` (when given: a
        streaming request) each step's new tokens, both on this (the engine) thread."""
        request = SampleRequest(
            prompt, num_samples, params, adapter, prompt_logprobs, topk_prompt_logprobs, progress
        )
        self._sampler.add(request, done)

    def sampling(self) -> bool:
        """Whether sampling requests are waiting or running."""
        return self._sampler.has_work()

    def sample_step(self) -> None:
        """Admit waiting samples and advance every running one by a token."""
        self._sampler.step()

    # -- text (any thread) --------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """``text``'s token ids, with the special tokens the tokenizer adds by default
        (as ``tokenizer.encode`` does for an SDK user)."""
        with self._text_lock:
            return list(self.base.tokenizer.encode(text))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.base.decode(tokens)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt tokens of ``messages`` in the model's own chat template, ending
        with the assistant's turn opened."""
        with self._text_lock:
            return chat_prompt_tokens(self.base.tokenizer, self.info.name, messages)


def chat_prompt_tokens(
    tokenizer: PreTrainedTokenizerBase, model: str, messages: list[dict[str, str]]
) -> list[int]:
    """The prompt tokens of ``messages`` in ``tokenizer``'s chat template, ending with the
    assistant's turn opened (the caller holds its tokenizer's lock)."""
    if not tokenizer.chat_template:
        raise UserInputError(f"{model} has no chat template; use /completions with a prompt")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template's own checks (roles, order) fail here
        raise UserInputError(f"the chat template refused the messages: {exc}") from exc
    # The template writes the special tokens (a BOS) itself.
    return list(tokenizer.encode(str(text), add_special_tokens=False))


def load_worker(entry: ModelEntry, settings: Settings) -> Worker:
    """Load a served base model (blocking: seconds to minutes) into a worker."""
    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    base = load_base_model(entry.name, entry.source, settings.data_dir, settings.device, dtype)
    return worker_for(base, settings)


def worker_for(base: BaseLM, settings: Settings) -> Worker:
    """A worker over ``base`` as loaded (a sharded group's rank shards it first: its
    sampler must be built on the sharded model)."""
    set_thin_matmul(settings.thin_matmul)
    return Worker(
        base,
        settings.max_tokens_per_pass,
        settings.sampler_max_batch,
        settings.sampler_max_prefill_tokens,
        SampleLimits.of(settings),
    )
