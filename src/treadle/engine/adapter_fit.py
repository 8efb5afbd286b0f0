"""Whether a PEFT LoRA folder fits a base model, judged without loading the base weights.

The model is built on the meta device (shapes, no memory) and wrapped as a served one is,
and the adapter is read by the same :func:`~treadle.engine.checkpoint.load_adapter` the
server loads checkpoints with, so a folder that passes here loads there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from treadle.engine.checkpoint import load_adapter
from treadle.engine.families import family_of
from treadle.engine.lora import wrap_linears


def check_fits(adapter_folder: Path, model_folder: Path) -> None:
    """Raise :class:`~treadle.engine.adapter_config.CheckpointError` unless every tensor
    of the adapter in ``adapter_folder`` has the shape of a LoRA pair of the model in
    ``model_folder``."""
    config = AutoConfig.from_pretrained(model_folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    load_adapter(adapter_folder, wrap_linears(model, family_of(config.model_type)))
