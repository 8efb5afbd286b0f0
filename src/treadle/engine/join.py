"""``treadle worker --join HOST:PORT``: a rank of a server's worker group on another
machine (:mod:`treadle.engine.group`).

This process imports no torch: it keeps one rank process (:mod:`treadle.engine.rank`)
connected to the server, and starts a new one whenever the last one ends (the group
restarted after a rank died, or the server went away and comes back). The rank loads
the served model from the same source the server names (a model folder at the same
path, a hub id in this machine's HF cache, or ``embedded`` converted into this
machine's data dir) and authenticates with the server's worker secret
(``DATA_DIR/worker-secret`` there, copied here).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from treadle.engine.process import tuned_environment

SECRET_ENV = "TREADLE_WORKER_SECRET"
# A rank that failed (refused by a complete group, could not load the model, killed) is
# followed by the next after a delay that doubles up to _MAX_RETRY_SECONDS, and starts
# again from a second once a rank served _SERVED_SECONDS. A rank whose server ended the
# group (exit 0) is followed at once: the server is restarting the group.
_MAX_RETRY_SECONDS = 30.0
_SERVED_SECONDS = 60.0
# The rank's exit code when the server refused its secret: trying again cannot help.
AUTH_REFUSED_EXIT = 4


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``; a ValueError saying what is wrong otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 10.0.0.5:29400)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def read_secret(secret_file: Path | None, data_dir: Path) -> str:
    """The worker secret, hex: ``$TREADLE_WORKER_SECRET``, else ``secret_file``, else the
    data dir's ``worker-secret`` (a server on this machine and data dir)."""
    env = os.environ.get(SECRET_ENV, "").strip()
    if env:
        return env
    path = secret_file or data_dir / "worker-secret"
    text = path.read_text().strip()
    bytes.fromhex(text)  # a ValueError for anything but a secret
    return text


def join(
    address: tuple[str, int],
    secret: str,
    data_dir: Path,
    device: str | None,
    log_level: str,
) -> int:
    """Keep a rank of the group at ``address`` running until interrupted; 2 if the
    server refuses the secret. The rank runs with treadle's process settings and every
    core of this machine (:mod:`treadle.engine.process`)."""
    env = tuned_environment()
    env[SECRET_ENV] = secret
    if is_loopback(address[0]) and platform.system() == "Linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args = [sys.executable, "-m", "treadle.engine.rank"]
    args += ["--connect", f"{address[0]}:{address[1]}", "--data-dir", str(data_dir)]
    args += ["--log-level", log_level]
    if device:
        args += ["--device", device]
    delay = 1.0
    while True:
        started = time.monotonic()
        code = subprocess.call(args, env=env)
        if code == AUTH_REFUSED_EXIT:
            print(
                "treadle worker: the server refused the secret; copy its DATA_DIR/worker-secret"
                " here and pass it with --secret-file",
                file=sys.stderr,
            )
            return 2
        if time.monotonic() - started > _SERVED_SECONDS:
            delay = 1.0
        if code != 0:
            time.sleep(delay)
            delay = min(2 * delay, _MAX_RETRY_SECONDS)
