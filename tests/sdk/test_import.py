"""``treadle adapters import``: a PEFT adapter made by peft itself becomes a checkpoint that
the SDK continues training and samples, computing what peft computes; bad folders are
refused with exit code 2 and a message, and nothing is written."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tinker import types
from transformers import AutoModelForCausalLM

from tests.conftest import API_KEY, LLAMA, QWEN
from tests.fixtures.server import Server
from tests.sdk.test_checkpoints import PROBE, _datum, _probe, _train
from tests.sdk.test_keys import _new_key


def _peft_adapter(
    base_folder: Path,
    out: Path,
    targets: list[str],
    rank: int = 4,
    seed: int = 0,
    save_embedding_layers: bool | str = "auto",
    **extra: object,
) -> Path:
    """An adapter as peft writes it, with random non-zero B (peft starts B at zero)."""
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **extra)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    return out


def _peft_logprobs(base_folder: Path, adapter: Path, tokens: list[int]) -> np.ndarray:
    """Golden values: peft's own PeftModel on the base model, float32, full log-softmax."""
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].double()
    targets = torch.tensor(tokens[1:])[:, None]
    return torch.log_softmax(logits, -1).gather(-1, targets)[:, 0].numpy()


def _import(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "treadle", "adapters", "import", str(folder), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _imported(data_dir: Path, folder: Path, *args: str) -> str:
    done = _import(folder, "--data-dir", str(data_dir), *args)
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip().splitlines()[-1]
    assert path.startswith("tinker://import-") and "/weights/" in path
    return path


def _state(data_dir: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    """What an import writes: files under checkpoints/, and the imported runs' rows."""
    files = sorted(str(p.relative_to(data_dir)) for p in (data_dir / "checkpoints").rglob("*"))
    db = sqlite3.connect(f"file:{data_dir / 'treadle.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT r.model_id, c.tinker_path FROM training_runs r LEFT JOIN checkpoints c"
            " ON c.model_id = r.model_id WHERE r.model_id LIKE 'import-%' ORDER BY 1, 2"
        ).fetchall()
    finally:
        db.close()
    return files, [tuple(row) for row in rows]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def qwen_adapter(tmp_path_factory, tiny_models) -> Path:
    out = tmp_path_factory.mktemp("peft") / "qwen-adapter"
    return _peft_adapter(tiny_models[QWEN], out, ["q_proj", "v_proj", "down_proj"])


def test_imported_adapter_trains_samples_and_matches_peft(
    service_client, server: Server, tiny_models, qwen_adapter: Path
):
    outside = _tree(qwen_adapter.parent)
    path = _imported(server.data_dir, qwen_adapter, "--base-model", QWEN, "--name", "from-peft")
    # Nothing outside the data dir changed; inside, the checkpoint lies where saves put it.
    assert _tree(qwen_adapter.parent) == outside
    run, kind, name = path.removeprefix("tinker://").split("/")
    assert (kind, name) == ("weights", "from-peft")
    folder = server.data_dir / "checkpoints" / run / kind / name
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = (folder / "adapter_model.safetensors").read_bytes()
    assert saved == (qwen_adapter / "adapter_model.safetensors").read_bytes()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == QWEN and config["r"] == 4
    assert config["lora_alpha"] == 8 and config["target_modules"] == [
        "down_proj",
        "q_proj",
        "v_proj",
    ]

    expected = _peft_logprobs(tiny_models[QWEN], qwen_adapter, PROBE)
    base_only = service_client.create_lora_training_client(base_model=QWEN, rank=4).result()
    assert np.abs(_probe(base_only) - expected).max() > 1e-2  # the adapter matters
    tc = service_client.create_training_client_from_state(path).result()
    np.testing.assert_allclose(_probe(tc), expected, atol=1e-5, rtol=0)

    sampler = service_client.create_sampling_client(model_path=path)
    sampler = sampler.result() if hasattr(sampler, "result") else sampler
    greedy = types.SamplingParams(max_tokens=3, temperature=0.0)
    response = sampler.sample(
        types.ModelInput.from_ints(PROBE), 1, greedy, include_prompt_logprobs=True
    ).result()
    assert response.prompt_logprobs[0] is None
    np.testing.assert_allclose(response.prompt_logprobs[1:], expected, atol=1e-4, rtol=0)
    assert len(response.sequences[0].tokens) == 3

    # Training goes on from the imported weights.
    rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
    run_row = rest.get_training_run(run).result()
    assert run_row.base_model == QWEN and run_row.lora_rank == 4
    listed = [c.tinker_path for c in rest.list_checkpoints(run).result().checkpoints]
    assert listed == [path]
    loss = tc.forward([_datum([1, 2, 3, 4, 5, 6])], "cross_entropy").result().metrics["loss:sum"]
    _train(tc, 3)
    after = tc.forward([_datum([1, 2, 3, 4, 5, 6])], "cross_entropy").result()
    assert after.metrics["loss:sum"] < loss
    resumed = tc.save_state("trained").result().path
    again = service_client.create_training_client_from_state_with_optimizer(resumed).result()
    np.testing.assert_array_equal(_probe(again), _probe(tc))

    # The import has no AdamW state to resume: the _with_optimizer variant says so.
    with pytest.raises(Exception, match="has no optimizer state"):
        service_client.create_training_client_from_state_with_optimizer(path).result()


def test_rslora_adapter_with_lm_head_on_llama(
    service_client, server: Server, tiny_models, tmp_path
):
    adapter = _peft_adapter(
        tiny_models[LLAMA],
        tmp_path / "llama-rslora",
        ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
        rank=2,
        seed=3,
        use_rslora=True,
    )
    # peft saves the tied output layer's full weights beside the LoRA pair unless told not to.
    refused = _import(adapter, "--base-model", LLAMA, "--data-dir", str(server.data_dir))
    assert refused.returncode == 2 and "save_embedding_layers=False" in refused.stderr
    shutil.rmtree(adapter)
    _peft_adapter(
        tiny_models[LLAMA],
        adapter,
        ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
        rank=2,
        seed=3,
        save_embedding_layers=False,
        use_rslora=True,
    )
    path = _imported(server.data_dir, adapter, "--base-model", LLAMA)
    assert path.endswith("/weights/llama-rslora")  # the folder's name by default
    tc = service_client.create_training_client_from_state(path).result()
    expected = _peft_logprobs(tiny_models[LLAMA], adapter, PROBE)
    np.testing.assert_allclose(_probe(tc), expected, atol=1e-5, rtol=0)


def _broken(
    kind: str, root: Path, tiny_models: dict[str, Path], good: Path
) -> tuple[Path, list[str]]:
    """A bad folder (or argument) of ``kind``, and the extra arguments that go with it."""
    folder = root / kind
    if kind != "no-such-folder":
        shutil.copytree(good, folder)
    if kind == "llama-adapter":
        shutil.rmtree(folder)
        _peft_adapter(tiny_models[LLAMA], folder, ["q_proj", "v_proj"])
    elif kind == "rank-mismatch":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    elif kind == "truncated-weights":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "garbage-weights":
        (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00junk" * 64)
    elif kind == "no-config":
        (folder / "adapter_config.json").unlink()
    elif kind == "embedding-lora":
        shutil.rmtree(folder)
        _peft_adapter(tiny_models[QWEN], folder, ["q_proj", "embed_tokens"])
    elif kind == "dora":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    args = {"bad-name": ["--name", "../escape"], "unknown-user": ["--user", "mallory"]}
    return folder, args.get(kind, [])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("llama-adapter", "was made for"),
        ("rank-mismatch", "not rank 8 as r in adapter_config.json says"),
        ("truncated-weights", "not a readable safetensors file"),
        ("garbage-weights", "not a readable safetensors file"),
        ("no-config", "has no adapter_config.json"),
        ("no-such-folder", "does not exist"),
        ("bad-name", "checkpoint name '../escape' must be"),
        ("embedding-lora", "which treadle does not adapt"),
        ("dora", "use_dora=True"),
        ("unknown-user", "serves only the user 'local'"),
    ],
)
def test_bad_imports_are_refused_and_write_nothing(
    kind: str, message: str, server: Server, tiny_models, qwen_adapter: Path, tmp_path: Path
):
    folder, args = _broken(kind, tmp_path, tiny_models, qwen_adapter)
    before, outside = _state(server.data_dir), _tree(tmp_path)
    done = _import(folder, "--base-model", QWEN, "--data-dir", str(server.data_dir), *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert _state(server.data_dir) == before and _tree(tmp_path) == outside


def test_an_existing_name_and_an_unknown_base_model(server: Server, qwen_adapter: Path):
    data_dir = str(server.data_dir)
    first = _imported(server.data_dir, qwen_adapter, "--base-model", QWEN, "--name", "twice")
    before = _state(server.data_dir)
    again = _import(
        qwen_adapter,
        "--base-model",
        QWEN,
        "--name",
        "twice",
        "--data-dir",
        data_dir,
    )
    assert (
        again.returncode == 2
        and f"already imported an adapter as 'twice' ({first})" in again.stderr
    )
    unknown = _import(qwen_adapter, "--base-model", "Org/Nothing", "--data-dir", data_dir)
    assert unknown.returncode == 2 and QWEN in unknown.stderr and LLAMA in unknown.stderr
    assert _state(server.data_dir) == before


def test_same_weights_elsewhere_need_allow_other_base(
    server: Server, tiny_models, tmp_path: Path, qwen_adapter: Path
):
    copy = shutil.copytree(tiny_models[QWEN], tmp_path / "qwen-copy")
    adapter = _peft_adapter(copy, tmp_path / "from-copy", ["q_proj"])
    args = ("--base-model", QWEN, "--data-dir", str(server.data_dir))
    refused = _import(adapter, *args)
    assert refused.returncode == 2 and "--allow-other-base" in refused.stderr
    _imported(server.data_dir, adapter, "--base-model", QWEN, "--allow-other-base")


def test_an_import_belongs_to_its_user_alone(tmp_path_factory, tiny_models, qwen_adapter: Path):
    data_dir = tmp_path_factory.mktemp("import-users") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    # Before any server ran on this data dir: the base model given as serve --model takes it.
    base = f"{QWEN}={tiny_models[QWEN]}"
    nobody = _import(qwen_adapter, "--base-model", base, "--data-dir", str(data_dir))
    assert nobody.returncode == 2 and "no active API key belongs to user 'local'" in nobody.stderr
    path = _imported(data_dir, qwen_adapter, "--base-model", base, "--user", "alice")
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, ["--long-poll-seconds", "2"])
    try:
        as_alice = tinker.ServiceClient(base_url=server.url, api_key=alice)
        as_bob = tinker.ServiceClient(base_url=server.url, api_key=bob)
        tc = as_alice.create_training_client_from_state(path).result()
        expected = _peft_logprobs(tiny_models[QWEN], qwen_adapter, PROBE)
        np.testing.assert_allclose(_probe(tc), expected, atol=1e-5, rtol=0)
        with pytest.raises(Exception, match="no checkpoint at"):
            as_bob.create_training_client_from_state(path).result()
        rest_bob = tinker.RestClient(base_url=server.url, api_key=bob)
        assert rest_bob.list_user_checkpoints().result().checkpoints == []
        as_alice.close("success")
        as_bob.close("success")
    finally:
        server.stop()
