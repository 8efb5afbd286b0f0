"""Adapters on disk as PEFT folders, so peft, vLLM and the cookbook's weight tools load
them as they are: ``adapter_config.json`` + ``adapter_model.safetensors`` (and, for
``save_state``, the AdamW state beside them in ``optimizer.pt``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from treadle.engine.adapter_config import (
    WEIGHTS_FILE,
    CheckpointError,
    read_spec,
    staging_folder,
    write_config,
)
from treadle.engine.families import Family
from treadle.engine.lora import Adapter, LoraLinear, LoraPair
from treadle.errors import StorageFull

OPTIMIZER_FILE = "optimizer.pt"
# PEFT prefixes every module path of the wrapped model with this.
_PEFT_PREFIX = "base_model.model."


def save_adapter(
    adapter: Adapter,
    folder: Path,
    family: Family,
    base_model: str,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Write ``adapter`` (and the optimizer state, if given) as a PEFT folder, atomically:
    a crash never leaves a half-written checkpoint under ``folder``. Returns its size in
    bytes."""
    try:
        staging = staging_folder(folder)
    except OSError as exc:
        raise _unwritable(folder, exc) from exc
    try:
        tensors: dict[str, torch.Tensor] = {}
        for path, pair in adapter.pairs.items():
            tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = pair.a.detach().cpu().contiguous()
            tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = pair.b.detach().cpu().contiguous()
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        write_config(staging, adapter.spec, family, base_model)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _unwritable(folder, exc) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in folder.iterdir())


def _unwritable(folder: Path, exc: Exception) -> StorageFull:
    return StorageFull(
        f"could not write {folder.name}: {exc}; nothing was changed, save again once"
        " the server's data dir has room and is writable"
    )


def load_adapter(folder: Path, layers: dict[str, LoraLinear]) -> Adapter:
    """Read a PEFT LoRA folder into an :class:`Adapter` over ``layers``; every tensor must
    fit the base model's shapes."""
    spec, _ = read_spec(folder)
    try:
        tensors = load_file(folder / WEIGHTS_FILE)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} has no readable {WEIGHTS_FILE}: {exc}") from exc
    adapter = Adapter(spec)
    for path, layer in layers.items():
        key = f"{_PEFT_PREFIX}{path}"
        a, b = tensors.pop(f"{key}.lora_A.weight", None), tensors.pop(f"{key}.lora_B.weight", None)
        if a is None or b is None:
            continue
        base = layer.base
        if a.shape != (spec.rank, base.in_features) or b.shape != (base.out_features, spec.rank):
            raise CheckpointError(
                f"{folder}: {path} has LoRA shapes {tuple(a.shape)}, {tuple(b.shape)}, which do"
                f" not fit this base model's {base.out_features}x{base.in_features} layer"
            )
        a, b = a.float().to(base.weight.device), b.float().to(base.weight.device)
        adapter.pairs[path] = LoraPair(a.requires_grad_(), b.requires_grad_())
    if tensors:
        unknown = ", ".join(sorted(tensors)[:3])
        raise CheckpointError(f"{folder}: tensors for modules this base model lacks: {unknown}")
    if not adapter.pairs:
        raise CheckpointError(f"{folder} holds no LoRA weights")
    return adapter


def load_optimizer_state(folder: Path) -> dict[str, Any] | None:
    path = folder / OPTIMIZER_FILE
    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state
