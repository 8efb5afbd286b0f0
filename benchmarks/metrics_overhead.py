"""What Prometheus costs: sampling throughput with and without a scraper hitting
``GET /metrics`` every second, on one server, in interleaved rounds. Prints JSON lines.

    .venv/bin/python benchmarks/metrics_overhead.py [--rounds 4]

A round is 16 concurrent greedy samples of 128 tokens (prompt 64 tokens, no early stop)
from the built-in model through the official SDK; rounds alternate between no scraper
(the baseline) and a scraper thread (as Prometheus would scrape, once a second), so
drift in the machine's speed hits both alike. ``ratio`` is the median tok/s with the
scraper over the median without (1.0: free). Both modes record the metrics and request
log alike (they are always on). In-process lines that no other load on the machine can
blur: ``record_us``, recording one finished request and one decode step; ``scrape_ms``,
one scrape's CPU time in the server, so ``core_share_at_1hz`` is the share of a core that
scraping once a second takes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from train_throughput import start_server  # (benchmarks/ is this script's sys.path[0])

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT_LEN, NEW_TOKENS, CONCURRENT = 64, 128, 16


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def prompts(count: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(100, 40000, PROMPT_LEN).tolist() for _ in range(count)]


class Scraper(threading.Thread):
    """GET /metrics once a second until stopped; keeps each scrape's seconds."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self._url = url
        self._halt = threading.Event()
        self.seconds: list[float] = []
        self.bytes = 0

    def run(self) -> None:
        import httpx

        with httpx.Client() as client:
            while not self._halt.is_set():
                start = time.perf_counter()
                response = client.get(f"{self._url}/metrics")
                response.raise_for_status()
                self.seconds.append(time.perf_counter() - start)
                self.bytes = len(response.content)
                self._halt.wait(1.0)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def sample_round(sampler: Any) -> float:
    """Generated tokens per second of one round of concurrent samples."""
    from tinker import types

    params = types.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop=[])
    start = time.perf_counter()
    futures = [
        sampler.sample(types.ModelInput.from_ints(p), 1, params) for p in prompts(CONCURRENT)
    ]
    generated = sum(len(f.result().sequences[0].tokens) for f in futures)
    return generated / (time.perf_counter() - start)


def in_process_costs(repeats: int = 20000) -> tuple[float, float]:
    """Microseconds to record one finished sample and one decode step (no log output),
    and milliseconds of one scrape (``generate_latest``) of the instruments so filled:
    the server's own CPU per scrape, whatever else the machine runs."""
    import logging

    from prometheus_client import generate_latest

    from treadle.service.metrics import Finished, Metrics, request_log

    request_log.setLevel(logging.WARNING)  # (the server logs at info; printing is not ours)
    metrics = Metrics()
    done = Finished("req-x", "user", MODEL, "s:sample:0", "sample", 64, 128, 0.01, 1.0, "ok")
    start = time.perf_counter()
    for _ in range(repeats):
        metrics.finished(done)
        metrics.decode_step(MODEL, 0.02)
    record_us = (time.perf_counter() - start) / repeats * 1e6
    for route in ("/api/v1/asample", "/api/v1/retrieve_future", "/api/v1/forward_backward"):
        metrics.http_request(route, "POST", 200)
    start = time.perf_counter()
    for _ in range(200):
        generate_latest(metrics.registry)
    return record_us, (time.perf_counter() - start) / 200 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each mode")
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".treadle")
    parser.add_argument("--port", type=int, default=8733)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tinker

    from treadle.engine.embedded import embedded_model_folder

    folder = embedded_model_folder(args.data_dir)
    emit(event="start", cpus=os.cpu_count(), model=MODEL, concurrent=CONCURRENT)
    record_us, scrape_ms = in_process_costs()
    emit(metric="record_us", value=round(record_us, 2))
    # At one scrape a second, the share of one core scraping takes.
    emit(metric="scrape_ms", value=round(scrape_ms, 3), core_share_at_1hz=scrape_ms / 1000)
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        (data_dir / "models").mkdir()
        (data_dir / "models" / folder.name).symlink_to(folder)
        server = start_server(data_dir, args.port)
        try:
            client = tinker.ServiceClient(base_url=url, api_key="tml-bench")
            sampler = client.create_sampling_client(base_model=MODEL).result()
            sample_round(sampler)  # warm-up
            rates: dict[str, list[float]] = {"off": [], "scraped": []}
            scrapes: list[float] = []
            for index in range(args.rounds):
                for mode in ("off", "scraped") if index % 2 == 0 else ("scraped", "off"):
                    scraper = Scraper(url) if mode == "scraped" else None
                    if scraper is not None:
                        scraper.start()
                    rate = sample_round(sampler)
                    if scraper is not None:
                        scraper.stop()
                        scrapes += scraper.seconds
                        emit(
                            mode=mode,
                            round=index,
                            tok_s=round(rate, 1),
                            scrapes=len(scraper.seconds),
                            metrics_bytes=scraper.bytes,
                        )
                    else:
                        emit(mode=mode, round=index, tok_s=round(rate, 1))
                    rates[mode].append(rate)
            client.close("success")
        finally:
            server.terminate()
            server.wait()
    off, scraped = statistics.median(rates["off"]), statistics.median(rates["scraped"])
    emit(
        metric="ratio",
        tok_s_off=round(off, 1),
        tok_s_scraped=round(scraped, 1),
        ratio=round(scraped / off, 4),
        scrape_ms_median=round(statistics.median(scrapes) * 1000, 2),
        scrapes=len(scrapes),
    )


if __name__ == "__main__":
    main()
