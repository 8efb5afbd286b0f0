"""The model-family table against the real architectures it describes: every family has
a tiny model, and what the table says of each (module names, biases, norms) is what a
transformers model of that family has."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny_models import ARCHS, make_tiny_model
from treadle.engine.adapter_config import read_spec, write_config
from treadle.engine.families import FAMILIES
from treadle.engine.models import load_base_model
from treadle.types import LoraSpec


def test_every_family_has_a_tiny_model():
    # Adding a family is one FAMILIES entry plus its tiny model (ARCHS), which the
    # engine's tests are parametrised over.
    assert set(FAMILIES) == set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_table_matches_the_architecture(tmp_path: Path, arch: str):
    family = FAMILIES[arch]
    base = load_base_model("tiny", str(make_tiny_model(tmp_path / arch, arch)), tmp_path)
    assert base.family is family
    layers = family.backbone(base.model).layers
    leaves = {path.rsplit(".", 1)[-1] for path in base.layers}
    assert leaves == family.lora_modules()
    assert len(base.layers) == len(layers) * (len(leaves) - 1) + 1
    for layer in layers:
        attn = getattr(layer, family.attention)
        for name in family.attn_modules[:3]:
            assert (getattr(attn, name).base.bias is not None) == family.qkv_bias
        assert hasattr(attn, "q_norm") == family.qk_norm
        for norm in (family.input_norm, family.post_attention_norm):
            assert hasattr(getattr(layer, norm), "weight")
        mlp = getattr(layer, family.mlp)
        assert all(hasattr(mlp, name) for name in family.mlp_modules)


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"train_unembed": False},
        {"train_attn": False},
        {"train_mlp": False, "train_unembed": False},
    ],
)
def test_adapter_config_round_trips(tmp_path: Path, flags: dict[str, bool]):
    spec = LoraSpec(8, **flags)
    for family in FAMILIES.values():
        write_config(tmp_path, spec, family, "Org/Model")
        assert read_spec(tmp_path) == (spec, "Org/Model")
