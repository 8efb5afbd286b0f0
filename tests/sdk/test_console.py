"""The web console in a real browser (Debian's headless Chromium driven by playwright): a
run trained through the SDK is listed with its checkpoint and a loss curve with one point
per step, publishing from the console is what the SDK then sees, another user sees
nothing of it, forged or stale forms change nothing, and curves survive a restart."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import QWEN
from tests.fixtures.server import Server
from treadle.service.store import Store, TrainingRunRow, TrainingStepRow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Rendered inert, or the page would run it (and set window.__pwned).
SCRIPT = "<script>window.__pwned = 1</script>"
ADAM = types.AdamParams(learning_rate=0.05)


def _datum(tokens: list[int], weights: list[float]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


# Fractional weights: a step's loss tokens are the sum of its weights (not a count).
DATA = [
    _datum([1, 2, 3, 4, 5, 6], [0.0, 0.5, 1.0, 1.0, 0.25]),
    _datum([9, 40, 41, 42], [1.0, 1.0, 0.5]),
]
WEIGHT_SUM = 0.5 + 1.0 + 1.0 + 0.25 + 1.0 + 1.0 + 0.5


def _new_key(data_dir: Path, user: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "treadle", "keys", "create", "--user", user]
        + ["--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Trained:
    server: Server
    alice: str
    bob: str
    run_id: str
    checkpoint: str
    losses: list[float]  # loss:sum of each step, as the SDK returned them


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_models) -> Iterator[Trained]:
    """alice trains 3 steps and saves a checkpoint; bob has a key and nothing else."""
    data_dir = tmp_path_factory.mktemp("console") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    server = Server({QWEN: tiny_models[QWEN]}, data_dir)
    client = tinker.ServiceClient(base_url=server.url, api_key=alice)
    tc = client.create_lora_training_client(
        base_model=QWEN, rank=4, user_metadata={"name": SCRIPT}
    ).result()
    losses = []
    for step in range(3):
        if step == 1:  # a forward computes no gradient: not part of the step
            tc.forward(DATA, "cross_entropy").result()
        # Two forward_backward calls make one step: their losses add up.
        first = tc.forward_backward(DATA[:1], "cross_entropy")
        second = tc.forward_backward(DATA[1:], "cross_entropy")
        tc.optim_step(ADAM).result()
        losses.append(first.result().metrics["loss:sum"] + second.result().metrics["loss:sum"])
    checkpoint = tc.save_state("console-ckpt").result().path
    client.close("success")  # (the run and its curve stay listed)
    holder = Trained(server, alice, bob, tc.model_id, checkpoint, losses)
    yield holder
    holder.server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    # Installed by scripts/test.sh; a missing browser is a failure, never a skip.
    assert shutil.which("chromium") == CHROMIUM, "install Debian's chromium (scripts/test.sh)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Console:
    """A browser tab logged in (or not) to the console, collecting the page's errors."""

    def __init__(self, browser, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1100, "height": 900})
        self.page = self.context.new_page()
        self.url = url
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", self._console)
        self.page.on("dialog", lambda dialog: dialog.accept())

    def _console(self, message) -> None:
        # (The login page's own 401 is reported as a resource that failed to load.)
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def login(self, key: str) -> int:
        """The status of the page the login form leads to."""
        first = self.page.goto(f"{self.url}/console")
        assert first is not None and first.status == 401  # the login page
        self.page.fill("#key", key)
        with self.page.expect_navigation() as landed:
            self.page.click("form.login button")
        return int(landed.value.status)

    def close(self) -> None:
        self.context.close()


def _public(trained: Trained) -> bool:
    rest = tinker.RestClient(base_url=trained.server.url, api_key=trained.alice)
    rows = rest.list_checkpoints(trained.run_id).result().checkpoints
    (row,) = [c for c in rows if c.tinker_path == trained.checkpoint]
    return bool(row.public)


def _check_curve(console: Console, trained: Trained) -> None:
    page = console.page
    page.wait_for_selector('#loss-chart[data-points="3"]')
    plotted = page.eval_on_selector("#loss-chart", "el => JSON.parse(el.dataset.plotted)")
    assert plotted[0] == [1, 2, 3]
    assert plotted[1] == pytest.approx([loss / WEIGHT_SUM for loss in trained.losses], rel=1e-9)
    rows = page.eval_on_selector_all(
        "#steps tr.step",
        "rows => rows.map(r => [+r.dataset.step, +r.dataset.lossSum, +r.dataset.lossTokens,"
        " +r.dataset.datums])",
    )
    assert [r[0] for r in rows] == [1, 2, 3]
    assert [r[1] for r in rows] == pytest.approx(trained.losses, rel=1e-9)
    assert [r[2] for r in rows] == [WEIGHT_SUM] * 3
    assert [r[3] for r in rows] == [2, 2, 2]
    assert page.locator("#loss-chart canvas").count() >= 1  # uPlot drew it


def _screenshot(page, shot: Path) -> None:
    """A test artifact: under the test's tmp_path, and in $TREADLE_TEST_ARTIFACTS if set."""
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("TREADLE_TEST_ARTIFACTS"):
        artifacts = Path(os.environ["TREADLE_TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / shot.name)


def test_console_lists_the_run_its_checkpoint_and_a_point_per_step(
    trained: Trained, browser, tmp_path: Path
):
    console = Console(browser, trained.server.url)
    assert console.login(trained.alice) == 200
    page = console.page
    run = page.locator(f'section.run[data-run-id="{trained.run_id}"]')
    assert run.count() == 1
    assert run.locator(f'tr.checkpoint[data-tinker-path="{trained.checkpoint}"]').count() == 1
    progress = run.locator("p.progress")
    assert progress.get_attribute("data-steps") == "3"
    assert f"{trained.losses[-1] / WEIGHT_SUM:.4g}" in progress.inner_text()
    # The metadata is shown as text, and never ran.
    assert SCRIPT in run.locator("dl.metadata").inner_text()
    assert page.evaluate("() => window.__pwned") is None
    queue = page.locator(f'#queues tr[data-model="{QWEN}"] td[data-field="requests"]')
    assert queue.inner_text() == "0"
    _screenshot(page, tmp_path / "console-runs.png")
    with page.expect_navigation():
        run.locator("h2 a").click()
    _check_curve(console, trained)
    assert SCRIPT in page.locator("dl.metadata").inner_text()
    assert page.evaluate("() => window.__pwned") is None
    _screenshot(page, tmp_path / "console-run.png")
    # No script error, and nothing the page's CSP refused.
    assert console.errors == []
    console.close()


def test_publish_and_unpublish_from_the_console_is_what_the_sdk_sees(trained: Trained, browser):
    console = Console(browser, trained.server.url)
    console.login(trained.alice)
    page = console.page
    page.goto(f"{trained.server.url}/console/runs/{trained.run_id}")
    assert not _public(trained)
    with page.expect_navigation():
        page.click(f'tr.checkpoint[data-tinker-path="{trained.checkpoint}"] button.publish')
    assert page.url.endswith(f"/console/runs/{trained.run_id.replace(':', '%3A')}")
    assert _public(trained)
    row = page.locator(f'tr.checkpoint[data-tinker-path="{trained.checkpoint}"]')
    assert row.get_attribute("data-public") == "true"
    with page.expect_navigation():
        row.locator("button.unpublish").click()
    assert not _public(trained)
    assert console.errors == []
    console.close()


def test_another_users_console_shows_none_of_it(trained: Trained, browser):
    console = Console(browser, trained.server.url)
    assert console.login(trained.bob) == 200
    page = console.page
    assert page.locator("header .who").inner_text() == "bob"
    assert page.locator("section.run").count() == 0
    assert trained.run_id not in page.content()
    answer = page.goto(f"{trained.server.url}/console/runs/{trained.run_id}")
    assert answer is not None and answer.status == 404
    assert "Not found" in page.locator("h1").inner_text()
    assert trained.checkpoint not in page.content()
    console.close()


def _logged_in(url: str, key: str) -> tuple[httpx.Client, str]:
    """A raw HTTP client logged in with ``key``, and its session's CSRF token."""
    http = httpx.Client(base_url=url, timeout=30)
    answer = http.post("/console/login", data={"key": key})
    assert answer.status_code == 303
    page = http.get("/console")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert page.status_code == 200 and token
    return http, token.group(1)


def test_wrong_keys_forged_forms_and_other_users_change_nothing(trained: Trained):
    url = trained.server.url
    action = f"/console/runs/{trained.run_id}/checkpoints/weights/console-ckpt"
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        for key in ("tml-wrong", "", "x" * 100_000, trained.alice + "x"):
            answer = anonymous.post("/console/login", data={"key": key})
            assert answer.status_code == 401, key[:20]
            assert "unknown or revoked" in answer.text
            assert 'id="login-error"' in answer.text
        assert anonymous.get("/console").status_code == 401
        assert anonymous.get("/console/queue").status_code == 401
        assert anonymous.post(f"{action}/delete", data={"csrf": "x"}).status_code == 401
        assert anonymous.get(f"/console/runs/{trained.run_id}").status_code == 401

    bob, bob_token = _logged_in(url, trained.bob)
    # bob's own valid session and token, on alice's checkpoint: "not found".
    answer = bob.post(f"{action}/delete", data={"csrf": bob_token})
    assert answer.status_code == 404 and "Not found" in answer.text
    answer = bob.post(f"{action}/publish", data={"csrf": bob_token})
    assert answer.status_code == 404
    bob.close()

    alice, token = _logged_in(url, trained.alice)
    assert alice.post(f"{action}/delete").status_code == 403  # no token
    assert alice.post(f"{action}/delete", data={"csrf": token + "x"}).status_code == 403
    assert alice.post(f"{action}/delete", data={"csrf": "x" * 20_000}).status_code == 403
    # What a page of the console answers to bad paths: what to change, never a 500.
    answer = alice.post(f"{action}/explode", data={"csrf": token})
    assert answer.status_code == 400 and "unknown action" in answer.text
    bad_kind = f"/console/runs/{trained.run_id}/checkpoints/nope/console-ckpt/delete"
    assert alice.post(bad_kind, data={"csrf": token}).status_code == 400
    assert alice.get("/console/runs/no-such-run").status_code == 404
    # The console's cookie is no API credential.
    assert alice.get("/api/v1/training_runs").status_code == 401
    queues = alice.get("/console/queue").json()
    assert set(queues) == {QWEN} and queues[QWEN]["requests"] == 0
    assert set(queues[QWEN]) == {"requests", "tokens", "samples_waiting", "sequences_decoding"}
    # Logged out, the same cookie jar is a stranger again.
    assert alice.post("/console/logout", data={"csrf": token}).status_code == 303
    assert alice.get("/console").status_code == 401
    alice.close()

    rest = tinker.RestClient(base_url=url, api_key=trained.alice)
    paths = [c.tinker_path for c in rest.list_checkpoints(trained.run_id).result().checkpoints]
    assert trained.checkpoint in paths


def test_revoking_the_key_logs_the_console_out(trained: Trained):
    spare = _new_key(trained.server.data_dir, "alice")
    http, _ = _logged_in(trained.server.url, spare)
    assert trained.run_id in http.get("/console").text
    done = subprocess.run(
        [sys.executable, "-m", "treadle", "keys", "revoke", spare]
        + ["--data-dir", str(trained.server.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 30  # the server re-reads a key within a second
    while (page := http.get("/console")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert page.status_code == 401 and trained.run_id not in page.text
    http.close()


def test_curves_survive_a_restart_and_delete_removes_the_checkpoint(
    trained: Trained, browser, tiny_models
):
    trained.server.stop()
    trained.server = Server({QWEN: tiny_models[QWEN]}, trained.server.data_dir)
    console = Console(browser, trained.server.url)
    console.login(trained.alice)
    page = console.page
    page.goto(f"{trained.server.url}/console/runs/{trained.run_id}")
    _check_curve(console, trained)
    folder = trained.server.data_dir / "checkpoints" / trained.run_id / "weights" / "console-ckpt"
    assert folder.is_dir()
    with page.expect_navigation():
        page.click(f'tr.checkpoint[data-tinker-path="{trained.checkpoint}"] button.delete')
    assert page.locator("tr.checkpoint").count() == 0
    assert not folder.exists()
    rest = tinker.RestClient(base_url=trained.server.url, api_key=trained.alice)
    assert rest.list_checkpoints(trained.run_id).result().checkpoints == []
    assert console.errors == []
    console.close()


def test_a_long_curve_is_thinned_to_evenly_spaced_steps(tmp_path: Path):
    store = Store(tmp_path / "treadle.sqlite3")
    for step in range(1, 5001):
        store.add_training_step(TrainingStepRow("run", step, float(step), 2.0, 1))
    store.add_training_step(TrainingStepRow("other", 1, 9.0, 1.0, 1))
    store.add_training_step(TrainingStepRow("other", 2, 8.0, 1.0, 1))
    shown = store.training_steps("run", 2000)
    # Every 3rd step (5000 / 2000, rounded up), from the first.
    assert [row.step for row in shown] == list(range(1, 5001, 3))
    assert all(row.loss_sum == row.step and row.model_id == "run" for row in shown)
    assert [row.step for row in store.training_steps("run", 10_000)] == list(range(1, 5001))
    assert store.training_steps("nothing", 10) == []
    # The index's summary: each of a user's runs' last step, and no one else's.
    for user, run in (("alice", "run"), ("bob", "other"), ("alice", "idle")):
        store.add_session(f"s-{run}", None, [], {}, None, None, user)
        store.add_training_run(
            TrainingRunRow(run, f"s-{run}", QWEN, 4, True, True, True, None, {}, 0.0, 0.0, user)
        )
    last = store.last_training_steps("alice")
    assert last == {"run": TrainingStepRow("run", 5000, 5000.0, 2.0, 1)}
    assert store.last_training_steps("bob") == {"other": TrainingStepRow("other", 2, 8.0, 1.0, 1)}
    store.close()


def test_a_server_without_keys_opens_its_console_to_its_one_local_user(tmp_path: Path, tiny_models):
    """The demo's case: no keys, no login; the forms still need the session's token."""
    server = Server({QWEN: tiny_models[QWEN]}, tmp_path / "treadle")
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key="tml-anything")
        tc = client.create_lora_training_client(base_model=QWEN, rank=4).result()
        tc.forward_backward(DATA, "cross_entropy").result()
        tc.optim_step(ADAM).result()
        tc.save_state("ckpt").result()
        client.close("success")
        with httpx.Client(base_url=server.url, timeout=30) as http:
            page = http.get("/console")
            assert page.status_code == 200
            assert '<span class="who">local</span>' in page.text
            assert f'data-run-id="{tc.model_id}"' in page.text and 'data-steps="1"' in page.text
            action = f"/console/runs/{tc.model_id}/checkpoints/weights/ckpt/publish"
            assert http.post(action).status_code == 403
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token and http.post(action, data={"csrf": token.group(1)}).status_code == 303
        rest = tinker.RestClient(base_url=server.url, api_key="tml-anything")
        assert [c.public for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [True]
    finally:
        server.stop()
