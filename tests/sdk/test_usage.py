"""The SDK's own billing calls (``AdminClient.get_billing_usage``,
``get_current_checkpoint_storage_usage`` and ``tinker billing ...``) answer from treadle's
usage meter and checkpoint store, for the caller only."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections import Counter

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import QWEN
from tests.fixtures.server import Server
from tests.sdk.test_isolation import _folder
from tests.sdk.test_keys import _new_key

HOUR = datetime.timedelta(hours=1)


@pytest.fixture(scope="module")
def two_users(tmp_path_factory, tiny_models):
    """A server of its own (usage is counted from zero), with keys of alice and bob."""
    data_dir = tmp_path_factory.mktemp("usage") / "treadle"
    data_dir.mkdir()
    alice, bob = _new_key(data_dir, "alice"), _new_key(data_dir, "bob")
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, ["--long-poll-seconds", "2"])
    yield server, alice, bob
    server.stop()


def _window() -> tuple[str, str]:
    """From an hour before this one to two hours after it: every hour a test can have
    spent tokens in, as the hour-aligned RFC 3339 bounds the SDK documents."""
    now = datetime.datetime.now(datetime.UTC).replace(minute=0, second=0, microsecond=0)
    return _rfc3339(now - HOUR), _rfc3339(now + 2 * HOUR)


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _totals(server: Server, key: str, user: str) -> Counter[str]:
    """Tokens per billing event type in the window, checking each event is ``user``'s."""
    admin = tinker.AdminClient(base_url=server.url, api_key=key)
    response = admin.get_billing_usage(*_window()).result()
    assert isinstance(response, types.BillingUsageResponse)
    totals: Counter[str] = Counter()
    for event in response.data:
        assert event.user_name == user and event.base_model == QWEN
        assert event.bucket_end - event.bucket_start == HOUR
        assert event.estimated_cost_usd == 0.0  # treadle bills nothing
        info = event.event_info
        assert isinstance(
            info,
            types.TrainingBillingEvent
            | types.SamplingPrefillBillingEvent
            | types.SamplingSampleBillingEvent,
        )
        totals[info.type] += info.token_count
    return totals


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


def _tinker_cli(server: Server, key: str, *args: str) -> dict:
    """``tinker --format json ARGS`` as a user runs it, pointed at ``server``."""
    env = dict(os.environ, TINKER_BASE_URL=server.url, TINKER_API_KEY=key)
    done = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "--format", "json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_billing_usage_is_the_callers_tokens_trained_and_sampled(two_users):
    server, alice_key, bob_key = two_users
    alice_before = _totals(server, alice_key, "alice")
    bob_before = _totals(server, bob_key, "bob")

    alice = tinker.ServiceClient(base_url=server.url, api_key=alice_key)
    tc = alice.create_lora_training_client(base_model=QWEN, rank=4).result()
    train = [[1, 2, 3, 4, 5, 6], [9, 40, 41, 42], [7, 8, 9, 10, 11, 12, 13, 14]]
    probe = [20, 21, 22, 23, 24]
    tc.forward_backward([_datum(t) for t in train], "cross_entropy").result()
    tc.forward([_datum(probe)], "cross_entropy").result()
    # A datum's model input is its tokens but the last (whose only role is a target).
    trained = sum(len(t) - 1 for t in train) + len(probe) - 1
    sampler = alice.create_sampling_client(base_model=QWEN).result()
    params = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
    prompt = [1, 2, 3, 4, 5, 6, 7]
    out = sampler.sample(types.ModelInput.from_ints(prompt), 3, params).result()
    sampled = sum(len(s.tokens) for s in out.sequences)
    assert sampled > 0

    bob = tinker.ServiceClient(base_url=server.url, api_key=bob_key)
    bob_sampler = bob.create_sampling_client(base_model=QWEN).result()
    bob_out = bob_sampler.sample(types.ModelInput.from_ints([3, 4]), 1, params).result()
    bob_sampled = sum(len(s.tokens) for s in bob_out.sequences)

    alice_spent = _totals(server, alice_key, "alice")
    alice_spent.subtract(alice_before)
    # The prompt is read once per sample call, however many samples it asks for.
    expected = {"training": trained, "sampling_prefill": len(prompt), "sampling_sample": sampled}
    assert +alice_spent == expected
    # Bob's answer holds his own tokens and none of alice's.
    bob_spent = _totals(server, bob_key, "bob")
    bob_spent.subtract(bob_before)
    assert +bob_spent == {"sampling_prefill": 2, "sampling_sample": bob_sampled}

    # `tinker billing usage` prints the same events.
    printed = _tinker_cli(server, alice_key, "billing", "usage", *_window())
    cli_totals: Counter[str] = Counter()
    for row in printed["data"]:
        assert row["user_name"] == "alice"
        cli_totals[row["event_info"]["type"]] += row["event_info"]["token_count"]
    cli_totals.subtract(alice_before)
    assert +cli_totals == expected
    alice.close("success")
    bob.close("success")


def test_checkpoint_storage_is_the_callers_bytes_on_disk(two_users):
    server, alice_key, bob_key = two_users
    alice = tinker.ServiceClient(base_url=server.url, api_key=alice_key, project_id="proj-a")
    admin = tinker.AdminClient(base_url=server.url, api_key=alice_key)
    rest = tinker.RestClient(base_url=server.url, api_key=alice_key)
    tc = alice.create_lora_training_client(base_model=QWEN, rank=4).result()
    tc.forward_backward([_datum([1, 2, 3, 4])], "cross_entropy").result()
    state = tc.save_state("usage-state").result().path
    weights = tc.save_weights_for_sampler("usage-weights").result().path

    def on_disk(paths: list[str]) -> int:
        return sum(
            f.stat().st_size for p in paths for f in _folder(server, p).rglob("*") if f.is_file()
        )

    def ours() -> types.CurrentCheckpointStorageUsageItem:
        rows = admin.get_current_checkpoint_storage_usage(project_id="proj-a").result().data
        assert len(rows) == 1
        return rows[0]

    row = ours()
    assert row.project_id == "proj-a" and row.user_name == "alice"
    assert row.checkpoint_count == 2
    assert row.size_bytes == on_disk([state, weights]) > 0
    assert row.size_gigabytes == pytest.approx(row.size_bytes / 1e9)
    assert row.estimated_monthly_cost_usd == 0.0
    # Without a project: every project of alice's, the same bytes as her checkpoints.
    everything = admin.get_current_checkpoint_storage_usage().result().data
    listed = [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    assert sum(r.size_bytes for r in everything) == on_disk(listed)
    assert sum(r.checkpoint_count for r in everything) == len(listed)
    assert admin.get_current_checkpoint_storage_usage(project_id="other").result().data == []
    # A deleted checkpoint no longer counts.
    rest.delete_checkpoint_from_tinker_path(weights).result()
    row = ours()
    assert (row.checkpoint_count, row.size_bytes) == (1, on_disk([state]))
    # Bob has no checkpoints: he sees none of alice's.
    bob_admin = tinker.AdminClient(base_url=server.url, api_key=bob_key)
    assert bob_admin.get_current_checkpoint_storage_usage().result().data == []
    printed = _tinker_cli(
        server, alice_key, "billing", "checkpoint-storage", "--project-id", "proj-a"
    )
    assert [(r["checkpoint_count"], r["size_bytes"]) for r in printed["data"]] == [
        (1, on_disk([state]))
    ]
    alice.close("success")


def test_bad_billing_windows_are_4xx_with_a_message(two_users):
    server, alice_key, _ = two_users
    http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": alice_key})
    start, end = _window()
    hour = datetime.datetime.fromisoformat(start)
    misaligned = _rfc3339(hour + datetime.timedelta(minutes=30))
    future = _rfc3339(hour + 5 * HOUR)
    too_long = _rfc3339(hour + datetime.timedelta(days=14) + HOUR)
    events = "/billing/usage/events"
    for what, params, status in (
        ("no params", {}, 422),
        ("no end", {"starting_on": start}, 422),
        ("not a time", {"starting_on": "yesterday", "ending_before": end}, 422),
        ("misaligned start", {"starting_on": misaligned, "ending_before": end}, 400),
        ("misaligned end", {"starting_on": start, "ending_before": misaligned}, 400),
        ("end before start", {"starting_on": end, "ending_before": start}, 400),
        ("empty window", {"starting_on": start, "ending_before": start}, 400),
        ("over 14 days", {"starting_on": start, "ending_before": too_long}, 400),
        ("future start", {"starting_on": future, "ending_before": _rfc3339(hour + 6 * HOUR)}, 400),
        ("year 1", {"starting_on": "0001-01-01T00:30:00Z", "ending_before": end}, 400),
        ("past 9999", {"starting_on": start, "ending_before": "9999-12-31T23:30:00-05:00"}, 400),
    ):
        response = http.get(events, params=params)
        assert response.status_code == status, (what, response.text)
        assert response.json()["detail"], what
    # The SDK raises the 400 at once, with treadle's message.
    admin = tinker.AdminClient(base_url=server.url, api_key=alice_key)
    with pytest.raises(tinker.BadRequestError, match="start of a UTC hour"):
        admin.get_billing_usage(misaligned, end).result()
    # Both routes need a key.
    keyless = httpx.Client(base_url=f"{server.url}/api/v1")
    assert (
        keyless.get(events, params={"starting_on": start, "ending_before": end}).status_code == 401
    )
    assert keyless.get("/billing/usage/checkpoints/current").status_code == 401
