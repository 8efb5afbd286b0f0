"""benchmarks/gpu_check.py must not rot between GPU loans: its CPU smoke run (``--device
cpu --tiny``) goes through every part and prints JSON lines, and its device-vs-CPU check
passes (CPU against CPU here, so any difference is a bug in the check itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu_with_a_tiny_model() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    parts = [(line["part"], line.get("impl"), line.get("concurrency")) for line in lines]
    assert parts == [
        ("setup", None, None),
        ("check", None, None),
        ("train", "treadle", None),
        ("decode", "treadle", 1),
        ("decode", "treadle", 4),
        ("train", "peft", None),
        ("decode", "generate", 1),
        ("decode", "generate", 4),
        ("summary", None, 4),
    ]
    check = lines[1]
    assert check["ok"] and check["same_greedy_tokens"]
    # The same computation on the same device: bit for bit.
    assert check["loss_rel"] == check["logprobs_abs"] == check["weights_abs"] == 0.0
    for line in lines[2:-1]:
        assert line["tok_s"] > 0
        assert line.get("mfu") is None  # no peak is known for a CPU
    summary = lines[-1]
    assert summary["treadle_mfu"] is None
    treadle, generate = lines[4]["tok_s"], lines[7]["tok_s"]
    assert summary["decode_vs_generate"] == round(treadle / generate, 3)
