"""A checkpoint's ``adapter_config.json``: PEFT's description of a LoRA adapter.

Torch-free, so the service can learn a checkpoint's base model and shape before it picks
the worker that loads its tensors (:mod:`treadle.engine.checkpoint`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from treadle.engine.families import FAMILIES, Family
from treadle.errors import UserInputError
from treadle.types import LoraSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole saved adapter (a save renames its staging folder
    into place only when complete; a folder lost or emptied since is not one)."""
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def staging_folder(folder: Path) -> Path:
    """A new hidden sibling of ``folder`` that a save writes into before renaming it to
    ``folder`` (checkpoint names start with a letter or digit, so it is never one)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))


def interrupted_saves(checkpoints: Path) -> list[Path]:
    """Staging folders under ``checkpoints/RUN/KIND/`` that a crash left behind."""
    return sorted(p for p in checkpoints.glob("*/*/.*") if p.is_dir())


class CheckpointError(UserInputError):
    """A folder that is not a loadable adapter; the message says why."""


def peft_config(spec: LoraSpec, family: Family, base_model: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(family.targets(spec)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def write_config(folder: Path, spec: LoraSpec, family: Family, base_model: str) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config(spec, family, base_model), indent=2))


def read_spec(folder: Path) -> tuple[LoraSpec, str | None]:
    """The adapter's shape and the base model it was trained on (PEFT's config)."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{folder} is a {config.get('peft_type')} adapter, not LoRA")
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
        targets = {str(t).rsplit(".", 1)[-1] for t in config.get("target_modules") or ()}
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{folder} has no readable {CONFIG_FILE}: {exc!r}") from exc
    # The families share their module names; a name any of them adapts sets its flag.
    attn = {name for family in FAMILIES.values() for name in family.attn_modules}
    mlp = {name for family in FAMILIES.values() for name in family.mlp_modules}
    unembed = {family.unembed_module for family in FAMILIES.values()}
    spec = LoraSpec(
        rank=rank,
        alpha=alpha,
        train_attn=bool(targets & attn),
        train_mlp=bool(targets & mlp),
        train_unembed=bool(targets & unembed),
    )
    return spec, config.get("base_model_name_or_path")
