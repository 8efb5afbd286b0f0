"""Training throughput: treadle through the official SDK vs. plain transformers + peft
in-process, on the same model, LoRA config and data, in one run. Prints JSON lines.

    .venv/bin/python benchmarks/train_throughput.py [--steps 4] [--workloads a,b]

Workloads: (a) 4 sequences x 512 tokens; (b) 16 sequences of 16..512 tokens (fixed seed).
A step is forward_backward + optim_step (cross_entropy, every token weighted). tok/s is
tokens per second of the median step after the first (warm-up) step. Peak memory is the
peak RSS (VmHWM) of the process doing the compute: the treadle server, or a fresh
process for the baseline, started with default process settings. For (b) the baseline
runs the 16 sequences one at a time (its fastest and leanest way here; padded to one
batch it would need ~28 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RANK = 32
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def workload(name: str) -> list[list[int]]:
    """Token sequences (each of length n+1: inputs are [:-1], targets [1:])."""
    rng = np.random.default_rng(0)
    lengths = [512] * 4 if name == "a" else sorted(rng.integers(16, 513, 16).tolist())
    return [rng.integers(0, 49152, n + 1).tolist() for n in lengths]


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def peak_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmHWM")


# ---------------------------------------------------------------- baseline (peft)


def run_baseline(folder: str, name: str, steps: int, mode: str) -> None:
    """In a fresh process: transformers + peft, the plain way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=RANK, lora_alpha=32, lora_dropout=0.0, target_modules=[*targets, "lm_head"]
    )
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    seqs = workload(name)

    def loss_of(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = model(input_ids=tokens[:, :-1], attention_mask=mask).logits
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        if mask is not None:
            lp = lp * mask
        return -lp.sum()

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if mode == "batch":
            width = max(len(s) for s in seqs)
            tokens = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width - 1)
            for i, s in enumerate(seqs):
                tokens[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s) - 1] = 1
            loss_of(tokens, mask if name == "b" else None).backward()
        else:
            for s in seqs:
                loss_of(torch.tensor([s])).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    tokens_per_step = sum(len(s) - 1 for s in seqs)
    emit(
        workload=name,
        impl=f"peft_inprocess_{mode}",
        tok_s=round(tokens_per_step / statistics.median(times[1:]), 1),
        step_s=[round(t, 2) for t in times],
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    )


# ---------------------------------------------------------------- treadle (SDK)


def run_treadle(url: str, name: str, steps: int, server_pid: int) -> None:
    import tinker
    from tinker import types

    client = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    tc = client.create_lora_training_client(base_model=MODEL, rank=RANK).result()
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=s[1:], dtype="int64"),
                "weights": types.TensorData(data=[1.0] * (len(s) - 1), dtype="float32"),
            },
        )
        for s in workload(name)
    ]
    adam = types.AdamParams(learning_rate=1e-5)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fb = tc.forward_backward(data, "cross_entropy")
        step = tc.optim_step(adam)
        fb.result()
        step.result()
        times.append(time.perf_counter() - start)
    tokens_per_step = sum(len(d.model_input.to_ints()) for d in data)
    emit(
        workload=name,
        impl="treadle_sdk",
        tok_s=round(tokens_per_step / statistics.median(times[1:]), 1),
        step_s=[round(t, 2) for t in times],
        peak_rss_gb=round(peak_rss_gb(server_pid), 2),
    )
    client.close("success")


def start_server(data_dir: Path, port: int, *flags: str) -> subprocess.Popen[bytes]:
    """``treadle serve`` on ``data_dir`` (with ``flags``), once it answers ``healthz``."""
    import httpx

    server = subprocess.Popen(
        [sys.executable, "-m", "treadle", "serve", "--port", str(port)]
        + ["--data-dir", str(data_dir), "--log-level", "warning", *flags]
    )
    for _ in range(1800):
        if server.poll() is not None:
            raise RuntimeError("server exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workloads", default="a,b")
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".treadle")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--role", choices=["main", "baseline", "treadle"], default="main")
    parser.add_argument("--mode", default="loop")
    parser.add_argument("--workload", default="a")
    parser.add_argument("--folder", default="")
    parser.add_argument("--server-pid", type=int, default=0)
    args = parser.parse_args()
    if args.role == "baseline":
        run_baseline(args.folder, args.workload, args.steps, args.mode)
        return
    if args.role == "treadle":
        run_treadle(f"http://127.0.0.1:{args.port}", args.workload, args.steps, args.server_pid)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from treadle.engine.embedded import embedded_model_folder

    folder = embedded_model_folder(args.data_dir)
    me = [sys.executable, __file__, "--steps", str(args.steps), "--port", str(args.port)]
    emit(event="start", cpus=os.cpu_count(), torch_threads=_torch_threads(), model=MODEL, rank=RANK)
    for name in args.workloads.split(","):
        # (b) as one padded batch would need ~28 GB here; its baseline is the loop.
        for mode in ["batch"] if name == "a" else ["loop"]:
            subprocess.run(
                [
                    *me,
                    "--role",
                    "baseline",
                    "--workload",
                    name,
                    "--mode",
                    mode,
                    "--folder",
                    str(folder),
                ],
                check=True,
            )
        # A fresh server per workload, so its peak memory is this workload's.
        with tempfile.TemporaryDirectory() as scratch:
            data_dir = Path(scratch)
            (data_dir / "models").mkdir()
            (data_dir / "models" / folder.name).symlink_to(folder)
            server = start_server(data_dir, args.port)
            try:
                subprocess.run(
                    [*me, "--role", "treadle", "--workload", name, "--server-pid", str(server.pid)],
                    check=True,
                )
            finally:
                server.terminate()
                server.wait()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
