"""``treadle serve --workers 2`` through the official SDK: one rank started by the server,
the other joined as if from a second machine (``treadle worker --join`` on loopback).
It gives the in-process server's numbers, and a rank killed mid-request fails that
request as the server's error while the server keeps serving on a restarted group."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import TensorData, types

from tests.conftest import API_KEY, QWEN
from tests.fixtures.server import Server, free_port
from treadle.engine.group import worker_secret

_TOL = 1e-5


class _Group:
    def __init__(self, server: Server, joiner: subprocess.Popen[bytes]) -> None:
        self.server = server
        self.joiner = joiner

    def pids(self) -> dict[int, int]:
        """Rank -> pid, from the status file the server keeps in its data dir."""
        (status,) = (self.server.data_dir / "workers").iterdir()
        lines = status.read_text().splitlines()[1:]
        return {int(line.split()[1]): int(line.split()[3]) for line in lines}

    def generation(self) -> int:
        (status,) = (self.server.data_dir / "workers").iterdir()
        return int(status.read_text().split()[1])


@pytest.fixture(scope="module")
def group(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[_Group]:
    root = tmp_path_factory.mktemp("workers")
    data_dir = root / "treadle"
    # The "other machine" has its own data dir and a copy of the server's secret.
    other = root / "other-machine"
    other.mkdir()
    worker_secret(data_dir)  # made now so it can be copied before the server starts
    shutil.copy(data_dir / "worker-secret", other / "secret")
    port = free_port()
    log = (root / "joiner.log").open("wb")
    joiner = subprocess.Popen(
        [sys.executable, "-m", "treadle", "worker", "--join", f"127.0.0.1:{port}"]
        + ["--secret-file", str(other / "secret"), "--data-dir", str(other)],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    args = ["--workers", "2", "--local-workers", "1", "--worker-listen", f"127.0.0.1:{port}"]
    args += ["--long-poll-seconds", "2"]
    args += ["--collective-timeout-seconds", "60", "--log-level", "info"]
    try:
        server = Server({QWEN: tiny_models[QWEN]}, data_dir, args)
    except BaseException:
        joiner.kill()
        raise
    yield _Group(server, joiner)
    server.stop()
    joiner.send_signal(signal.SIGINT)
    try:
        joiner.wait(timeout=30)
    except subprocess.TimeoutExpired:
        joiner.kill()
        joiner.wait()
    log.close()


def _datum(rng: np.random.Generator, n: int, loss: str) -> types.Datum:
    tokens = rng.integers(0, 250, n + 1)
    inputs = {"target_tokens": TensorData.from_numpy(tokens[1:].astype(np.int64))}
    if loss == "cross_entropy":
        inputs["weights"] = TensorData.from_numpy(rng.uniform(-0.5, 1.5, n).astype(np.float32))
    else:
        logprobs = rng.uniform(-7.0, -4.0, n).astype(np.float32)
        inputs["logprobs"] = TensorData.from_numpy(logprobs)
        inputs["advantages"] = TensorData.from_numpy(rng.normal(0, 1, n).astype(np.float32))
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1].tolist()), loss_fn_inputs=inputs
    )


def _train(url: str) -> tuple[list[tuple[float, list[np.ndarray], float]], list[int]]:
    """Three steps over three losses, then a greedy sample of the trained weights."""
    client = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    try:
        tc = client.create_lora_training_client(base_model=QWEN, rank=4, seed=7).result()
        steps = []
        for step, loss in enumerate(["cross_entropy", "importance_sampling", "ppo"]):
            rng = np.random.default_rng(step)
            data = [_datum(rng, n, loss) for n in (9, 40, 3, 17, 26)]  # an odd number
            out = tc.forward_backward(data, loss).result()
            logprobs = [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]
            norm = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            steps.append((out.metrics["loss:sum"], logprobs, norm.metrics["grad_norm:mean"]))
        sampler = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints([5, 17, 99, 3, 42])
        params = types.SamplingParams(max_tokens=10, temperature=0.0)
        sample = sampler.sample(prompt, 1, params).result()
        return steps, list(sample.sequences[0].tokens)
    finally:
        client.close("success")


def test_two_ranks_on_two_machines_train_and_sample_as_one_process(
    group: _Group, server: Server
) -> None:
    assert len(group.pids()) == 2
    assert group.joiner.poll() is None
    ours, our_tokens = _train(group.server.url)
    theirs, their_tokens = _train(server.url)
    for (loss_a, lps_a, norm_a), (loss_b, lps_b, norm_b) in zip(ours, theirs, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=_TOL, abs=_TOL)
        assert norm_a == pytest.approx(norm_b, rel=_TOL)
        for a, b in zip(lps_a, lps_b, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=_TOL)
    assert our_tokens == their_tokens


def clipped_ratio(logprobs, logprobs_old, advantages):  # type: ignore[no-untyped-def]
    ratio = torch.exp(logprobs - logprobs_old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.min(ratio * advantages, clipped * advantages).sum()
    return loss, {"custom/ratio:mean": ratio.mean()}


def test_a_server_side_custom_loss_gives_the_client_paths_numbers(
    group: _Group, server: Server
) -> None:
    """The group runs an uploaded loss (each request whole on one rank); the suite's
    server runs the same loss client-side: same loss, metrics, logprobs and update."""
    ranks = {"logprobs": 1, "logprobs_old": 1, "advantages": 1}
    ours = tinker.ServiceClient(base_url=group.server.url, api_key=API_KEY)
    theirs = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    try:
        results, probes, handles = [], [], []
        for client in (ours, theirs):
            tc = client.create_lora_training_client(base_model=QWEN, rank=4, seed=3).result()
            loss = client.create_custom_loss(clipped_ratio, ranks).result()
            handles.append(loss)
            rng = np.random.default_rng(4)
            data = []
            for n in (6, 11, 4):
                datum = _datum(rng, n, "ppo")
                datum.loss_fn_inputs["logprobs_old"] = datum.loss_fn_inputs.pop("logprobs")
                data.append(datum)
            results.append(tc.forward_backward_custom(data, loss).result())
            tc.optim_step(types.AdamParams(learning_rate=1e-2, eps=1e-4)).result()
            probe = tc.forward(data, "cross_entropy").result().loss_fn_outputs
            probes.append([o["logprobs"].to_numpy() for o in probe])
        # Ours ran on the server (the group), theirs in the SDK.
        assert handles[0].loss_id is not None and handles[1].loss_id is None
        a, b = results
        for key in ("loss:sum", "custom/ratio:mean"):
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=_TOL), key
        for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(
                x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), atol=_TOL
            )
        for x, y in zip(*probes, strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=_TOL)
    finally:
        ours.close("success")
        theirs.close("success")


def test_a_killed_rank_fails_its_request_and_the_group_restarts(group: _Group) -> None:
    client = tinker.ServiceClient(base_url=group.server.url, api_key=API_KEY)
    try:
        tc = client.create_lora_training_client(base_model=QWEN, rank=4, seed=1).result()
        rng = np.random.default_rng(0)
        small = [_datum(rng, n, "cross_entropy") for n in (5, 8, 13)]
        tc.forward_backward(small, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        saved = tc.save_state("before-the-crash").result().path
        old_sampler = tc.save_weights_and_get_sampling_client().result()
        probe = [
            o["logprobs"].to_numpy()
            for o in tc.forward(small, "cross_entropy").result().loss_fn_outputs
        ]
        # Long enough (tens of thousands of tokens on each rank) to be running when the
        # rank dies a second after it was sent.
        big = [_datum(rng, 500, "cross_entropy") for _ in range(160)]
        before = group.generation()
        # Rank 0, the server's own child (so its exit is known); rank 1, which joined
        # from the "other machine", goes with the group and joins the next one.
        pids = group.pids()
        future = tc.forward_backward(big, "cross_entropy")
        time.sleep(1.0)
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(tinker.RequestFailedError) as info:
            future.result()
        assert info.value.category == "server"
        message = str(info.value)
        assert f"rank 0 (pid {pids[0]}" in message and "killed by SIGKILL" in message, message
        assert httpx.get(f"{group.server.url}/api/v1/healthz", timeout=5).status_code == 200
        # The next request runs on the restarted group (the joiner joins again by itself).
        fresh = client.create_lora_training_client(base_model=QWEN, rank=4, seed=1).result()
        fresh.forward_backward(small, "cross_entropy").result()
        assert fresh.optim_step(types.AdamParams()).result().metrics["grad_norm:mean"] > 0
        assert group.generation() == before + 1
        assert not set(pids.values()) & set(group.pids().values())
        sampler = fresh.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints([1, 2, 3])
        sample = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4)).result()
        assert len(sample.sequences[0].tokens) == 4
        # The model made before the restart is gone, and says so.
        with pytest.raises(tinker.RequestFailedError) as lost:
            tc.forward_backward(small, "cross_entropy").result()
        assert lost.value.category == "server"
        assert "load your last checkpoint" in str(lost.value)
        with pytest.raises(tinker.RequestFailedError) as lost_sampler:
            old_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4)).result()
        assert lost_sampler.value.category == "server"
        assert "load your last checkpoint" in str(lost_sampler.value)
        # ... and the checkpoint saved before the crash loads on the new group.
        restored = client.create_training_client_from_state_with_optimizer(saved).result()
        again = restored.forward(small, "cross_entropy").result().loss_fn_outputs
        for expected, output in zip(probe, again, strict=True):
            np.testing.assert_allclose(output["logprobs"].to_numpy(), expected, rtol=0, atol=_TOL)
    finally:
        client.close("success")
    assert group.server.alive() and group.joiner.poll() is None
