"""API keys: `treadle keys`, and a server that needs a valid key once any exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import QWEN
from tests.fixtures.server import Server


def _keys(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "treadle", "keys", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _new_key(data_dir: Path, user: str) -> str:
    done = _keys(data_dir, "create", "--user", user)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_keys_are_random_listed_by_prefix_and_stored_as_hashes(tmp_path: Path):
    alice, alice2 = _new_key(tmp_path, "alice"), _new_key(tmp_path, "alice")
    # tml- and 32 random bytes in URL-safe base64: 256 bits.
    assert re.fullmatch(r"tml-[A-Za-z0-9_-]{43}", alice) and alice != alice2
    listed = _keys(tmp_path, "list").stdout
    assert listed.count("alice") == 2 and alice[:12] in listed
    assert alice not in listed and alice2 not in listed
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("treadle.sqlite3*"))
    assert alice.encode() not in stored and alice[4:].encode() not in stored
    revoked = _keys(tmp_path, "revoke", alice[:12])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert _keys(tmp_path, "revoke", alice2).returncode == 0
    assert _keys(tmp_path, "list").stdout.count("revoked") == 2
    missing = _keys(tmp_path, "revoke", "tml-nothing")
    assert missing.returncode == 1 and "no active key" in missing.stderr
    bad = _keys(tmp_path, "create", "--user", "")
    assert bad.returncode == 2 and "user name" in bad.stderr


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("keyed") / "treadle"
    data_dir.mkdir()
    alice = _new_key(data_dir, "alice")
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, ["--long-poll-seconds", "2"])
    yield server, alice
    server.stop()


def _status(server: Server, key: str | None) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.post(f"{server.url}/api/v1/create_session", json={}, headers=headers)


def test_every_route_but_healthz_needs_a_valid_key(keyed):
    server, alice = keyed
    assert httpx.get(f"{server.url}/api/v1/healthz").status_code == 200
    for key in (None, "tml-made-up", alice[:-1]):
        response = _status(server, key)
        assert response.status_code == 401
        assert "treadle keys create" in response.json()["detail"]
    for path in ("/api/v1/get_server_capabilities", "/api/v1/training_runs"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
    assert _status(server, alice).status_code == 200
    client = tinker.ServiceClient(base_url=server.url, api_key=alice)
    tc = client.create_lora_training_client(base_model=QWEN, rank=4).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4]},
    )
    assert tc.forward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=server.url, api_key="tml-wrong").create_sampling_client(
            base_model=QWEN
        )
    client.close("success")


def _eventually(check, seconds: float = 10.0) -> bool:
    """True once ``check()`` is; keys are re-read at most a second after they change."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_keys_created_and_revoked_while_running_take_effect(keyed):
    server, _ = keyed
    bob = _new_key(server.data_dir, "bob")
    assert _eventually(lambda: _status(server, bob).status_code == 200)
    assert _keys(server.data_dir, "revoke", bob).returncode == 0
    assert _eventually(lambda: _status(server, bob).status_code == 401)


def test_a_server_open_to_the_network_refuses_to_start_without_keys(tmp_path: Path, tiny_models):
    done = subprocess.run(
        [sys.executable, "-m", "treadle", "serve", "--host", "0.0.0.0", "--port", "1"]
        + ["--data-dir", str(tmp_path), "--model", f"{QWEN}={tiny_models[QWEN]}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2
    assert "refusing to serve 0.0.0.0 without API keys" in done.stderr
    assert "treadle keys create" in done.stderr
