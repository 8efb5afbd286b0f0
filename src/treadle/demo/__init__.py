"""``treadle demo``: start a server, drive it with the official SDK, stop it.

The demo is tutorial 202 ("Loss Functions") as published, then a short fine-tune that
teaches the default model a new fact.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx

from treadle.settings import Settings


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("treadle serve exited before it was ready")
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"treadle serve was not ready after {timeout:.0f} s")


def run_demo(settings: Settings, serve_argv: list[str]) -> int:
    """Serve ``settings`` with ``treadle serve`` and ``serve_argv``, run the demo, stop."""
    from treadle.demo import teach_a_fact, tutorial_202

    url = f"http://{settings.host}:{settings.port}"
    print(f"starting treadle on {url} (the first run converts the default model, ~1 min)")
    serve = [sys.executable, "-m", "treadle", "serve", *serve_argv, "--log-level", "warning"]
    server = subprocess.Popen(serve)
    try:
        _wait_ready(url, server, timeout=900)
        os.environ["TINKER_BASE_URL"] = url
        os.environ.setdefault("TINKER_API_KEY", "tml-demo")
        print("\n== Tutorial 202: loss functions ==")
        asyncio.run(tutorial_202.main())
        print("\n== Teaching the model a new fact ==")
        answer = teach_a_fact.main(settings.models[0].name)
        learned = "PURPLE-ELEPHANT-42" in answer
        print("\nthe model learned the fact" if learned else "\nthe model did not learn the fact")
        return 0 if learned else 1
    finally:
        server.terminate()
        server.wait(timeout=60)
