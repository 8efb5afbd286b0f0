from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures.tiny_models import ARCHS, make_tiny_model

TEXT = "Hello wörld 🙂"
EXPECTED_CLASS = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_folder_reloads_with_consistent_tokenizer(tmp_path: Path, arch: str) -> None:
    folder = make_tiny_model(tmp_path / arch, arch)

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    assert type(model).__name__ == EXPECTED_CLASS[arch]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size >= len(tokenizer)
    assert model.config.vocab_size % 64 == 0
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == list(TEXT.encode())  # one id per UTF-8 byte, no special tokens added
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.convert_ids_to_tokens(model.config.eos_token_id) == "<|im_end|>"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(tokenizer, name)
        assert getattr(model.generation_config, name) == getattr(tokenizer, name)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_a_function_of_the_seed(tmp_path: Path, arch: str) -> None:
    reference = _logits(make_tiny_model(tmp_path / "a", arch, seed=1))

    assert torch.equal(_logits(make_tiny_model(tmp_path / "b", arch, seed=1)), reference)
    assert not torch.allclose(_logits(make_tiny_model(tmp_path / "c", arch, seed=2)), reference)


def test_options_shape_the_model(tmp_path: Path) -> None:
    folder = make_tiny_model(
        tmp_path,
        "llama",
        vocab_size=1000,
        hidden_size=128,
        num_layers=3,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_pretrained(folder)

    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (1000, 128, 3)
    assert config.max_position_embeddings == 64
    assert config.num_attention_heads == 2 * config.num_key_value_heads
    assert config.hidden_size // config.num_attention_heads >= 16
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_rejects_a_vocab_smaller_than_the_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_model(tmp_path, vocab_size=128)
