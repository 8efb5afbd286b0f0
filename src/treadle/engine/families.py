"""What differs between the model families treadle serves, in one table.

Each :class:`Family` says where a transformers model of that ``model_type`` keeps what
the engine touches: the LoRA target modules (named as PEFT names them in
``target_modules``), the decoder layers, the norms, and which optional parts it has
(Qwen2's q/k/v biases, Qwen3's per-head q/k norms). The supported-architecture check,
LoRA wrapping, checkpoint configs and the written-out decode stack all read it. Adding a
Llama-like family is one entry in :data:`FAMILIES` plus a tiny-model test
(``tests/fixtures/tiny_models.py``).

Torch-free: the service reads checkpoint configs through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from treadle.types import LoraSpec


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' config.model_type
    # LoRA targets, by the leaf names PEFT writes in target_modules.
    attn_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    unembed_module: str = "lm_head"
    # Inside a decoder layer: its attention and MLP blocks and its two norms.
    attention: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    # Optional parts: biases on q/k/v (Qwen2) and RMS norms per head on q and k (Qwen3).
    qkv_bias: bool = False
    qk_norm: bool = False

    def targets(self, spec: LoraSpec) -> tuple[str, ...]:
        """Leaf module names that get a LoRA pair, in PEFT's ``target_modules`` form."""
        names: list[str] = []
        if spec.train_attn:
            names += self.attn_modules
        if spec.train_mlp:
            names += self.mlp_modules
        if spec.train_unembed:
            names.append(self.unembed_module)
        return tuple(names)

    def lora_modules(self) -> frozenset[str]:
        """Every leaf name a LoRA pair may sit on."""
        return frozenset((*self.attn_modules, *self.mlp_modules, self.unembed_module))

    @staticmethod
    def backbone(model: Any) -> Any:
        """The decoder stack of a ``*ForCausalLM``: embeddings, layers, final norm."""
        return model.model


FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "qwen2": Family("qwen2", qkv_bias=True),
    "qwen3": Family("qwen3", qk_norm=True),
}


class UnsupportedFamily(ValueError):
    """A model of a family treadle does not serve."""


def family_of(model_type: str) -> Family:
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedFamily(
            f"a {model_type!r} model; treadle serves {', '.join(FAMILIES)} architectures"
        )
    return family
