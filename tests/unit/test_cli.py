"""The command line: model arguments, model sources, and clear startup errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.tiny_models import make_tiny_model
from treadle.settings import EMBEDDED_DEFAULT, ModelEntry


def test_model_entries_parse():
    assert ModelEntry.parse("Qwen/Qwen3-4B=/models/q") == ModelEntry("Qwen/Qwen3-4B", "/models/q")
    assert ModelEntry.parse("Org/Name") == ModelEntry("Org/Name", "Org/Name")
    with pytest.raises(ValueError, match="NAME=PATH_OR_HUB_ID"):
        ModelEntry.parse("=x")
    assert EMBEDDED_DEFAULT.name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _treadle(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "treadle", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/no/such/folder", "neither a model folder nor a hub id"),
        ("Org/NotCached", "not in the local Hugging Face cache"),
    ],
)
def test_serve_refuses_unusable_models_with_one_line(tmp_path: Path, source: str, message: str):
    done = _treadle("serve", "--data-dir", str(tmp_path), "--model", f"x={source}")
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_serve_refuses_other_architectures(tmp_path: Path):
    folder = make_tiny_model(tmp_path / "m", "qwen3")
    config = (folder / "config.json").read_text().replace('"qwen3"', '"gpt2"')
    (folder / "config.json").write_text(config)
    code = (
        "from pathlib import Path; from treadle.engine.models import load_base_model;"
        f"load_base_model('x', {str(folder)!r}, Path({str(tmp_path)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "serves llama, qwen2, qwen3" in done.stderr


def test_a_hub_id_in_the_local_cache_is_served_from_it(tmp_path: Path):
    """An HF cache laid out as the hub client leaves it (refs/main -> snapshot)."""
    repo = tmp_path / "hub" / "models--Org--Tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    make_tiny_model(tmp_path / "src", "llama")
    shutil.copytree(tmp_path / "src", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    code = (
        "from pathlib import Path; from treadle.engine.models import resolve_folder;"
        "print(resolve_folder('Org/Tiny', Path('.')))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == snapshot


def test_help_describes_the_commands():
    done = _treadle("serve", "--help")
    assert done.returncode == 0
    for option in ("--model NAME=SOURCE", "--data-dir", "--port", "--max-tokens-per-pass"):
        assert option in done.stdout


def test_every_limit_is_a_flag_and_the_demo_passes_them_all_on(tmp_path: Path):
    """Each setting has a serve flag with --help text; what `treadle demo` was given
    reaches the server it starts unchanged."""
    from treadle.cli import build_parser, serve_argv, settings_of
    from treadle.settings import Settings

    done = _treadle("serve", "--help")
    for option in (
        "--dtype",
        "--no-thin-matmul",
        "--max-lora-rank",
        "--sampler-max-batch",
        "--sampler-max-prefill-tokens",
        "--max-num-samples",
        "--max-topk-prompt-logprobs",
        "--ephemeral-samplers-per-model",
        "--retry-window",
        "--future-retention-seconds",
    ):
        assert option in done.stdout
    given = [
        "demo",
        "--data-dir",
        str(tmp_path),
        "--dtype",
        "bfloat16",
        "--no-thin-matmul",
        "--sampler-max-batch",
        "7",
        "--max-num-samples",
        "3",
        "--retry-window",
        "9",
        "--future-retention-seconds",
        "12.5",
        "--model",
        "x=/models/x",
    ]
    settings = settings_of(build_parser().parse_args(given))
    assert settings != Settings()
    assert (settings.sampler_max_batch, settings.retry_window, settings.thin_matmul) == (
        7,
        9,
        False,
    )
    served = settings_of(build_parser().parse_args(["serve", *serve_argv(settings)]))
    assert served == settings


@pytest.mark.parametrize("share", ["0", "-0.5", "1.5", "nan"])
def test_decode_share_outside_its_range_is_refused(share: str):
    done = _treadle("serve", "--decode-share", share)
    assert done.returncode == 2
    assert "give a number in (0, 1]" in done.stderr and "Traceback" not in done.stderr


def test_decode_share_reaches_the_settings():
    from treadle.cli import build_parser, settings_of

    args = build_parser().parse_args(["serve", "--decode-share", "0.25"])
    assert settings_of(args).decode_share == 0.25


def test_adapters_import_into_a_missing_data_dir_creates_nothing(tmp_path: Path):
    missing = tmp_path / "not-a-data-dir"
    done = _treadle(
        "adapters", "import", str(tmp_path), "--base-model", "x", "--data-dir", str(missing)
    )
    assert done.returncode == 2 and "is no treadle data dir" in done.stderr
    assert "Traceback" not in done.stderr and not missing.exists()
