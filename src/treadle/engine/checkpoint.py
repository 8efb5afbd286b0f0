"""Adapters on disk as PEFT folders, so peft, vLLM and the cookbook's weight tools load
them as they are: ``adapter_config.json`` + ``adapter_model.safetensors`` (and, for
``save_state``, the AdamW state beside them in ``optimizer.pt``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from treadle.engine.lora import Adapter, LoraLinear, LoraPair, LoraSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
# PEFT prefixes every module path of the wrapped model with this.
_PEFT_PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """A folder that is not a loadable adapter; the message says why."""


def save_adapter(
    adapter: Adapter,
    folder: Path,
    base_model: str,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Write ``adapter`` (and the optimizer state, if given) as a PEFT folder, atomically:
    a crash never leaves a half-written checkpoint under ``folder``. Returns its size in
    bytes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        for path, pair in adapter.pairs.items():
            tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = pair.a.detach().cpu().contiguous()
            tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = pair.b.detach().cpu().contiguous()
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(
            json.dumps(_peft_config(adapter.spec, base_model), indent=2)
        )
        if optimizer is not None:
            torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in folder.iterdir())


def _peft_config(spec: LoraSpec, base_model: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(spec.targets()),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def read_spec(folder: Path) -> tuple[LoraSpec, str | None]:
    """The adapter's shape and the base model it was trained on (PEFT's config)."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} has no readable {CONFIG_FILE}: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{folder} is a {config.get('peft_type')} adapter, not LoRA")
    targets = {str(t).rsplit(".", 1)[-1] for t in config.get("target_modules") or ()}
    spec = LoraSpec(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", config["r"])),
        train_attn=bool(targets & {"q_proj", "k_proj", "v_proj", "o_proj"}),
        train_mlp=bool(targets & {"gate_proj", "up_proj", "down_proj"}),
        train_unembed="lm_head" in targets,
    )
    return spec, config.get("base_model_name_or_path")


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
        adapter.pairs[path] = LoraPair(a.float().requires_grad_(), b.float().requires_grad_())
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
