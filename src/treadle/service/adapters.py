"""``treadle adapters import``: a PEFT LoRA adapter trained elsewhere becomes a checkpoint.

The adapter becomes the ``weights`` checkpoint of a new training run owned by a user, laid
out as treadle's own saves are (``checkpoints/{model_id}/weights/{name}/`` holding
``adapter_config.json`` and ``adapter_model.safetensors``), so
``create_training_client_from_state`` continues training it and
``create_sampling_client(model_path=...)`` samples it like any checkpoint. It has no AdamW
state: ``create_training_client_from_state_with_optimizer`` refuses it.

Everything is checked before anything is written, each failure with a message that says
what to change. Base model identity is checked by name, not by shape: fine-tunes of one
architecture (and, at test scale, different families) share every shape, so an adapter of
another base model would load and silently compute something else. A mismatch of names
alone (the same weights under another name or folder) is accepted only when asked for.

Torch-free: whether the tensors fit the base model's layers is the engine's check, passed
in as ``fits``.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from treadle.engine.adapter_config import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    peft_config,
    staging_folder,
)
from treadle.engine.families import Family, UnsupportedFamily, family_of
from treadle.errors import StorageFull, UserInputError
from treadle.service.auth import LOCAL_USER, list_keys
from treadle.service.checkpoints import CheckpointPath
from treadle.service.store import CheckpointRow, Store, TrainingRunRow
from treadle.settings import EMBEDDED_DEFAULT, ModelEntry
from treadle.types import LoraSpec

# Sessions (and so training runs) an import creates; real sessions are ``sess-…``.
IMPORT_PREFIX = "import-"
# PEFT's tensor names: base_model.model.{module path}.lora_A.weight (and lora_B).
_TENSOR = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])\.weight$")
# PEFT options treadle's LoRA cannot represent, with the value that means "off".
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA adapters are not plain LoRA"),
    "bias": ("none", "trained biases are not LoRA weights"),
    "modules_to_save": (None, "fully trained modules are not LoRA weights"),
    "rank_pattern": ({}, "treadle gives every module the same rank"),
    "alpha_pattern": ({}, "treadle gives every module the same lora_alpha"),
    "fan_in_fan_out": (False, "treadle's families keep weights as [out, in]"),
}

Fits = Callable[[Path, Path], None]


def base_model_entry(store: Store, text: str) -> ModelEntry:
    """The base model ``--base-model`` names: ``NAME=SOURCE`` as ``serve --model`` takes
    it, a name a server on this data dir served (it recorded the folder), ``embedded``,
    or a model folder or hub id that is its own name."""
    if "=" in text:
        return ModelEntry.parse(text)
    folder = store.served_models().get(text)
    if folder is not None:
        return ModelEntry(text, folder)
    if text in ("embedded", EMBEDDED_DEFAULT.name):
        return EMBEDDED_DEFAULT
    return ModelEntry.parse(text)


def import_adapter(
    store: Store,
    data_dir: Path,
    folder: Path,
    base: ModelEntry,
    model_folder: Path,
    fits: Fits,
    name: str | None = None,
    user: str = LOCAL_USER,
    allow_other_base: bool = False,
) -> CheckpointPath:
    """Check ``folder`` against the base model ``base`` (whose weights are in
    ``model_folder``), then copy it in as a checkpoint of a new training run of ``user``.
    Raises :class:`UserInputError` (nothing written) for anything to change."""
    _check_user(store, user)
    if not folder.is_dir():
        raise UserInputError(f"{folder} does not exist or is not a folder")
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / file).is_file():
            raise UserInputError(
                f"{folder} has no {file}; give the folder peft's save_pretrained wrote"
                f" ({CONFIG_FILE} and {WEIGHTS_FILE}, safetensors only)"
            )
    session_id = f"{IMPORT_PREFIX}{secrets.token_hex(16)}"
    try:
        # Without --name, the folder's own name.
        path = CheckpointPath(f"{session_id}:train:0", "weights", name or folder.resolve().name)
    except UserInputError as exc:
        raise UserInputError(f"{exc}; give the import such a name with --name") from exc
    _check_new_name(store, user, path.name)
    family = _family(model_folder)
    config = _read_config(folder)
    rank, alpha = _rank_and_alpha(folder, config)
    if not allow_other_base:
        _check_base(config.get("base_model_name_or_path"), base, model_folder)
    modules = _check_tensors(folder, config, rank, family)
    fits(folder, model_folder)
    spec = LoraSpec(
        rank,
        alpha,
        train_attn=bool(modules & set(family.attn_modules)),
        train_mlp=bool(modules & set(family.mlp_modules)),
        train_unembed=family.unembed_module in modules,
    )
    target = path.folder(data_dir)
    size = _copy_in(folder, target, spec, family, base.name, sorted(modules))
    try:
        _record(store, path, session_id, spec, base.name, user, folder, size)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return path


def _check_user(store: Store, user: str) -> None:
    """The import must belong to someone who can reach it: a user with an active key, or
    ``local`` on a data dir without keys (then every client is ``local``)."""
    users = sorted({row.user for row in list_keys(store) if row.revoked_at is None})
    if users and user not in users:
        raise UserInputError(
            f"no active API key belongs to user {user!r}, so nobody could use the import;"
            f" create one first (`treadle keys create --user {user}`) or give --user one of:"
            f" {', '.join(users)}"
        )
    if not users and user != LOCAL_USER:
        raise UserInputError(
            f"this data dir has no API keys, so its server serves only the user"
            f" {LOCAL_USER!r}; omit --user, or create a key for {user!r} first"
            f" (`treadle keys create --user {user}`)"
        )


def _family(model_folder: Path) -> Family:
    try:
        model_type = json.loads((model_folder / "config.json").read_text())["model_type"]
        return family_of(str(model_type))
    except UnsupportedFamily as exc:
        raise UserInputError(f"the base model in {model_folder} is {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{model_folder} has no readable config.json: {exc!r}") from exc


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{folder} is a {config.get('peft_type')} adapter; treadle imports LoRA"
        )
    for key, (off, why) in _UNSUPPORTED.items():
        if config.get(key, off) not in (off, None, {}, [], False):
            raise CheckpointError(
                f"{folder}: {CONFIG_FILE} sets {key}={config[key]!r}, which treadle cannot"
                f" import ({why}); train the adapter with {key}={off!r}"
            )
    return config


def _rank_and_alpha(folder: Path, config: dict[str, Any]) -> tuple[int, float]:
    """The config's rank and the ``lora_alpha`` that gives treadle's scale (alpha / r)
    the adapter's scale (with rsLoRA, alpha / sqrt(r))."""
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CheckpointError(f"{folder}: {CONFIG_FILE} needs a positive integer r, got {rank!r}")
    if not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise CheckpointError(f"{folder}: {CONFIG_FILE} needs a positive lora_alpha, got {alpha!r}")
    if config.get("use_rslora"):
        return rank, float(alpha) * math.sqrt(rank)
    return rank, float(alpha)


def _check_base(named: object, base: ModelEntry, model_folder: Path) -> None:
    """The config's ``base_model_name_or_path`` must be the served name, its source, or
    the same model folder."""
    if named is None:
        return
    known = {base.name, base.source, str(model_folder)}
    if str(named) in known or _same_folder(str(named), model_folder):
        return
    raise CheckpointError(
        f"the adapter was made for {named!r} (base_model_name_or_path in {CONFIG_FILE}),"
        f" not {base.name!r} ({model_folder}); import it with --base-model naming that"
        " model, or, if both are the very same weights, add --allow-other-base"
    )


def _same_folder(named: str, model_folder: Path) -> bool:
    try:
        return Path(named).expanduser().resolve() == model_folder.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def _check_tensors(folder: Path, config: dict[str, Any], rank: int, family: Family) -> set[str]:
    """Every tensor is the A or B of a LoRA pair of rank ``rank`` on a module the family
    adapts, and every pair is whole; returns the adapted modules' leaf names."""
    adaptable = family.lora_modules()
    targets = config.get("target_modules")
    if isinstance(targets, list):
        foreign = sorted({str(t).rsplit(".", 1)[-1] for t in targets} - adaptable)
        if foreign:
            raise CheckpointError(
                f"{folder}: target_modules names {', '.join(foreign)}, which treadle does not"
                f" adapt (it adapts {', '.join(sorted(adaptable))}); train the adapter on those"
            )
    shapes = _tensor_shapes(folder / WEIGHTS_FILE)
    parts: dict[str, set[str]] = {}
    for key, shape in shapes.items():
        match = _TENSOR.match(key)
        if match is None and key.endswith((".base_layer.weight", "embed_tokens.weight")):
            raise CheckpointError(
                f"{folder}: {WEIGHTS_FILE} holds full weights ({key}), as peft saves them when"
                " an embedding or a tied output layer is adapted; treadle imports LoRA weights"
                " alone: save it again with save_pretrained(..., save_embedding_layers=False)"
            )
        if match is None:
            raise CheckpointError(
                f"{folder}: tensor {key!r} is not a LoRA weight treadle imports (expected"
                " base_model.model.MODULE.lora_A.weight or .lora_B.weight)"
            )
        module, part = match["path"], match["part"]
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in adaptable:
            raise CheckpointError(
                f"{folder}: {module} is adapted, but treadle adapts only"
                f" {', '.join(sorted(adaptable))}; train the adapter on those"
            )
        found = shape[0] if part == "A" else shape[-1]
        if len(shape) != 2 or found != rank:
            raise CheckpointError(
                f"{folder}: {key} has shape {list(shape)}, not rank {rank} as r in"
                f" {CONFIG_FILE} says; fix r (or the weights) so they agree"
            )
        parts.setdefault(module, set()).add(part)
    if not parts:
        raise CheckpointError(f"{folder}: {WEIGHTS_FILE} holds no LoRA weights")
    for module, have in sorted(parts.items()):
        if have != {"A", "B"}:
            raise CheckpointError(f"{folder}: {module} has lora_{min(have)} but not its pair")
    return {module.rsplit(".", 1)[-1] for module in parts}


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header (the file must read whole)."""
    try:
        with safe_open(path, framework="numpy") as tensors:
            names = tensors.keys()
            shapes = {key: tuple(tensors.get_slice(key).get_shape()) for key in names}
        expected = _data_end(path)
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if expected != path.stat().st_size:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: it is {path.stat().st_size} bytes,"
            f" its header describes {expected}; copy it again"
        )
    return shapes


def _data_end(path: Path) -> int:
    """Where the safetensors data ends, by its header (8-byte length, then JSON)."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return 8 + length + max(ends, default=0)


def _check_new_name(store: Store, user: str, name: str) -> None:
    """Names of one user's imports are unique, so running an import twice is refused
    rather than making a second copy."""
    for row in store.checkpoints_of(user):
        if row.name == name and row.model_id.startswith(IMPORT_PREFIX):
            raise UserInputError(
                f"you already imported an adapter as {name!r} ({row.tinker_path}); give"
                " another --name, or delete that checkpoint first"
            )


def _copy_in(
    folder: Path, target: Path, spec: LoraSpec, family: Family, base_model: str, modules: list[str]
) -> int:
    """Copy the weights byte for byte and write the config as treadle's saves do (its
    served base model name, scale as alpha / r), atomically; returns the bytes."""
    config = peft_config(spec, family, base_model) | {"target_modules": modules}
    try:
        staging = staging_folder(target)
        try:
            shutil.copyfile(folder / WEIGHTS_FILE, staging / WEIGHTS_FILE)
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError as exc:
        raise StorageFull(f"could not write {target}: {exc}; nothing was imported") from exc
    return sum(f.stat().st_size for f in target.iterdir())


def _record(
    store: Store,
    path: CheckpointPath,
    session_id: str,
    spec: LoraSpec,
    base_model: str,
    user: str,
    source: Path,
    size: int,
) -> None:
    """The finished session, training run and checkpoint rows of the import."""
    now = time.time()
    store.add_session(session_id, None, ["import"], {}, None, "treadle adapters import", user)
    store.finish_session(session_id, "imported")
    store.add_training_run(
        TrainingRunRow(
            model_id=path.model_id,
            session_id=session_id,
            base_model=base_model,
            lora_rank=spec.rank,
            train_attn=spec.train_attn,
            train_mlp=spec.train_mlp,
            train_unembed=spec.train_unembed,
            seed=None,
            user_metadata={"imported_from": str(source.resolve())},
            created_at=now,
            last_request_time=now,
            user=user,
        )
    )
    store.add_checkpoint(
        CheckpointRow(path.tinker_path, path.model_id, path.kind, path.name, now, size)
    )
