"""Older SDKs (JSON forward_backward, JSON ``/forward``, JSON results) against the same
server: each runs in a venv of its own, made on first use under ``.venv-sdk/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import QWEN
from tests.fixtures.reference import base_logprobs
from tests.fixtures.server import Server

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("old_sdk_client.py")


def _venv(version: str) -> Path:
    venv = ROOT / ".venv-sdk" / version
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"tinker=={version}"],
            capture_output=True,
            text=True,
        )
        assert install.returncode == 0, install.stderr[-5000:]
    return python


@pytest.mark.parametrize("version", ["0.16.1", "0.24.1"])
def test_old_sdk_trains_through_the_json_path(server: Server, tiny_models, version: str):
    python = _venv(version)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TINKER_TELEMETRY="0")
    done = subprocess.run(
        [str(python), str(CLIENT), server.url, QWEN],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["version"] == version
    folder = tiny_models[QWEN]
    a, b = [72, 101, 108, 108, 111], [1, 2, 3, 4, 5, 6, 7]
    lp_a, lp_b = base_logprobs(folder, a[:-1], a[1:]), base_logprobs(folder, b[:-1], b[1:])
    assert out["ce_logprobs"][0] == pytest.approx(lp_a.tolist(), abs=1e-5)
    assert out["ce_logprobs"][1] == pytest.approx(lp_b.tolist(), abs=1e-5)
    assert out["ce_loss"] == pytest.approx(float(-lp_a.sum() - 0.5 * lp_b.sum()), rel=1e-5)
    q = torch.tensor([-5.0, -6.0, -5.5, -5.8], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, 0.5], dtype=torch.float64)
    ratio = torch.exp(lp_a - q)
    ppo = -torch.min(ratio * adv, torch.clamp(ratio, 0.9, 1.1) * adv).sum()
    assert out["ppo_loss"] == pytest.approx(float(ppo), rel=1e-5)
    assert out["forward_before"] == pytest.approx(float(-lp_b.sum()), rel=1e-5)
    assert out["optim"]["grad_norm:mean"] > 0
    assert out["forward_after"] < out["forward_before"]  # the step lowered the trained loss
    assert out["chunked_outputs"] == 1030
    assert out["chunked_loss"] == pytest.approx(out["pieces_loss"], rel=1e-5)
    assert "outside the model's vocabulary" in out["error"]["message"]
    assert out["error"]["category"].lower().endswith("user")
    assert out["after_error"] > 0
