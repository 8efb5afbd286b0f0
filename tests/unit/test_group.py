"""A worker group of two gloo ranks (real processes, real torch.distributed) against the
in-process engine on the same tiny model: training, sampling, checkpoints.

One group and one in-process worker serve the whole module. (A rank's death is tested
through a real server: tests/sdk/test_workers.py.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.tiny_models import make_tiny_model
from treadle.engine.checkpoint import OPTIMIZER_FILE
from treadle.engine.custom_graph import CustomRun
from treadle.engine.group import GroupWork, WorkerGroup, load_group, split_datums
from treadle.engine.losses import LOSSES
from treadle.engine.train import ForwardBackwardOutcome
from treadle.engine.worker import Worker, load_worker
from treadle.errors import UserInputError
from treadle.sampling_params import SamplingParams
from treadle.settings import ModelEntry, Settings
from treadle.types import AdamParams, Datum, LoraSpec, SampleResult

# Tokens per packed pass: small, so that one datum below is longer than a pass.
_PASS_TOKENS = 48
_LENGTHS = [7, 30, 70, 12, 3]  # an odd number of datums; 70 > _PASS_TOKENS
_VOCAB = 250
_TOL = 1e-5


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerGroup, Worker]]:
    root = tmp_path_factory.mktemp("group")
    folder = make_tiny_model(root / "qwen3", "qwen3", seed=0)
    entry = ModelEntry("tiny", str(folder))
    settings = Settings(
        data_dir=root / "data",
        models=(entry,),
        max_tokens_per_pass=_PASS_TOKENS,
        workers=2,
        collective_timeout_seconds=60.0,
    )
    group = load_group(entry, settings)
    # The in-process reference computes on one thread, like each rank: with the cores
    # shared by rank processes, more OpenMP threads only wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield group, load_worker(entry, settings)
    finally:
        torch.set_num_threads(threads)
        group.close()


def _datum(rng: np.random.Generator, n: int, loss: str) -> Datum:
    tokens = rng.integers(0, _VOCAB, n + 1)
    inputs: dict[str, np.ndarray] = {"target_tokens": tokens[1:].astype(np.int64)}
    if loss == "cross_entropy":
        inputs["weights"] = rng.uniform(-0.5, 1.5, n).astype(np.float32)
    else:
        inputs["logprobs"] = rng.uniform(-7.0, -4.0, n).astype(np.float32)
        inputs["advantages"] = rng.normal(0.0, 1.0, n).astype(np.float32)
    if loss == "gspo":
        mask = (rng.uniform(size=n) < 0.7).astype(np.float32)
        mask[0] = 1.0
        inputs["sequence_ratio_mask"] = mask
    return Datum(tokens[:-1].astype(np.int64), inputs)


def _data(seed: int, loss: str, lengths: list[int] = _LENGTHS) -> list[Datum]:
    rng = np.random.default_rng(seed)
    return [_datum(rng, n, loss) for n in lengths]


def _run(
    engine: Any, jobs: list[tuple[Any, list[Datum], str, bool]], pause: Callable[[], None]
) -> list[ForwardBackwardOutcome]:
    works = [
        engine.work(model, data, engine.check_forward_backward(data, loss, {}), forward_only)
        for model, data, loss, forward_only in jobs
    ]
    outcomes: list[ForwardBackwardOutcome] = engine.forward_backward(works, pause)
    return outcomes


def _same_outcomes(
    ours: list[ForwardBackwardOutcome], theirs: list[ForwardBackwardOutcome]
) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.error is None and b.error is None
        assert len(a.logprobs) == len(b.logprobs)
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=0, atol=_TOL)
        assert a.loss == pytest.approx(b.loss, rel=_TOL, abs=_TOL)


def _weights(engine: Any, model: Any, folder: Path) -> dict[str, torch.Tensor]:
    engine.save_model(folder, model)
    return load_file(folder / "adapter_model.safetensors")


def _same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=_TOL)


def test_split_datums_covers_every_datum_once_and_keeps_custom_losses_whole() -> None:
    model: Any = None
    rng = np.random.default_rng(0)
    data = [_datum(rng, n, "cross_entropy") for n in [50, 3, 9, 40, 8, 8, 1]]
    custom = CustomRun(graph=None)  # type: ignore[arg-type]
    works = [
        GroupWork(model, data, LOSSES["cross_entropy"], {}, False),
        GroupWork(model, data[:3], custom, {}, False),
    ]
    shares = split_datums(works, 3)
    seen = sorted((w, i) for share in shares for w, indices in share for i in indices)
    assert seen == [(0, i) for i in range(7)] + [(1, i) for i in range(3)]
    holders = [rank for rank, share in enumerate(shares) if any(w == 1 for w, _ in share)]
    assert len(holders) == 1  # the custom loss runs on one rank
    loads = [sum(works[w].data[i].num_tokens for w, idx in share for i in idx) for share in shares]
    assert max(loads) - min(loads) <= 50  # no rank gets more than the largest unit too many


def test_training_matches_one_process(engines: tuple[WorkerGroup, Worker], tmp_path: Path) -> None:
    """Two adapters alternating over every built-in loss, sometimes sharing a cycle, with a
    forward-only request among them: logprobs, losses, step metrics and the final
    adapters and AdamW states agree with one process."""
    group, local = engines
    spec = LoraSpec(rank=4)
    models = {
        name: (engine.new_model(spec, seed=11), engine.new_model(spec, seed=12))
        for name, engine in (("group", group), ("local", local))
    }
    pauses = [0]

    def pause() -> None:
        pauses[0] += 1

    params = AdamParams(learning_rate=1e-2)
    losses = list(LOSSES)
    for step, loss in enumerate(losses + losses[:2]):
        which = step % 2
        data = _data(step, loss)
        jobs = {name: [(pair[which], data, loss, False)] for name, pair in models.items()}
        if step % 3 == 2:  # the other adapter shares the cycle, one forward-only too
            other = _data(100 + step, "cross_entropy", [5, 21, 9])
            for name, pair in models.items():
                jobs[name].append((pair[1 - which], other, "cross_entropy", False))
                jobs[name].append((pair[1 - which], other[:1], "cross_entropy", True))
        ours = _run(group, jobs["group"], pause)
        theirs = _run(local, jobs["local"], lambda: None)
        _same_outcomes(ours, theirs)
        stepped = [which, 1 - which] if step % 3 == 2 else [which]
        for index in stepped:
            a = group.optim_step(models["group"][index], params)
            b = local.optim_step(models["local"][index], params)
            assert a["grad_norm:mean"] == pytest.approx(b["grad_norm:mean"], rel=_TOL)
    for index in range(2):
        ours = _weights(group, models["group"][index], tmp_path / f"group{index}")
        theirs = _weights(local, models["local"][index], tmp_path / f"local{index}")
        _same_weights(ours, theirs)
        state_a = torch.load(tmp_path / f"group{index}" / OPTIMIZER_FILE, weights_only=True)
        state_b = torch.load(tmp_path / f"local{index}" / OPTIMIZER_FILE, weights_only=True)
        assert state_a["state"].keys() == state_b["state"].keys()
        for key, value in state_a["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                # Moments are gradient-sized: compare at the scale of each tensor.
                theirs_moment = state_b["state"][key][name]
                scale = float(theirs_moment.abs().max())
                torch.testing.assert_close(value[name], theirs_moment, rtol=0, atol=1e-4 * scale)


def test_optim_step_without_gradients_is_a_user_error(engines: tuple[WorkerGroup, Worker]) -> None:
    group, _ = engines
    model = group.new_model(LoraSpec(rank=2), seed=1)
    with pytest.raises(UserInputError, match="no gradients"):
        group.optim_step(model, AdamParams())
    # A forward pass computes none either, even spread over both ranks.
    _run(group, [(model, _data(1, "cross_entropy"), "cross_entropy", True)], lambda: None)
    with pytest.raises(UserInputError, match="no gradients"):
        group.optim_step(model, AdamParams())


def _sample(engine: Any, adapter: Any, prompts: list[np.ndarray], max_tokens: int) -> list[Any]:
    """Greedy samples of each prompt, driven as the engine loop drives a worker."""
    results: list[Any] = [None] * len(prompts)

    def done(index: int) -> Callable[[SampleResult | BaseException], None]:
        def finish(outcome: SampleResult | BaseException) -> None:
            results[index] = outcome

        return finish

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for index, prompt in enumerate(prompts):
        engine.add_sample(prompt, 1, params, adapter, False, 0, done(index))
    while engine.sampling():
        engine.sample_step()
    return results


def test_greedy_sampling_matches_one_process_and_training_logprobs(
    engines: tuple[WorkerGroup, Worker],
) -> None:
    group, local = engines
    spec = LoraSpec(rank=4)
    trained = {}
    for name, engine in (("group", group), ("local", local)):
        model = engine.new_model(spec, seed=5)
        _run(engine, [(model, _data(7, "cross_entropy"), "cross_entropy", False)], lambda: None)
        engine.optim_step(model, AdamParams(learning_rate=5e-2))
        trained[name] = model
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, _VOCAB, n).astype(np.int64) for n in (5, 9, 14, 3)]
    ours = _sample(group, group.snapshot(trained["group"]), prompts, 12)
    theirs = _sample(local, local.snapshot(trained["local"]), prompts, 12)
    for a, b, prompt in zip(ours, theirs, prompts, strict=True):
        assert isinstance(a, SampleResult) and isinstance(b, SampleResult)
        assert a.sequences[0].tokens == b.sequences[0].tokens
        np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=1e-4)
        # The sampled tokens' logprobs are what a forward pass of the trainer gives.
        tokens = np.concatenate([prompt, np.array(a.sequences[0].tokens, np.int64)])
        datum = Datum(tokens[:-1], {"target_tokens": tokens[1:]})
        (forward,) = _run(group, [(trained["group"], [datum], "cross_entropy", True)], lambda: None)
        np.testing.assert_allclose(
            forward.logprobs[0][len(prompt) - 1 :], a.sequences[0].logprobs, atol=1e-4
        )
    # A bad request fails alone, as the user's error.
    (bad,) = _sample(group, None, [np.array([_VOCAB + 10**6], np.int64)], 4)
    assert isinstance(bad, UserInputError)


def test_streaming_samples_report_their_steps_through_the_ranks(
    engines: tuple[WorkerGroup, Worker],
) -> None:
    """Progress callbacks fire through the group (two samples: one per rank), one call per
    step with every sequence's new token, joining to the result, all before ``done``."""
    group, _ = engines
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, _VOCAB, n).astype(np.int64) for n in (6, 11)]
    params = SamplingParams(max_tokens=10, seed=4)
    events: list[list[tuple[str, Any]]] = [[], []]
    for index, prompt in enumerate(prompts):
        log = events[index]  # appended to by that sample's rank's reader thread

        def progress(tokens: list[tuple[int, int, float]], log: list = log) -> None:
            log.append(("progress", tokens))

        def done(outcome: SampleResult | BaseException, log: list = log) -> None:
            log.append(("done", outcome))

        group.add_sample(prompt, 2, params, None, False, 0, done, progress)
    while group.sampling():
        group.sample_step()
    for log in events:
        *steps, (last, result) = log
        assert last == "done" and isinstance(result, SampleResult)
        assert len(steps) == params.max_tokens
        streamed: list[list[tuple[int, float]]] = [[], []]
        for kind, tokens in steps:
            assert kind == "progress" and sorted(i for i, _, _ in tokens) == [0, 1]
            for i, token, logprob in tokens:
                streamed[i].append((token, logprob))
        for got, sequence in zip(streamed, result.sequences, strict=True):
            assert [t for t, _ in got] == sequence.tokens
            assert [lp for _, lp in got] == sequence.logprobs


def test_checkpoints_load_across_group_and_one_process(
    engines: tuple[WorkerGroup, Worker], tmp_path: Path
) -> None:
    """A 2-rank save loads in one process with the same logprobs, and the reverse; the
    AdamW state comes along (the next steps agree too)."""
    group, local = engines
    spec = LoraSpec(rank=4)
    data = _data(21, "cross_entropy")
    params = AdamParams(learning_rate=1e-2)
    for source, target in ((group, local), (local, group)):
        model = source.new_model(spec, seed=8)
        _run(source, [(model, data, "cross_entropy", False)], lambda: None)
        source.optim_step(model, params)
        folder = tmp_path / f"from-{type(source).__name__}"
        source.save_model(folder, model)
        loaded = target.load(folder, with_optimizer=True)
        assert target.spec_of(loaded) == spec
        for engine, handle in ((source, model), (target, loaded)):
            _run(engine, [(handle, data, "cross_entropy", False)], lambda: None)
            engine.optim_step(handle, params)
        check = _data(22, "cross_entropy")
        _same_outcomes(
            _run(target, [(loaded, check, "cross_entropy", True)], lambda: None),
            _run(source, [(model, check, "cross_entropy", True)], lambda: None),
        )
        # A sampler's copy loads the same way.
        sampler_folder = tmp_path / f"sampler-{type(source).__name__}"
        source.save_adapter(sampler_folder, source.snapshot(model))
        prompt = [np.arange(1, 8, dtype=np.int64)]
        a = _sample(target, target.load_adapter(sampler_folder), prompt, 6)[0]
        b = _sample(source, source.snapshot(model), prompt, 6)[0]
        assert a.sequences[0].tokens == b.sequences[0].tokens
    with pytest.raises(UserInputError, match="no optimizer state"):
        group.load(tmp_path / "sampler-Worker", with_optimizer=True)


def _treadle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "treadle", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TREADLE_WORKER_SECRET": ""},
    )


@pytest.mark.parametrize(
    ("flags", "hint"),
    [
        (["--workers", "0"], "--workers: 0: give 1 (this process) or more ranks"),
        (["--workers", "2", "--worker-listen", "h:99999"], "--worker-listen: 'h:99999' is not"),
    ],
)
def test_serve_refuses_bad_worker_flags(tmp_path: Path, flags: list[str], hint: str) -> None:
    done = _treadle("serve", "--data-dir", str(tmp_path), *flags)
    assert done.returncode == 2 and hint in done.stderr, done.stderr


def test_serve_refuses_more_local_ranks_than_ranks_with_one_line(tmp_path: Path) -> None:
    done = _treadle("serve", "--data-dir", str(tmp_path), "--workers", "2", "--local-workers", "3")
    assert done.returncode == 2
    assert done.stderr.strip() == "treadle serve: --local-workers 3: give 0 to --workers (2)"


def test_worker_join_says_what_is_missing(tmp_path: Path) -> None:
    help_text = _treadle("worker", "--help")
    assert help_text.returncode == 0 and "--join HOST:PORT" in help_text.stdout
    bad = _treadle("worker", "--join", "no-port", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and "--join: 'no-port' is not HOST:PORT" in bad.stderr
    missing = _treadle("worker", "--join", "127.0.0.1:1", "--data-dir", str(tmp_path))
    assert missing.returncode == 2 and "no worker secret" in missing.stderr
    (tmp_path / "secret").write_text("not hex\n")
    garbled = _treadle("worker", "--join", "127.0.0.1:1", "--secret-file", str(tmp_path / "secret"))
    assert garbled.returncode == 2 and "--secret-file" in garbled.stderr


def test_a_wrong_secret_is_refused_and_the_group_keeps_serving(
    engines: tuple[WorkerGroup, Worker],
) -> None:
    """Someone without the secret gets nothing, and a silent connection or garbage on
    the rank port disturbs nothing."""
    group, _ = engines
    with pytest.raises(AuthenticationError):
        Client(group.address, authkey=b"not the secret")
    with (
        socket.create_connection(group.address),
        socket.create_connection(group.address) as noisy,
    ):
        noisy.sendall(b"\x00\x00\x00\x05hello" * 100)
        model = group.new_model(LoraSpec(rank=2), seed=1)
        _run(group, [(model, _data(2, "cross_entropy"), "cross_entropy", False)], lambda: None)
        assert group.optim_step(model, AdamParams())["grad_norm:mean"] > 0
