"""Decode matmuls: the thin-matmul kernel vs. MKL (``torch.mm(W, xᵀ)``, the fastest MKL
form here) on every weight shape of the built-in model, in one run. Prints JSON lines.

    .venv/bin/python benchmarks/thin_matmul.py [--repeats 20]

Columns are running sequences: 1 (batch-1 decode) and 16. ``us`` is the time of one
product, ``gflops`` its rate; shapes are SmolLM2-135M's q/k/v, o, gate/up, down (30 of
each, so weights stream from memory as in a decode pass) and the unembedding.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from types import ModuleType

import torch

from treadle.engine.thin_matmul import kernel

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
UNEMBED = (49152, 576)


def timed(run: Callable[[], object], repeats: int) -> float:
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    module = kernel()
    if module is None:
        raise SystemExit("the thin-matmul kernel is not available on this machine")
    print(json.dumps({"event": "start", "threads": torch.get_num_threads()}), flush=True)
    for columns in (1, 16):
        for name, shape in [*SHAPES.items(), ("unembed", UNEMBED)]:
            count = 1 if name == "unembed" else 30
            for impl, seconds in bench_shape(module, shape, columns, count, args.repeats):
                flops = 2 * shape[0] * shape[1] * columns
                line = {"impl": impl, "shape": name, "columns": columns}
                line |= {"us": round(seconds * 1e6, 1), "gflops": round(flops / seconds / 1e9, 1)}
                print(json.dumps(line), flush=True)


def bench_shape(
    module: ModuleType, shape: tuple[int, int], columns: int, count: int, repeats: int
) -> list[tuple[str, float]]:
    """Seconds per product for MKL and the kernel, over ``count`` weights of ``shape``."""
    weights = [torch.randn(shape) for _ in range(count)]
    x_t = torch.randn(shape[1], columns)
    out = torch.empty(shape[0], columns)

    def mkl() -> None:
        for w in weights:
            torch.mm(w, x_t)

    def fast() -> None:
        for w in weights:
            module.thin_matmul(out, w, x_t, None, None)

    return [(impl, timed(run, repeats) / count) for impl, run in (("mkl", mkl), ("kernel", fast))]


if __name__ == "__main__":
    main()
