"""Custom losses: server-side (``create_custom_loss`` with --custom-loss-server-side) vs.
the SDK's client path (a forward, the loss on the client, then a cross_entropy
forward_backward) vs. the built-in ``importance_sampling``, on the same data, model and
adapter, in one run. Prints JSON lines.

    .venv/bin/python benchmarks/custom_loss.py [--steps 3] [--rounds 3] [--data-dir ~/.treadle]

Workload: 4 sequences x 512 tokens of the default model, importance-sampling inputs
(sampler logprobs, advantages) from a fixed seed. The custom loss is importance
sampling written per datum, so all three compute the same loss. A step is
forward_backward(_custom) + optim_step. The three take turns, ``--steps`` steps each per
round; tok/s is tokens per second of each one's median step (the very first step of
each is warm-up), and the ratios are the medians of the rounds' ratios. One server
serves all three: a ``LossHandle`` runs on the server, a plain callable always takes the
client path. Targets (issue 12): server-side
>= 1.4x the client path, >= 0.9x the built-in loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from train_throughput import start_server  # (benchmarks/ is this script's sys.path[0])

RANK = 32
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEQUENCES, LENGTH = 4, 512


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def importance_sampling(logprobs, sampling_logprobs, advantages):  # type: ignore[no-untyped-def]
    """Per datum: what the built-in importance_sampling computes."""
    import torch

    ratio = torch.exp(logprobs - sampling_logprobs)
    loss = -(ratio * advantages).sum()
    return loss, {"custom/ratio:mean": ratio.mean()}


def data() -> list[Any]:
    from tinker import TensorData, types

    rng = np.random.default_rng(0)
    out = []
    for _ in range(SEQUENCES):
        tokens = rng.integers(0, 49152, LENGTH + 1)
        sampled = TensorData.from_numpy(-rng.uniform(8, 12, LENGTH).astype(np.float32))
        advantages = TensorData.from_numpy(rng.normal(0, 1, LENGTH).astype(np.float32))
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={
                    "target_tokens": tokens[1:].tolist(),
                    # the built-in loss reads "logprobs"; the custom one "sampling_logprobs"
                    "logprobs": sampled,
                    "sampling_logprobs": sampled,
                    "advantages": advantages,
                },
            )
        )
    return out


def run(url: str, steps: int, rounds: int) -> None:
    import tinker
    from tinker import types

    client = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    ranks = {"logprobs": 1, "sampling_logprobs": 1, "advantages": 1}
    handle = client.create_custom_loss(importance_sampling, ranks).result()
    assert handle.loss_id is not None, "the server did not take the loss (flag off?)"

    def client_path(batch: list[Any], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        losses = [
            importance_sampling(
                lp,
                d.loss_fn_inputs["sampling_logprobs"].to_torch(),
                d.loss_fn_inputs["advantages"].to_torch(),
            )[0]
            for d, lp in zip(batch, logprobs, strict=True)
        ]
        return sum(losses), {}

    batch = data()
    adam = types.AdamParams(learning_rate=1e-5)
    impls = {
        "server_side_custom": lambda tc: tc.forward_backward_custom(batch, handle),
        "client_path_custom": lambda tc: tc.forward_backward_custom(batch, client_path),
        "builtin_importance_sampling": lambda tc: tc.forward_backward(batch, "importance_sampling"),
    }
    tokens = SEQUENCES * LENGTH
    clients = {
        name: client.create_lora_training_client(base_model=MODEL, rank=RANK, seed=0).result()
        for name in impls
    }
    times: dict[str, list[float]] = {name: [] for name in impls}
    ratios: dict[str, list[float]] = {"server_vs_client_path": [], "server_vs_builtin": []}
    # The three take turns, round after round: this machine's speed drifts between minutes.
    for index in range(rounds):
        medians = {}
        for name, step in impls.items():
            tc = clients[name]
            mine = []
            for _ in range(steps):
                start = time.perf_counter()
                fb = step(tc)
                opt = tc.optim_step(adam)
                fb.result()
                opt.result()
                mine.append(time.perf_counter() - start)
            kept = mine[1:] if index == 0 else mine  # the first step of all is warm-up
            times[name] += kept
            medians[name] = statistics.median(kept)
            emit(impl=name, round=index, step_s=[round(t, 3) for t in mine])
        server = medians["server_side_custom"]
        ratios["server_vs_client_path"].append(medians["client_path_custom"] / server)
        ratios["server_vs_builtin"].append(medians["builtin_importance_sampling"] / server)
    for name in impls:
        emit(impl=name, tok_s=round(tokens / statistics.median(times[name]), 1))
    emit(event="ratios", **{k: round(statistics.median(v), 3) for k, v in ratios.items()})
    client.close("success")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per loss per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".treadle")
    parser.add_argument("--port", type=int, default=8732)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is warm-up)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    emit(event="start", cpus=os.cpu_count(), model=MODEL, rank=RANK, tokens=SEQUENCES * LENGTH)
    server = start_server(args.data_dir, args.port, "--custom-loss-server-side")
    try:
        run(f"http://127.0.0.1:{args.port}", args.steps, args.rounds)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
