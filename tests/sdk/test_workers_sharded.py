"""``treadle serve --workers 2 --sharded`` through the official SDK: the base model's
weights divided over two local ranks give the in-process server's numbers, and samples
sent while a training request runs (the engine loop offers decode steps inside it, which
a sharded group must not take) all come back, decoded in lockstep after it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types

from tests.conftest import API_KEY, QWEN
from tests.fixtures.server import Server
from tests.sdk.test_workers import _TOL, _datum, _train


@pytest.fixture(scope="module")
def sharded(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("sharded") / "treadle"
    args = ["--workers", "2", "--sharded", "--long-poll-seconds", "2"]
    args += ["--collective-timeout-seconds", "60"]
    server = Server({QWEN: tiny_models[QWEN]}, data_dir, args)
    yield server
    server.stop()


def test_sharded_ranks_train_and_sample_as_one_process(sharded: Server, server: Server) -> None:
    (status,) = (sharded.data_dir / "workers").iterdir()
    assert len(status.read_text().splitlines()) == 3  # the generation and two ranks
    ours, our_tokens = _train(sharded.url)
    theirs, their_tokens = _train(server.url)
    for (loss_a, lps_a, norm_a), (loss_b, lps_b, norm_b) in zip(ours, theirs, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=_TOL, abs=_TOL)
        assert norm_a == pytest.approx(norm_b, rel=_TOL)
        for a, b in zip(lps_a, lps_b, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=_TOL)
    assert our_tokens == their_tokens


def test_samples_sent_during_training_all_come_back(sharded: Server) -> None:
    client = tinker.ServiceClient(base_url=sharded.url, api_key=API_KEY)
    try:
        tc = client.create_lora_training_client(base_model=QWEN, rank=4, seed=2).result()
        sampler = client.create_sampling_client(base_model=QWEN).result()
        rng = np.random.default_rng(9)
        big = [_datum(rng, 200, "cross_entropy") for _ in range(12)]
        training = tc.forward_backward(big, "cross_entropy")
        params = types.SamplingParams(max_tokens=8, temperature=1.0)
        samples = [
            sampler.sample(types.ModelInput.from_ints([3, 1 + i, 7]), 2, params) for i in range(6)
        ]
        out = training.result()
        assert len(out.loss_fn_outputs) == 12
        for sample in samples:
            sequences = sample.result().sequences
            assert len(sequences) == 2
            assert all(len(s.tokens) == 8 and len(s.logprobs or []) == 8 for s in sequences)
    finally:
        client.close("success")
