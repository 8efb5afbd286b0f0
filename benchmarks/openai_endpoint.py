"""The OpenAI-compatible endpoint against the SDK's ``sample`` on the same server, in one
run: greedy completions of 128 tokens, 1 request and 16 concurrent requests, on the
built-in model. Prints JSON lines.

    .venv/bin/python benchmarks/openai_endpoint.py [--rounds 3] [--new-tokens 128]

Both ways reach the same sampler (one decode path), so only HTTP/JSON (and the
endpoint's detokenizing) may differ: the target is the endpoint at >= 0.9x the SDK's
tokens per second. The rounds interleave SDK and endpoint, so load from anything else
on the machine hits both alike; each line is one round's tok/s, the ``summary`` lines
the medians and the ratio. The prompt is the same 64 token ids both ways
(``/completions`` takes token ids) and neither stops early (``stop=[]`` for the SDK,
``ignore_eos`` for the endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from train_throughput import start_server  # (benchmarks/ is this script's sys.path[0])

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT_LEN = 64
BATCHES = (1, 16)


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def prompts(count: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(100, 40000, PROMPT_LEN).tolist() for _ in range(count)]


def sdk_round(url: str, new_tokens: int) -> Callable[[int], int]:
    """``run(batch)``: ``batch`` concurrent SDK samples; returns the tokens generated."""
    import tinker
    from tinker import types

    client = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    sampler = client.create_sampling_client(base_model=MODEL).result()
    params = types.SamplingParams(max_tokens=new_tokens, temperature=0.0, stop=[])

    def run(batch: int) -> int:
        futures = [sampler.sample(types.ModelInput.from_ints(p), 1, params) for p in prompts(batch)]
        return sum(len(f.result().sequences[0].tokens) for f in futures)

    return run


def endpoint_round(url: str, new_tokens: int) -> Callable[[int], int]:
    """``run(batch)``: ``batch`` concurrent ``/completions`` requests through the official
    ``openai`` client; returns the tokens generated."""
    import openai

    async def requests(batch: int) -> int:
        async with openai.AsyncOpenAI(base_url=f"{url}/oai/api/v1", api_key="tml-bench") as oai:
            answers = await asyncio.gather(
                *(
                    oai.completions.create(
                        model=MODEL,
                        prompt=p,
                        max_tokens=new_tokens,
                        temperature=0,
                        extra_body={"ignore_eos": True},
                    )
                    for p in prompts(batch)
                )
            )
        return sum(a.usage.completion_tokens for a in answers if a.usage)

    return lambda batch: asyncio.run(requests(batch))


def measure(run: Callable[[int], int], batch: int, new_tokens: int) -> float:
    """Tokens per second of one ``run(batch)``; the place to add per-round extras (such
    as a scrape of the server's metrics)."""
    start = time.perf_counter()
    tokens = run(batch)
    wall = time.perf_counter() - start
    if tokens != batch * new_tokens:
        raise RuntimeError(f"expected {batch * new_tokens} tokens, got {tokens}")
    return tokens / wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".treadle")
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from treadle.engine.embedded import embedded_model_folder

    folder = embedded_model_folder(args.data_dir)
    emit(event="start", cpus=os.cpu_count(), model=MODEL, new_tokens=args.new_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        (data_dir / "models").mkdir()
        (data_dir / "models" / folder.name).symlink_to(folder)
        port = args.port or _free_port()
        server = start_server(data_dir, port)
        try:
            url = f"http://127.0.0.1:{port}"
            ways = {
                "sdk_sample": sdk_round(url, args.new_tokens),
                "openai_completions": endpoint_round(url, args.new_tokens),
            }
            for run in ways.values():  # warm-up: first requests pay for imports and caches
                run(1)
            results: dict[tuple[str, int], list[float]] = {key: [] for key in _keys(ways)}
            for round_ in range(args.rounds):
                for batch in BATCHES:
                    for impl, run in ways.items():
                        tok_s = measure(run, batch, args.new_tokens)
                        results[(impl, batch)].append(tok_s)
                        emit(round=round_, impl=impl, batch=batch, tok_s=round(tok_s, 2))
            for batch in BATCHES:
                sdk = statistics.median(results[("sdk_sample", batch)])
                endpoint = statistics.median(results[("openai_completions", batch)])
                emit(
                    summary=True,
                    batch=batch,
                    sdk_tok_s=round(sdk, 2),
                    openai_tok_s=round(endpoint, 2),
                    ratio=round(endpoint / sdk, 3),
                )
        finally:
            server.terminate()
            server.wait()


def _free_port() -> int:
    # A fixed port may still be held by another run's server, whose healthz would answer.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keys(ways: dict[str, Any]) -> list[tuple[str, int]]:
    return [(impl, batch) for impl in ways for batch in BATCHES]


if __name__ == "__main__":
    main()
