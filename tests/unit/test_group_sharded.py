"""A *sharded* worker group (``--sharded``: FSDP2 over two gloo ranks, real processes)
against the in-process engine on the same tiny model, with the data-parallel group's
checks (tests/unit/test_group.py): training over every built-in loss with two adapters,
an odd datum count and a datum longer than the pass budget; greedy sampling, stepped in
lockstep on both ranks; checkpoints across the group and one process. One group serves
the module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.tiny_models import make_tiny_model
from tests.unit import test_group as data_parallel
from tests.unit.test_group import _VOCAB, _data, _run, _same_outcomes, _treadle
from treadle.cli import build_parser, serve_argv, settings_of
from treadle.engine.group import WorkerGroup, load_group
from treadle.engine.worker import Worker, load_worker
from treadle.sampling_params import SamplingParams
from treadle.settings import ModelEntry, Settings
from treadle.types import Datum, LoraSpec, SampleResult


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def engines(root: Path) -> Iterator[tuple[WorkerGroup, Worker]]:
    folder = make_tiny_model(root / "qwen3", "qwen3", seed=0)
    entry = ModelEntry("tiny", str(folder))
    settings = Settings(
        data_dir=root / "data",
        models=(entry,),
        max_tokens_per_pass=data_parallel._PASS_TOKENS,
        workers=2,
        sharded=True,
        collective_timeout_seconds=60.0,
    )
    group = load_group(entry, settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank computes (see test_group's fixture)
    try:
        yield group, load_worker(entry, settings)
    finally:
        torch.set_num_threads(threads)
        group.close()


def test_each_rank_holds_half_the_base_weights(
    engines: tuple[WorkerGroup, Worker], root: Path
) -> None:
    """The status file reports each rank's bytes of base weights: its half (plus the
    padding of odd rows), where a data-parallel rank holds the whole model."""
    _, local = engines
    whole = sum(p.numel() * p.element_size() for p in local.base.model.parameters())
    (status,) = (root / "data" / "workers").iterdir()
    held = [int(line.split()[7]) for line in status.read_text().splitlines()[1:]]
    assert len(held) == 2
    for part in held:
        assert 0.5 <= part / whole < 0.51


def test_training_matches_one_process(engines: tuple[WorkerGroup, Worker], tmp_path: Path) -> None:
    """Every rank runs every datum on its half of the weights; rank 0's logprobs, losses,
    step metrics, adapters and AdamW states equal one process's."""
    data_parallel.test_training_matches_one_process(engines, tmp_path)


def test_optim_step_without_gradients_is_a_user_error(engines: tuple[WorkerGroup, Worker]) -> None:
    data_parallel.test_optim_step_without_gradients_is_a_user_error(engines)


def test_greedy_sampling_matches_one_process_and_training_logprobs(
    engines: tuple[WorkerGroup, Worker],
) -> None:
    """Four prompts decoded together in lockstep steps; a bad one fails alone."""
    data_parallel.test_greedy_sampling_matches_one_process_and_training_logprobs(engines)


def test_checkpoints_load_across_group_and_one_process(
    engines: tuple[WorkerGroup, Worker], tmp_path: Path
) -> None:
    data_parallel.test_checkpoints_load_across_group_and_one_process(engines, tmp_path)


def test_samples_wait_out_a_training_cycle_and_unseeded_ones_stay_in_step(
    engines: tuple[WorkerGroup, Worker],
) -> None:
    """The engine loop offers decode steps while a cycle runs; a sharded group takes none
    then (its ranks are in the cycle's passes) and decodes after it. Unseeded samples at
    temperature 1 that stop at random tokens end at random lengths: had the ranks drawn
    different tokens, one would run a decode pass the other skips and the group would
    hang until its collective timeout and fail them. Each sequence's logprobs are what a
    forward pass of its tokens gives, and the cycle matches one process."""
    group, local = engines
    spec = LoraSpec(rank=4)
    models = [engine.new_model(spec, seed=9) for engine in (group, local)]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, _VOCAB, n).astype(np.int64) for n in (4, 11)]
    results: list[SampleResult | BaseException | None] = [None] * len(prompts)

    def done(index: int) -> Callable[[SampleResult | BaseException], None]:
        def finish(outcome: SampleResult | BaseException) -> None:
            results[index] = outcome

        return finish

    stops = tuple(range(0, _VOCAB, 8))
    params = SamplingParams(max_tokens=24, temperature=1.0, stop_token_ids=stops)
    for index, prompt in enumerate(prompts):
        group.add_sample(prompt, 3, params, None, False, 0, done(index))
    pauses = [0]

    def pause() -> None:  # what the engine loop's pause does when decoding is due
        pauses[0] += 1
        group.sample_step()
        assert results == [None, None], "decoded inside the training cycle"

    data = _data(31, "cross_entropy", [70, 70, 70, 5, 9])
    ours = _run(group, [(models[0], data, "cross_entropy", False)], pause)
    theirs = _run(local, [(models[1], data, "cross_entropy", False)], lambda: None)
    _same_outcomes(ours, theirs)
    while group.sampling():
        group.sample_step()
    datums, sampled = [], []
    for result, prompt in zip(results, prompts, strict=True):
        assert isinstance(result, SampleResult), result
        assert len(result.sequences) == 3
        for sequence in result.sequences:
            assert len(sequence.tokens) == 24 or sequence.tokens[-1] in stops
            tokens = np.concatenate([prompt, np.array(sequence.tokens, np.int64)])
            datums.append(Datum(tokens[:-1], {"target_tokens": tokens[1:]}))
            sampled.append((len(prompt), sequence.logprobs))
    # A fresh adapter's B is zero: the base model's logprobs, as the samples used no adapter.
    base = group.new_model(spec, seed=1)
    (forward,) = _run(group, [(base, datums, "cross_entropy", True)], lambda: None)
    for logprobs, (start, want) in zip(forward.logprobs, sampled, strict=True):
        np.testing.assert_allclose(logprobs[start - 1 :], want, atol=1e-4)


def test_sharded_needs_several_ranks_and_passes_on(tmp_path: Path) -> None:
    help_text = _treadle("serve", "--help")
    words = " ".join(help_text.stdout.split())  # (argparse wraps the help lines)
    assert "--sharded" in words and "sampling does not scale" in words
    alone = _treadle("serve", "--data-dir", str(tmp_path), "--sharded")
    assert alone.returncode == 2
    assert alone.stderr.strip() == (
        "treadle serve: --sharded divides the model across ranks: give --workers N with N > 1"
    )
    settings = Settings(data_dir=tmp_path, workers=4, sharded=True)
    served = settings_of(build_parser().parse_args(["serve", *serve_argv(settings)]))
    assert served.sharded and served.workers == 4


def test_ranks_step_only_when_the_driver_steps(engines: tuple[WorkerGroup, Worker]) -> None:
    """One sample_step is one sampler step on every rank, and no rank steps on its own
    (its gathers would then fall out of step with the others'): a sample left alone for
    a while makes no progress, and it takes as many steps as in one process."""
    group, local = engines
    prompt = np.arange(3, 9, dtype=np.int64)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    steps = []
    for engine in (group, local):
        results: list[SampleResult | BaseException] = []
        engine.add_sample(prompt, 1, params, None, False, 0, results.append)
        engine.sample_step()
        if engine is group:
            time.sleep(1.0)  # a rank that stepped on its own would finish the sample now
        count = 1
        while not results:
            engine.sample_step()
            count += 1
        assert isinstance(results[0], SampleResult)
        assert len(results[0].sequences[0].tokens) == 20
        steps.append(count)
    assert steps[0] == steps[1]
    assert not group.sampling()
