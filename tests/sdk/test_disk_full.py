"""A data dir that runs out of space: saves fail with a message that says so, the run
keeps its state and saves again once there is room, and the server keeps serving.

The data dir is a 16 MB tmpfs, filled up by a file the test can delete."""
# (The SDK retries a 5xx for minutes: a failure here may take that long to show.)

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import API_KEY, QWEN
from tests.fixtures.server import Server


@pytest.fixture()
def small_disk(tmp_path: Path):
    # The data dir itself is the small disk (the server's log goes beside it).
    mount = tmp_path / "treadle"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path) -> Path:
    filler = mount / "filler"
    # Unbuffered: a buffered file would try to write its rest again when closed.
    with filler.open("wb", buffering=0) as out:
        for size in (65536, 4096, 1):  # to the last byte
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError:
                pass
    return filler


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


def _trained(client: tinker.ServiceClient) -> tuple[tinker.TrainingClient, list, float]:
    """A model one step from its start, its data, and its loss on that data now."""
    tc = client.create_lora_training_client(base_model=QWEN, rank=8).result()
    data = [_datum([1, 2, 3, 4, 5, 6])]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    return tc, data, tc.forward(data, "cross_entropy").result().metrics["loss:sum"]


def test_a_full_disk_fails_saves_clearly_and_nothing_else(small_disk: Path, tiny_models):
    server = Server({QWEN: tiny_models[QWEN]}, small_disk, ["--long-poll-seconds", "2"])
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
        tc, data, before = _trained(client)

        sampler = client.create_sampling_client(base_model=QWEN).result()
        filler = _fill(small_disk)
        for save in (lambda: tc.save_state("full"), lambda: tc.save_weights_for_sampler("full")):
            with pytest.raises(tinker.RequestFailedError) as info:
                save().result()
            assert "no space" in str(info.value).lower(), str(info.value)
            assert "save again once" in str(info.value)
        # Training and sampling go on, from the same state.
        assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] == before
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
        after = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
        assert after != before
        params = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])
        assert (
            len(
                sampler.sample(types.ModelInput.from_ints([1, 2]), 1, params)
                .result()
                .sequences[0]
                .tokens
            )
            == 3
        )
        assert not list((small_disk / "checkpoints").rglob(".full.*"))

        # Something that must be recorded is refused with a 507 that says why.
        http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": API_KEY})
        body = {"user_metadata": {"notes": "x" * 60_000}}  # within the metadata cap
        refused = http.post("/create_session", json=body)
        assert refused.status_code == 507, refused.text
        assert "data dir" in refused.json()["detail"]
        filler.unlink()
        path = tc.save_state("full").result().path
        restored = client.create_training_client_from_state(path).result()
        assert restored.forward(data, "cross_entropy").result().metrics["loss:sum"] == after
        client.close("success")
    finally:
        server.stop()


def test_a_read_only_data_dir_fails_saves_clearly_and_nothing_else(small_disk: Path, tiny_models):
    """The checkpoint folder turns read-only under a running server (a read-only bind
    mount over it, as a remount after a disk error would do): saves fail saying so, work
    goes on, and saves work again once it is writable."""
    server = Server({QWEN: tiny_models[QWEN]}, small_disk, ["--long-poll-seconds", "2"])
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
        tc, data, before = _trained(client)

        tc.save_state("first").result()  # (the checkpoint folder exists from the first save)
        folder = str(small_disk / "checkpoints")
        subprocess.run(["mount", "--bind", folder, folder], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
        try:
            for save in (lambda: tc.save_state("ro"), lambda: tc.save_weights_for_sampler("ro")):
                with pytest.raises(tinker.RequestFailedError) as info:
                    save().result()
                assert "read-only" in str(info.value).lower(), str(info.value)
                assert "save again once" in str(info.value)
            assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] == before
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
            http = httpx.Client(base_url=f"{server.url}/api/v1", headers={"X-API-Key": API_KEY})
            assert http.get("/healthz").json() == {"status": "ok"}
        finally:
            subprocess.run(["umount", folder], check=True)
        after = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
        assert after != before
        path = tc.save_state("ro").result().path
        restored = client.create_training_client_from_state(path).result()
        assert restored.forward(data, "cross_entropy").result().metrics["loss:sum"] == after
        client.close("success")
    finally:
        server.stop()
