"""A checkpoint's life after its save, and the rest of the REST API, through the SDK and
its ``tinker`` CLI: TTLs and expiry (also across a restart), publish / unpublish,
copy_weights, search_sessions, assign_session_project, the audit log, whoami."""

from __future__ import annotations

import datetime
import os
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import QWEN
from tests.fixtures.server import Server
from tests.sdk.test_keys import _new_key

DATUM = types.Datum(
    model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
    loss_fn_inputs={"target_tokens": [6, 7, 8, 9]},
)
HOUR = 3600


@pytest.fixture(scope="module")
def two_users(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("lifecycle") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, ["--long-poll-seconds", "2"])
    yield server, alice, bob
    server.stop()


def _trained(client: tinker.ServiceClient) -> tinker.TrainingClient:
    tc = client.create_lora_training_client(base_model=QWEN, rank=4, seed=3).result()
    tc.forward_backward([DATUM], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    return tc


def _loss(tc: tinker.TrainingClient) -> float:
    return tc.forward([DATUM], "cross_entropy").result().metrics["loss:sum"]


def _listed(rest: tinker.RestClient, path: str) -> types.Checkpoint | None:
    run = path.removeprefix("tinker://").split("/")[0]
    found = [c for c in rest.list_checkpoints(run).result().checkpoints if c.tinker_path == path]
    return found[0] if found else None


def _folder(server: Server, path: str) -> Path:
    run, kind, name = path.removeprefix("tinker://").split("/")
    return server.data_dir / "checkpoints" / run / kind / name


def _cli(server: Server, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The SDK's own ``tinker`` CLI, pointed at ``server``."""
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": key}
    return subprocess.run(
        [str(Path(sys.executable).parent / "tinker"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _set_expiry(data_dir: Path, path: str, expires_at: float) -> None:
    """Move a checkpoint's expiry in the data dir's database: a test cannot wait the
    hour that is the shortest TTL."""
    with sqlite3.connect(data_dir / "treadle.sqlite3") as db:
        db.execute(
            "UPDATE checkpoints SET expires_at = ? WHERE tinker_path = ?", (expires_at, path)
        )


def _audit(key: str, server: Server, **kwargs) -> list[types.AuditLogEntry]:
    admin = tinker.AdminClient(base_url=server.url, api_key=key)
    return admin.get_audit_log(**kwargs).result().entries


def _expires_in(checkpoint: types.Checkpoint | None) -> float:
    assert checkpoint is not None and checkpoint.expires_at is not None
    return checkpoint.expires_at.timestamp() - time.time()


def test_ttls_of_saves_and_set_ttl_through_the_sdk_and_cli(two_users):
    server, alice_key, bob_key = two_users
    client = tinker.ServiceClient(base_url=server.url, api_key=alice_key)
    rest = tinker.RestClient(base_url=server.url, api_key=alice_key)
    tc = _trained(client)
    state = tc.save_state("kept-a-day", ttl_seconds=24 * HOUR).result().path
    weights = tc.save_weights_for_sampler("kept-an-hour", ttl_seconds=HOUR).result().path
    forever = tc.save_state("forever").result().path
    # Expiries are the save's time plus the TTL (a minute of slack for a slow machine).
    assert 24 * HOUR - 60 < _expires_in(_listed(rest, state)) <= 24 * HOUR
    assert HOUR - 60 < _expires_in(_listed(rest, weights)) <= HOUR
    assert _listed(rest, forever).expires_at is None
    # A TTL under the documented hour fails the save as the user's error; the model's
    # later requests still run (the failed save took its turn).
    for bad in (10, 0, -1):
        with pytest.raises(tinker.RequestFailedError, match="ttl_seconds must be between 3600"):
            tc.save_state(f"bad{bad}", ttl_seconds=bad).result()
    assert _listed(rest, tc.save_state("after").result().path) is not None
    assert not (server.data_dir / "checkpoints" / tc.model_id / "weights" / "bad10").exists()

    rest.set_checkpoint_ttl_from_tinker_path(forever, 2 * HOUR).result()
    assert 2 * HOUR - 60 < _expires_in(_listed(rest, forever)) <= 2 * HOUR
    rest.set_checkpoint_ttl_from_tinker_path(forever, None).result()
    assert _listed(rest, forever).expires_at is None

    done = _cli(server, alice_key, "checkpoint", "set-ttl", state, "--remove")
    assert done.returncode == 0, done.stderr
    assert _listed(rest, state).expires_at is None
    done = _cli(server, alice_key, "checkpoint", "set-ttl", weights, "--ttl", str(3 * HOUR))
    assert done.returncode == 0, done.stderr
    assert 3 * HOUR - 60 < _expires_in(_listed(rest, weights)) <= 3 * HOUR
    listed = _cli(
        server, alice_key, "--format", "json", "checkpoint", "list", "--run-id", tc.model_id
    )
    assert listed.returncode == 0 and "expires_at" in listed.stdout
    done = _cli(server, alice_key, "checkpoint", "set-ttl", weights, "--ttl", "60")
    assert done.returncode != 0 and "3600" in done.stdout + done.stderr

    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": alice_key})
    run, kind, name = weights.removeprefix("tinker://").split("/")
    for body in ({"ttl_seconds": -5}, {"ttl_seconds": 11 * 365 * 24 * HOUR}):
        response = http.put(f"/training_runs/{run}/checkpoints/{kind}/{name}/ttl", json=body)
        assert response.status_code == 400 and "ttl_seconds" in response.json()["detail"]
    assert 3 * HOUR - 60 < _expires_in(_listed(rest, weights)) <= 3 * HOUR
    # Only the owner sets a TTL: for bob the checkpoint does not exist.
    bob_rest = tinker.RestClient(base_url=server.url, api_key=bob_key)
    with pytest.raises(tinker.NotFoundError):
        bob_rest.set_checkpoint_ttl_from_tinker_path(weights, None).result()
    done = _cli(server, bob_key, "checkpoint", "set-ttl", weights, "--remove")
    assert done.returncode != 0 and "not found" in (done.stdout + done.stderr).lower()
    assert _listed(rest, weights).expires_at is not None
    client.close("success")


def test_an_expired_checkpoint_is_deleted_at_its_time(two_users):
    server, alice_key, _ = two_users
    client = tinker.ServiceClient(base_url=server.url, api_key=alice_key)
    rest = tinker.RestClient(base_url=server.url, api_key=alice_key)
    tc = _trained(client)
    doomed = tc.save_weights_for_sampler("doomed", ttl_seconds=HOUR).result().path
    kept = tc.save_weights_for_sampler("kept", ttl_seconds=HOUR).result().path
    _set_expiry(server.data_dir, doomed, time.time() + 1)
    deadline = time.monotonic() + 120
    while _listed(rest, doomed) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _listed(rest, doomed) is None
    assert not _folder(server, doomed).exists()
    assert _listed(rest, kept) is not None and _folder(server, kept).is_dir()
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(doomed).result()
    expired = [e for e in _audit(alice_key, server) if e.event == "checkpoint_expire"]
    assert [e.event_details["tinker_path"] for e in expired] == [doomed]
    assert expired[0].event_details["actor"] == "treadle"
    client.close("success")


def test_checkpoints_that_expired_while_no_server_ran_are_deleted_at_start(
    tmp_path_factory, tiny_models
):
    data_dir = tmp_path_factory.mktemp("restart") / "treadle"
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, ["--long-poll-seconds", "2"])
    client = tinker.ServiceClient(base_url=server.url, api_key="tml-local")
    tc = _trained(client)
    doomed = tc.save_state("doomed", ttl_seconds=HOUR).result().path
    later = tc.save_state("later", ttl_seconds=HOUR).result().path
    forever = tc.save_state("forever").result().path
    client.close("success")
    server.stop()
    _set_expiry(data_dir, doomed, time.time() - 10)
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, ["--long-poll-seconds", "2"])
    ready = time.time()
    try:
        rest = tinker.RestClient(base_url=server.url, api_key="tml-local")
        # Gone before the server answered its first request.
        assert _listed(rest, doomed) is None and not _folder(server, doomed).exists()
        assert _listed(rest, later).expires_at is not None and _folder(server, later).is_dir()
        assert _listed(rest, forever) is not None
        expired = [e for e in _audit("tml-local", server) if e.event == "checkpoint_expire"]
        assert [e.event_details["tinker_path"] for e in expired] == [doomed]
        # At start-up, not at the first housekeeping tick (5 s after it).
        assert expired[0].timestamp.timestamp() <= ready
    finally:
        server.stop()


def test_publish_and_unpublish_through_the_sdk_and_cli_by_the_owner_only(two_users):
    server, alice_key, bob_key = two_users
    client = tinker.ServiceClient(base_url=server.url, api_key=alice_key)
    rest = tinker.RestClient(base_url=server.url, api_key=alice_key)
    bob_rest = tinker.RestClient(base_url=server.url, api_key=bob_key)
    tc = _trained(client)
    path = tc.save_state("shared").result().path
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_weights_info_by_tinker_path(path).result()

    done = _cli(server, alice_key, "checkpoint", "publish", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _listed(rest, path).public
    assert bob_rest.get_weights_info_by_tinker_path(path).result().lora_rank == 4
    # Bob can read it, not change it.
    for command in ("unpublish", "publish"):
        done = _cli(server, bob_key, "checkpoint", command, path)
        assert done.returncode != 0 and "not found" in (done.stdout + done.stderr).lower()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.unpublish_checkpoint_from_tinker_path(path).result()
    assert _listed(rest, path).public

    done = _cli(server, alice_key, "checkpoint", "unpublish", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not _listed(rest, path).public
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_weights_info_by_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.publish_checkpoint_from_tinker_path(path).result()
    rest.publish_checkpoint_from_tinker_path(path).result()
    assert _listed(rest, path).public
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    assert not _listed(rest, path).public
    client.close("success")


def test_copy_weights(two_users):
    server, alice_key, bob_key = two_users
    alice = tinker.ServiceClient(base_url=server.url, api_key=alice_key, project_id="archive")
    rest = tinker.RestClient(base_url=server.url, api_key=alice_key)
    tc = _trained(alice)
    source = tc.save_state("step1").result().path
    expected = _loss(tc)

    # Into a new run of a new session in the client's project.
    copy = alice.copy_weights(source).result()
    run = copy.removeprefix("tinker://").split("/")[0]
    assert copy == f"tinker://{run}/weights/step1" and run != tc.model_id
    assert _listed(rest, copy).expires_at is None and not _listed(rest, copy).public
    assert rest.get_training_run(run).result().model_owner == "alice"
    for file in _folder(server, source).iterdir():
        assert (_folder(server, copy) / file.name).read_bytes() == file.read_bytes()
    loaded = alice.create_training_client_from_state_with_optimizer(copy).result()
    assert _loss(loaded) == pytest.approx(expected, rel=1e-6)
    # The copy has its own TTL (the source's is not inherited).
    rest.set_checkpoint_ttl_from_tinker_path(source, 5 * HOUR).result()
    timed = rest.copy_weights(source, "archive", ttl_seconds=2 * HOUR).result()
    assert 2 * HOUR - 60 < _expires_in(_listed(rest, timed)) <= 2 * HOUR

    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": alice_key})
    session = tc.model_id.split(":train:")[0]
    # Into another of alice's runs: the run that holds the first copy.
    other_session = run.split(":train:")[0]
    response = http.post(
        "/copy_weights",
        json={
            "source_path": tc.save_weights_for_sampler("w").result().path,
            "session_id": other_session,
            "model_seq_id": 0,
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["tinker_path"] == f"tinker://{run}/sampler_weights/w"
    # ... and into a new run in a slot of a live session.
    response = http.post(
        "/copy_weights", json={"source_path": source, "session_id": session, "model_seq_id": 7}
    )
    assert response.json()["tinker_path"] == f"tinker://{session}:train:7/weights/step1"
    # A retry with the same idempotency key answers the first copy's path.
    once = {"source_path": source, "destination_project_id": "archive"}
    headers = {"X-Idempotency-Key": "copy-once"}
    first = http.post("/copy_weights", json=once, headers=headers).json()["tinker_path"]
    assert http.post("/copy_weights", json=once, headers=headers).json()["tinker_path"] == first
    runs_before = rest.list_training_runs(limit=100).result().cursor.total_count

    errors = {
        "existing destination": (
            {"source_path": source, "session_id": session, "model_seq_id": 7},
            400,
            "exists",
        ),
        "bad name": (
            {"source_path": f"tinker://{tc.model_id}/weights/../x", "destination_project_id": "a"},
            400,
            "must",
        ),
        "bad kind": (
            {"source_path": f"tinker://{tc.model_id}/nope/x", "destination_project_id": "a"},
            400,
            "must",
        ),
        "unknown source": (
            {"source_path": f"tinker://{tc.model_id}/weights/none", "destination_project_id": "a"},
            404,
            "no checkpoint",
        ),
        "no destination": ({"source_path": source}, 400, "destination_project_id"),
        "no slot": ({"source_path": source, "session_id": session}, 400, "model_seq_id"),
        "short ttl": (
            {"source_path": source, "destination_project_id": "a", "ttl_seconds": 60},
            400,
            "ttl_seconds",
        ),
    }
    for what, (body, status, text) in errors.items():
        response = http.post("/copy_weights", json=body)
        assert response.status_code == status, (what, response.text)
        assert text in response.json()["detail"], what
    assert rest.list_training_runs(limit=100).result().cursor.total_count == runs_before
    with pytest.raises(tinker.NotFoundError):
        rest.copy_weights(f"tinker://{tc.model_id}/weights/none", "a").result()

    # Bob: alice's private checkpoint does not exist; a published one he copies into his
    # own run, which stays his when alice deletes the source.
    bob = tinker.ServiceClient(base_url=server.url, api_key=bob_key, project_id="mine")
    bob_rest = tinker.RestClient(base_url=server.url, api_key=bob_key)
    with pytest.raises(tinker.NotFoundError):
        bob.copy_weights(source).result()
    bob_http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": bob_key})
    rest.publish_checkpoint_from_tinker_path(source).result()
    into_alice = bob_http.post(
        "/copy_weights", json={"source_path": source, "session_id": session, "model_seq_id": 8}
    )
    assert into_alice.status_code == 404
    bobs = bob.copy_weights(source).result()
    bob_run = bobs.removeprefix("tinker://").split("/")[0]
    assert bob_rest.get_training_run(bob_run).result().model_owner == "bob"
    assert bobs in {c.tinker_path for c in bob_rest.list_user_checkpoints().result().checkpoints}
    assert bobs not in {
        c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints
    }
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(bobs).result()
    rest.delete_checkpoint_from_tinker_path(source).result()
    bobs_model = bob.create_training_client_from_state(bobs).result()
    assert _loss(bobs_model) == pytest.approx(expected, rel=1e-6)
    alice.close("success")
    bob.close("success")


def test_search_sessions_and_assign_session_project(two_users):
    server, alice_key, bob_key = two_users
    rest = tinker.RestClient(base_url=server.url, api_key=alice_key)
    tag = f"search-{time.time_ns()}"
    nightly = tinker.ServiceClient(
        {"suite": tag, "kind": "nightly"},
        "proj-a",
        display_name="Nightly RL run",
        base_url=server.url,
        api_key=alice_key,
    )
    tc = _trained(nightly)
    tc.save_state("s1").result()
    tc.save_weights_for_sampler("s2").result()
    weekly = tinker.ServiceClient(
        {"suite": tag, "kind": "weekly"},
        "proj-b",
        display_name="weekly SFT",
        base_url=server.url,
        api_key=alice_key,
    )
    weekly_session = weekly.create_lora_training_client(base_model=QWEN, rank=2).result()
    weekly_session = weekly_session.model_id.split(":train:")[0]
    weekly.close("errored").result()
    nightly_session = tc.model_id.split(":train:")[0]

    def search(**kwargs) -> types.SessionSearchResponse:
        kwargs.setdefault("user_metadata", {"suite": tag})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rest.search_sessions(types.SessionSearchRequest(**kwargs)).result()

    found = search()
    assert [s.session_id for s in found.sessions] == [weekly_session, nightly_session]
    assert found.next_cursor is None
    first = found.sessions[1]
    assert first.owner == "alice" and first.project_id == "proj-a"
    assert first.display_name == "Nightly RL run" and first.checkpoints_count == 2
    assert first.status.type == "active" and first.user_metadata["kind"] == "nightly"
    assert first.checkpoint_storage_bytes > 0
    assert found.sessions[0].status.type == "client_finished"
    assert found.sessions[0].status.reason.type == "errored"
    assert found.sessions[0].checkpoints_count == 0

    assert [s.session_id for s in search(display_name="rl NIGHTLY").sessions] == [nightly_session]
    assert [
        s.session_id for s in search(user_metadata={"suite": tag, "kind": "weekly"}).sessions
    ] == [weekly_session]
    assert [s.session_id for s in search(project_ids=["proj-b"]).sessions] == [weekly_session]
    assert [s.session_id for s in search(statuses=[types.ActiveSessionStatusQuery()]).sessions] == [
        nightly_session
    ]
    assert (
        search(statuses=[types.ClientFinishedSessionStatusQuery(reasons=["success"])]).sessions
        == []
    )
    assert [s.session_id for s in search(session_id=weekly_session, user_metadata={}).sessions] == [
        weekly_session
    ]
    # One session per page, newest first, through the cursor.
    page = search(limit=1)
    assert [s.session_id for s in page.sessions] == [weekly_session] and page.next_cursor
    page = search(limit=1, cursor=page.next_cursor)
    assert [s.session_id for s in page.sessions] == [nightly_session] and page.next_cursor is None

    rest.assign_session_project(weekly_session, "proj-a").result()
    assert len(search(project_ids=["proj-a"]).sessions) == 2
    with pytest.raises(tinker.BadRequestError):
        rest.assign_session_project(weekly_session, "").result()

    # Bob sees none of it, whoever he names as owner, and cannot move alice's sessions.
    bob_rest = tinker.RestClient(base_url=server.url, api_key=bob_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for owner in (
            types.OwnSearchOwner(),
            types.AccessibleSearchOwner(),
            types.UserSearchOwner(owner_urns=["alice"]),
        ):
            request = types.SessionSearchRequest(user_metadata={"suite": tag}, owner=owner)
            assert bob_rest.search_sessions(request).result().sessions == []
    with pytest.raises(tinker.NotFoundError):
        bob_rest.assign_session_project(nightly_session, "bobs").result()
    assert {s.project_id for s in search().sessions} == {"proj-a"}
    nightly.close("success")


def test_audit_log_records_who_did_what_for_the_owner_only(two_users):
    server, alice_key, bob_key = two_users
    client = tinker.ServiceClient(base_url=server.url, api_key=alice_key, project_id="p")
    rest = tinker.RestClient(base_url=server.url, api_key=alice_key)
    tc = _trained(client)
    path = tc.save_state("audited", ttl_seconds=HOUR).result().path
    rest.publish_checkpoint_from_tinker_path(path).result()
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    rest.set_checkpoint_ttl_from_tinker_path(path, None).result()
    copy = client.copy_weights(path).result()
    rest.delete_checkpoint_from_tinker_path(path).result()

    entries = _audit(alice_key, server)
    mine = [e for e in entries if tc.model_id in (e.event_details.get("model_id"), e.model_id)]
    assert [e.event for e in mine] == [
        "training_run_create",
        "checkpoint_save",
        "checkpoint_publish",
        "checkpoint_unpublish",
        "checkpoint_ttl_set",
        "checkpoint_delete",
    ]
    assert all(e.event_details["actor"] == "alice" for e in mine)
    assert all(e.tinker_path == path for e in mine[1:])
    assert mine[1].event_details["expires_at"] is not None
    assert mine[4].event_details["ttl_seconds"] is None
    copied = [e for e in entries if e.event == "checkpoint_copy" and e.tinker_path == copy]
    assert len(copied) == 1 and copied[0].event_details["source_path"] == path
    assert [e.timestamp for e in entries] == sorted(e.timestamp for e in entries)

    checkpoint_events = _audit(alice_key, server, event_type="checkpoints")
    assert {e.event for e in checkpoint_events} <= {
        "checkpoint_save",
        "checkpoint_publish",
        "checkpoint_unpublish",
        "checkpoint_ttl_set",
        "checkpoint_copy",
        "checkpoint_delete",
        "checkpoint_expire",
    }
    assert len(checkpoint_events) == sum(e.event.startswith("checkpoint_") for e in entries)
    assert _audit(alice_key, server, event_type="projects") == []
    day_before = mine[0].timestamp.date() - datetime.timedelta(days=1)
    assert not any(
        e.event_details.get("model_id") == tc.model_id
        for e in _audit(alice_key, server, day=day_before)
    )
    bobs = _audit(bob_key, server)
    assert not any(tc.model_id in str(e.event_details) for e in bobs)
    assert all(e.event_details.get("actor") != "alice" for e in bobs)
    with pytest.raises(tinker.BadRequestError, match="event_type"):
        _audit(alice_key, server, event_type="everything")
    client.close("success")


def test_whoami_needs_jwt_auth_which_treadle_does_not_offer(two_users):
    server, alice_key, _ = two_users
    rest = tinker.RestClient(base_url=server.url, api_key=alice_key)
    with pytest.raises(RuntimeError, match="whoami requires JWT auth"):
        rest.whoami().result()
    done = _cli(server, alice_key, "auth", "whoami")
    assert done.returncode != 0 and "JWT" in done.stdout + done.stderr
