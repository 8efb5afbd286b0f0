"""A base model on N rank processes (``--workers N``) against the same work in this one
process, engine to engine (no HTTP). Prints JSON lines.

    .venv/bin/python benchmarks/workers.py [--workers 2] [--steps 4] [--datums 8]
        [--tokens 128] [--samples 8] [--max-tokens 32] [--model FOLDER]

The model is the built-in one (converted into ``--data-dir`` once) unless ``--model``
names a Hugging Face folder. Both sides get this machine's cores: the in-process worker
all of them on its thread, each of the N local ranks cores / N (as ``treadle serve``
gives them). Each measures, after one warm-up round:

- ``train``: ``--steps`` steps of ``forward_backward`` (cross_entropy on ``--datums``
  sequences of ``--tokens`` tokens) + ``optim_step``; tok/s of trained tokens;
- ``sample``: ``--samples`` greedy requests of ``--max-tokens`` tokens each, all at once;
  tok/s of sampled tokens.

Each line carries both sides' numbers and the ratio (group / one process). On one CPU
machine the ranks split the cores the one process uses: this measures what splitting
the work and the messages cost or gain there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treadle.engine.group import load_group
from treadle.engine.process import compute_threads
from treadle.engine.worker import load_worker
from treadle.sampling_params import SamplingParams
from treadle.settings import ModelEntry, Settings
from treadle.types import AdamParams, Datum, LoraSpec


def _data(rng: np.random.Generator, datums: int, tokens: int, vocab: int) -> list[Datum]:
    out = []
    for _ in range(datums):
        ids = rng.integers(0, vocab, tokens + 1)
        targets = ids[1:].astype(np.int64)
        out.append(Datum(ids[:-1].astype(np.int64), {"target_tokens": targets}))
    return out


def _train(engine: Any, args: argparse.Namespace, vocab: int) -> float:
    """Trained tokens per second over ``--steps`` steps after a warm-up step."""
    rng = np.random.default_rng(0)
    model = engine.new_model(LoraSpec(rank=16), seed=0)
    elapsed = 0.0
    for step in range(args.steps + 1):
        data = _data(rng, args.datums, args.tokens, vocab)
        started = time.perf_counter()
        loss = engine.check_forward_backward(data, "cross_entropy", {})
        engine.forward_backward([engine.work(model, data, loss, False)], lambda: None)
        engine.optim_step(model, AdamParams(learning_rate=1e-4))
        if step:
            elapsed += time.perf_counter() - started
    return args.steps * args.datums * args.tokens / elapsed


def _sample(engine: Any, args: argparse.Namespace, vocab: int) -> float:
    """Sampled tokens per second of ``--samples`` requests at once (after a warm-up)."""
    rng = np.random.default_rng(1)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    rate = 0.0
    for _ in range(2):
        results: list[Any] = []
        started = time.perf_counter()
        for _ in range(args.samples):
            prompt = rng.integers(0, vocab, 16).astype(np.int64)
            engine.add_sample(prompt, 1, params, None, False, 0, results.append)
        while engine.sampling():
            engine.sample_step()
        sampled = sum(len(r.sequences[0].tokens) for r in results)
        rate = sampled / (time.perf_counter() - started)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--datums", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", type=Path, help="a Hugging Face model folder")
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".treadle")
    args = parser.parse_args()
    if args.model is None:
        from treadle.engine.embedded import embedded_model_folder

        args.model = embedded_model_folder(args.data_dir)
    entry = ModelEntry("bench", str(args.model))
    settings = Settings(data_dir=args.data_dir, models=(entry,), workers=args.workers)
    torch.set_num_threads(compute_threads())
    one = load_worker(entry, settings)
    vocab = one.info.vocab_size
    baseline = {"train": _train(one, args, vocab), "sample": _sample(one, args, vocab)}
    del one
    group = load_group(entry, settings)
    try:
        measured = {"train": _train(group, args, vocab), "sample": _sample(group, args, vocab)}
    finally:
        group.close()
    for what, rate in measured.items():
        line = {
            "bench": "workers",
            "what": what,
            "workers": args.workers,
            "cores": compute_threads(),
            "one_process_tok_s": round(baseline[what], 1),
            "group_tok_s": round(rate, 1),
            "ratio": round(rate / baseline[what], 3),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
