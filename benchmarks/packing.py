"""Packing: K users training at once on one server, against the same work one after
another and against one client sending it as one batch. Prints JSON lines.

    .venv/bin/python benchmarks/packing.py [--ks 1,2,4,8] [--steps 6] [--tokens 32] [--rounds 1]

Starts ``treadle serve`` on the built-in model with one key per user; with
``--baseline-src DIR`` (the ``src`` folder of another checkout, e.g. a ``git worktree``
of an older commit) it then measures a server run from that code the same way, without
keys if that code has none (every user is then the one local user). Each user runs
the same supervised loop: a step is ``forward_backward`` (cross_entropy on one sequence
of ``--tokens`` tokens) + ``optim_step``. For each K, three ways in one run:

- ``concurrent``: K users, each its own client and model, all at once;
- ``sequential``: the same K loops one after another;
- ``combined``: one client whose step sends the K sequences as one batch.

tok/s is training tokens per second over the steps after each loop's first (warm-up)
step: of wall time for ``concurrent`` (from when every user has warmed up), of the summed
step times otherwise (model creation left out). ``fixed_cost``: the median time of a
lone ``--tokens``-token ``forward_backward`` through the SDK minus the same pass computed
in-process (the engine's ``Worker`` on the same weights): what a request costs besides
compute. This machine's speed drifts from minute to minute: ``--rounds 3`` measures the
three ways of each K in turn three times and prints the median ratios.
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
RANK = 32


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def sequences(k: int, tokens: int) -> list[list[int]]:
    rng = np.random.default_rng(k)
    return [rng.integers(0, 49152, tokens + 1).tolist() for _ in range(k)]


def datum(seq: list[int]) -> Any:
    from tinker import types

    return types.Datum(
        model_input=types.ModelInput.from_ints(seq[:-1]),
        loss_fn_inputs={"target_tokens": seq[1:]},
    )


def loop(
    url: str,
    key: str,
    seqs: list[list[int]],
    steps: int,
    seed: int,
    warm: threading.Barrier | None = None,
) -> list[float]:
    """One client's supervised loop; returns the times of its steps after the first
    (warm-up) one, which ends by waiting at ``warm`` for the other clients' warm-ups."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key=key)
    tc = service.create_lora_training_client(base_model=MODEL, rank=RANK, seed=seed).result()
    data = [datum(s) for s in seqs]
    adam = types.AdamParams(learning_rate=1e-5)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        fb = tc.forward_backward(data, "cross_entropy")
        optim = tc.optim_step(adam)
        fb.result()
        optim.result()
        if step == 0:
            if warm is not None:
                warm.wait()
            continue
        times.append(time.perf_counter() - start)
    service.close("success")
    return times


def concurrent(url: str, keys: list[str], k: int, tokens: int, steps: int) -> float:
    """Aggregate tok/s of K users at once, from the moment all have warmed up."""
    seqs = sequences(k, tokens)
    ends: list[float] = [0.0] * k
    began: list[float] = []
    warm = threading.Barrier(k, action=lambda: began.append(time.perf_counter()))

    def run(i: int) -> None:
        loop(url, keys[i], [seqs[i]], steps, seed=i, warm=warm)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return k * tokens * (steps - 1) / (max(ends) - began[0])


def sequential(url: str, keys: list[str], k: int, tokens: int, steps: int) -> float:
    seqs = sequences(k, tokens)
    times = [t for i in range(k) for t in loop(url, keys[i], [seqs[i]], steps, seed=i)]
    return tokens * len(times) / sum(times)


def combined(url: str, keys: list[str], k: int, tokens: int, steps: int) -> float:
    times = loop(url, keys[0], sequences(k, tokens), steps, seed=0)
    return k * tokens * len(times) / sum(times)


def fixed_cost(url: str, key: str, folder: Path, tokens: int, repeats: int) -> dict[str, float]:
    """Median SDK forward_backward time of one small request, and its compute alone."""
    import tinker

    seq = sequences(1, tokens)[0]
    service = tinker.ServiceClient(base_url=url, api_key=key)
    tc = service.create_lora_training_client(base_model=MODEL, rank=RANK, seed=0).result()
    sdk = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        tc.forward_backward([datum(seq)], "cross_entropy").result()
        sdk.append(time.perf_counter() - start)
    service.close("success")

    # The same pass through the engine's seam, no server in between, in a process started
    # with the server's process settings (allocator tunables, compute threads).
    from treadle.engine.process import tuned_environment

    done = subprocess.run(
        [sys.executable, __file__, "--role", "compute", "--tokens", str(tokens)]
        + ["--folder", str(folder), "--repeats", str(repeats)],
        env=tuned_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    compute = json.loads(done.stdout.strip().splitlines()[-1])["times"]
    sdk_s, compute_s = statistics.median(sdk[1:]), statistics.median(compute[1:])
    return {"sdk_s": sdk_s, "compute_s": compute_s, "fixed_s": sdk_s - compute_s}


def compute_role(folder: Path, tokens: int, repeats: int) -> None:
    """The in-process half of :func:`fixed_cost`: prints the pass times as JSON."""
    from treadle.engine.worker import load_worker
    from treadle.settings import ModelEntry, Settings
    from treadle.types import Datum, LoraSpec

    seq = sequences(1, tokens)[0]
    worker = load_worker(ModelEntry(MODEL, str(folder)), Settings())
    worker.claim_thread()
    model = worker.new_model(LoraSpec(rank=RANK), seed=0)
    engine_datum = Datum(np.array(seq[:-1]), {"target_tokens": np.array(seq[1:])})
    loss = worker.check_forward_backward([engine_datum], "cross_entropy", {})
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        worker.forward_backward([worker.work(model, [engine_datum], loss, False)], lambda: None)
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times}))


def run(
    url: str, keys: list[str], ks: list[int], tokens: int, steps: int, rounds: int, folder: Path
) -> None:
    for k in ks:  # (none with --skip-ks)
        ratios: dict[str, list[float]] = {"vs_sequential": [], "vs_combined": []}
        for index in range(rounds):
            row: dict[str, Any] = {"k": k, "tokens": tokens, "round": index}
            row["concurrent_tok_s"] = round(concurrent(url, keys, k, tokens, steps), 1)
            row["sequential_tok_s"] = round(sequential(url, keys, k, tokens, steps), 1)
            row["combined_tok_s"] = round(combined(url, keys, k, tokens, steps), 1)
            row["vs_sequential"] = round(row["concurrent_tok_s"] / row["sequential_tok_s"], 2)
            row["vs_combined"] = round(row["concurrent_tok_s"] / row["combined_tok_s"], 2)
            emit(**row)
            for name, values in ratios.items():
                values.append(row[name])
        if rounds > 1:
            emit(k=k, event="median", **{n: statistics.median(v) for n, v in ratios.items()})
    cost = fixed_cost(url, keys[0], folder, tokens, repeats=8)
    emit(event="fixed_cost", tokens=tokens, **{k: round(v, 3) for k, v in cost.items()})


def measure(name: str, src: Path | None, args: argparse.Namespace, folder: Path) -> None:
    """Everything against one server, started from ``src`` (None: this checkout)."""
    import httpx

    ks = [] if args.skip_ks else [int(k) for k in args.ks.split(",")]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        (data_dir / "models").mkdir()
        (data_dir / "models" / folder.name).symlink_to(folder)
        treadle = [sys.executable, "-m", "treadle"]
        keys = []
        for k in range(max(ks, default=1)):
            made = subprocess.run(
                [*treadle, "keys", "create", "--user", f"user{k}", "--data-dir", str(data_dir)],
                capture_output=True,
                text=True,
                env=env,
            )
            if made.returncode != 0:  # code from before keys: one local user
                keys = ["tml-local"] * max(ks, default=1)
                break
            keys.append(made.stdout.strip().splitlines()[-1])
        emit(event="server", server=name, src=str(src or "this checkout"), users=len(set(keys)))
        server = subprocess.Popen(
            [*treadle, "serve", "--port", str(args.port), "--data-dir", str(data_dir)]
            + ["--log-level", "warning"],
            env=env,
        )
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            run(url, keys, ks, args.tokens, args.steps, args.rounds, folder)
        finally:
            server.terminate()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure each K this many times; prints medians"
    )
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".treadle")
    parser.add_argument("--port", type=int, default=8734)
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--role", choices=["main", "compute"], default="main")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--skip-ks", action="store_true", help="measure the fixed cost only")
    args = parser.parse_args()
    if args.role == "compute":
        compute_role(args.folder, args.tokens, args.repeats)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from treadle.engine.embedded import embedded_model_folder

    folder = embedded_model_folder(args.data_dir)
    emit(event="start", cpus=os.cpu_count(), model=MODEL, rank=RANK, steps=args.steps)
    measure("this", None, args, folder)
    if args.baseline_src is not None:
        measure("baseline", args.baseline_src.resolve(), args, folder)


if __name__ == "__main__":
    main()
