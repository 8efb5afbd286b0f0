"""``treadle demo``: start a server, drive it with the official SDK, then say where to
watch and use what it trained.

The demo is tutorial 202 ("Loss Functions") as published, then a short fine-tune that
teaches the default model a new fact. At a terminal the server then keeps serving (the
console shows the demo's runs) until Ctrl-C; anywhere else (CI, tests) it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
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


class _NoLongPollRetries(logging.Filter):
    """Drops the SDK's warning that a result took longer than one long-poll and is asked
    for again (routine on a busy CPU; nothing is wrong and nothing is for the reader)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("because of try_again")


def where_to_look(url: str, key: str, base_model: str) -> str:
    """The console's URL and the OpenAI-compatible endpoint's, with a curl to paste;
    ``key`` is shell text setting KEY (a value, or a variable the reader has set)."""
    body = json.dumps(
        {
            "model": base_model,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 32,
        }
    )
    return (
        f"\n== Watching and using your models ==\n"
        f"console (runs, checkpoints, loss curves):  {url}/console\n"
        f"OpenAI-compatible API base URL:            {url}/oai/api/v1\n"
        f"try it (KEY is your API key; a server without keys takes any):\n"
        f"  KEY={key}\n"
        f'  curl -s {url}/oai/api/v1/chat/completions -H "Authorization: Bearer $KEY"'
        f" -H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def run_demo(settings: Settings, serve_argv: list[str]) -> int:
    """Serve ``settings`` with ``treadle serve`` and ``serve_argv``, run the demo, print
    where to look next; at a terminal, keep serving until Ctrl-C."""
    from treadle.demo import teach_a_fact, tutorial_202

    url = f"http://{settings.host}:{settings.port}"
    print(f"starting treadle on {url} (the first run converts the default model, ~1 min)")
    serve = [sys.executable, "-m", "treadle", "serve", *serve_argv, "--log-level", "warning"]
    server = subprocess.Popen(serve)
    try:
        _wait_ready(url, server, timeout=900)
        os.environ["TINKER_BASE_URL"] = url
        logging.getLogger("tinker.lib.api_future_impl").addFilter(_NoLongPollRetries())
        # A key of the reader's own is never printed: the curl below names its variable.
        key = '"$TINKER_API_KEY"' if "TINKER_API_KEY" in os.environ else "tml-demo"
        os.environ.setdefault("TINKER_API_KEY", "tml-demo")
        print("\n== Tutorial 202: loss functions ==")
        asyncio.run(tutorial_202.main())
        print("\n== Teaching the model a new fact ==")
        answer = teach_a_fact.main(settings.models[0].name)
        learned = "PURPLE-ELEPHANT-42" in answer
        print("\nthe model learned the fact" if learned else "\nthe model did not learn the fact")
        # A wildcard bind address is no address to browse to.
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        shown = f"http://{host}:{settings.port}"
        print(where_to_look(shown, key, settings.models[0].name))
        if sys.stdin.isatty() and sys.stdout.isatty():
            print(f"\ntreadle keeps serving on {shown}; press Ctrl-C to stop it")
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        return 0 if learned else 1
    finally:
        server.terminate()
        server.wait(timeout=60)
