"""Mixed load on one server: sampling latency while others train, and training step time
while others sample. Prints JSON lines.

    .venv/bin/python benchmarks/mixed_load.py [--url URL] [--rounds 4] [--steps 3]

Starts ``treadle serve`` on the built-in model unless ``--url`` points at a running one.
Sampling: 16 concurrent clients, each a greedy 32-token sample per round. Training: 2
clients, each step ``forward_backward`` (cross_entropy, 4 x 512 tokens) + ``optim_step``.
Three phases, in one run: sampling alone, training alone, both at once. The baseline of
each workload is the same workload alone on the same server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def sampling(url: str, rounds: int, stop: threading.Event | None = None) -> list[float]:
    """Per-request latencies of 16 concurrent clients, ``rounds`` rounds each (or until
    ``stop``)."""
    import tinker
    from tinker import types

    rng = np.random.default_rng(1)
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
        sampler = service.create_sampling_client(base_model=MODEL).result()
        prompt = types.ModelInput.from_ints(rng.integers(0, 49152, 32).tolist())
        params = types.SamplingParams(max_tokens=32, temperature=0.0, stop=[])
        done = 0
        while done < rounds or (stop is not None and not stop.is_set()):
            start = time.perf_counter()
            sampler.sample(prompt, 1, params).result()
            with lock:
                latencies.append(time.perf_counter() - start)
            done += 1
            if stop is not None and stop.is_set():
                break
        service.close("success")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def training(url: str, steps: int) -> list[float]:
    """Step times of 2 concurrent training clients."""
    import tinker
    from tinker import types

    times: list[float] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
        tc = service.create_lora_training_client(base_model=MODEL, rank=32, seed=seed).result()
        data = []
        for _ in range(4):
            tokens = rng.integers(0, 49152, 513).tolist()
            data.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:]},
                )
            )
        for _ in range(steps):
            start = time.perf_counter()
            fb = tc.forward_backward(data, "cross_entropy")
            step = tc.optim_step(types.AdamParams(learning_rate=1e-5))
            fb.result()
            step.result()
            with lock:
                times.append(time.perf_counter() - start)
        service.close("success")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times


def run(url: str, rounds: int, steps: int) -> None:
    alone = sampling(url, rounds)
    emit(phase="sampling alone", p50_s=round(statistics.median(alone), 3), n=len(alone))
    train_alone = training(url, steps)
    emit(phase="training alone", step_s=round(statistics.median(train_alone), 2))
    stop = threading.Event()
    mixed: list[float] = []
    sampler = threading.Thread(target=lambda: mixed.extend(sampling(url, 1, stop)))
    sampler.start()
    train_mixed = training(url, steps)
    stop.set()
    sampler.join()
    p50 = statistics.median(mixed)
    step = statistics.median(train_mixed)
    emit(
        phase="both",
        sampling_p50_s=round(p50, 3),
        sampling_vs_alone=round(p50 / statistics.median(alone), 2),
        training_step_s=round(step, 2),
        training_vs_alone=round(step / statistics.median(train_alone), 2),
        samples=len(mixed),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".treadle")
    parser.add_argument("--port", type=int, default=8733)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    emit(event="start", cpus=os.cpu_count(), model=MODEL)
    if args.url:
        run(args.url, args.rounds, args.steps)
        return
    import httpx

    from treadle.engine.embedded import embedded_model_folder

    folder = embedded_model_folder(args.data_dir)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        (data_dir / "models").mkdir()
        (data_dir / "models" / folder.name).symlink_to(folder)
        server = subprocess.Popen(
            [sys.executable, "-m", "treadle", "serve", "--port", str(args.port)]
            + ["--data-dir", str(data_dir), "--log-level", "warning"]
        )
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            run(url, args.rounds, args.steps)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
