"""Sharded base models (engine.sharded) on 2 gloo ranks against the same engine in one
process: after several steps with two adapters alternating, every built-in loss, an odd
number of datums and a datum longer than the pass budget, losses, logprobs, gradient
norms and adapter weights agree, and greedy sampling picks the same tokens."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.fixtures.tiny_models import make_tiny_model
from treadle.engine.lora import new_adapter
from treadle.engine.losses import LOSSES
from treadle.engine.models import BaseLM, load_base_model
from treadle.engine.sample import Sampler, SampleRequest
from treadle.engine.sharded import shard
from treadle.engine.train import ForwardBackwardWork, LoraModel, forward_backward, optim_step
from treadle.sampling_params import SamplingParams
from treadle.types import AdamParams, Datum, LoraSpec, SampleResult

WORLD = 2
MAX_TOKENS = 16  # the pass budget: the 40-token datum gets a (checkpointed) pass of its own
# Tiny models of two kinds: tied embeddings (one root parameter serves embedding and
# unembedding) and an untied unembedding with q/k/v biases.
MODELS = {"qwen3": True, "qwen2": False}


def _datum(rng: np.random.Generator, n: int, loss: str) -> Datum:
    tokens = rng.integers(0, 250, n + 1)
    inputs = {"target_tokens": tokens[1:].astype(np.int64)}
    for key in LOSSES[loss].required[1:]:
        if key == "logprobs":
            inputs[key] = rng.uniform(-6.0, -4.0, n).astype(np.float32)
        elif key == "sequence_ratio_mask":
            inputs[key] = (rng.uniform(size=n) < 0.7).astype(np.float32)
        else:
            inputs[key] = rng.normal(size=n).astype(np.float32)
    if loss == "cross_entropy":
        inputs["weights"] = rng.uniform(-0.5, 1.5, n).astype(np.float32)
    return Datum(tokens[:-1].astype(np.int64), inputs)


def _model(base: BaseLM, seed: int, rank: int) -> LoraModel:
    adapter = new_adapter(LoraSpec(rank), base.layers, seed)
    # A fresh B is zero; perturb it so that the first step already moves every tensor.
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for pair in adapter.pairs.values():
            pair.b.copy_(torch.randn(pair.b.shape, generator=gen) * 0.05)
    return LoraModel.create(adapter)


def _work(model: LoraModel, data: list[Datum], loss: str, forward_only: bool = False) -> Any:
    return ForwardBackwardWork(model, data, LOSSES[loss], dict(LOSSES[loss].config), forward_only)


def _script(base: BaseLM) -> dict[str, Any]:
    """The same engine calls, whether ``base`` is sharded or whole."""
    rng = np.random.default_rng(0)
    adam = AdamParams(learning_rate=1e-2)
    out: dict[str, Any] = {"loss": [], "logprobs": [], "grad_norm": []}
    first = _model(base, seed=1, rank=4)
    second = None
    for step, loss in enumerate(LOSSES):
        if step == 1:
            second = _model(base, seed=2, rank=8)  # created after the first one has trained
        model = first if step % 2 == 0 or second is None else second
        lengths = [5, 40, 3] if step % 3 == 0 else [7, 2, 9, 4, 6]  # odd counts; one too long
        [outcome] = forward_backward(
            base, [_work(model, [_datum(rng, n, loss) for n in lengths], loss)], MAX_TOKENS
        )
        out["loss"].append(outcome.loss)
        out["logprobs"] += outcome.logprobs
        out["grad_norm"].append(optim_step(model, adam)["grad_norm:mean"])
    assert second is not None
    # A pass that fails half-way (after the decoder layers, at the head) leaves the
    # model fit for the next one.
    bad = _datum(rng, 5, "cross_entropy")
    bad.inputs["target_tokens"][2] = 10**6
    with pytest.raises(RuntimeError, match="out of bounds"):
        forward_backward(base, [_work(first, [bad], "cross_entropy")], MAX_TOKENS)
    # Both adapters and a forward-only request sharing passes.
    works = [
        _work(first, [_datum(rng, n, "ppo") for n in (6, 3, 8)], "ppo"),
        _work(second, [_datum(rng, n, "cross_entropy") for n in (5, 9)], "cross_entropy"),
        _work(first, [_datum(rng, 4, "cross_entropy")], "cross_entropy", forward_only=True),
    ]
    for outcome in forward_backward(base, works, MAX_TOKENS):
        out["loss"].append(outcome.loss)
        out["logprobs"] += outcome.logprobs
    for model in (first, second):
        out["grad_norm"].append(optim_step(model, adam)["grad_norm:mean"])
    out["weights"] = [t.detach().clone() for m in (first, second) for t in m.adapter.parameters()]
    out["samples"] = _sample(base, [None, first.adapter.detached(), second.adapter.detached()])
    return out


def _sample(base: BaseLM, adapters: list[Any]) -> list[SampleResult]:
    """Greedy samples from three adapters (one is the base model) decoded together."""
    sampler = Sampler(base, base.decode, max_batch=8, max_prefill_tokens=64)
    results: list[Any] = []
    rng = np.random.default_rng(1)
    for index, adapter in enumerate(adapters):
        prompt = rng.integers(0, 250, 3 + 2 * index).astype(np.int64)
        params = SamplingParams(max_tokens=4 + 2 * index, temperature=0.0)
        request = SampleRequest(prompt, 2, params, adapter, prompt_logprobs=True)
        sampler.add(request, results.append)
    while sampler.has_work():
        sampler.step()
    assert all(isinstance(result, SampleResult) for result in results), results
    return results


def _rank(rank: int, port: int, folders: list[Path], out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        # Sharding after the sampler exists would leave its decode stack on whole weights.
        early = load_base_model("tiny", str(folders[0]), folders[0].parent)
        Sampler(early, early.decode)
        with pytest.raises(RuntimeError, match="before building its sampler"):
            shard(early)
        for folder in folders:
            base = load_base_model("tiny", str(folder), folder.parent)
            whole = sum(p.numel() for p in base.model.parameters())
            shard(base)
            mine = sum(p.to_local().numel() for p in base.model.parameters())
            result = _script(base)
            result["held"] = mine / whole
            torch.save(result, out_dir / f"{folder.parent.name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return [
        make_tiny_model(tmp_path_factory.mktemp(arch) / "m", arch, tie_word_embeddings=tied)
        for arch, tied in MODELS.items()
    ]


def test_sharded_ranks_match_one_process(
    folders: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rank, args=(_free_port(), folders, tmp_path), nprocs=WORLD, join=True)
    threads = torch.get_num_threads()
    for folder in folders:
        # One thread, as each rank has: thread counts change how matmuls split sums.
        torch.set_num_threads(1)
        try:
            reference = _script(load_base_model("tiny", str(folder), folder.parent))
        finally:
            torch.set_num_threads(threads)
        ranks = [
            torch.load(tmp_path / f"{folder.parent.name}-{r}.pt", weights_only=False)
            for r in range(WORLD)
        ]
        for result in ranks:
            # Each rank holds its half of the base weights (plus padding of odd rows).
            assert 0.5 <= result["held"] < 0.51
            np.testing.assert_allclose(result["loss"], reference["loss"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(result["grad_norm"], reference["grad_norm"], rtol=1e-5)
            assert len(result["logprobs"]) == len(reference["logprobs"])
            for got, want in zip(result["logprobs"], reference["logprobs"], strict=True):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            for got, want in zip(result["weights"], reference["weights"], strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            for got, want in zip(result["samples"], reference["samples"], strict=True):
                assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
                for mine, theirs in zip(got.sequences, want.sequences, strict=True):
                    np.testing.assert_allclose(mine.logprobs, theirs.logprobs, atol=1e-5)
                np.testing.assert_allclose(
                    got.prompt_logprobs, want.prompt_logprobs, atol=1e-5, equal_nan=True
                )
        # The weights moved: a comparison of untouched adapters would prove little.
        initial = _model(load_base_model("tiny", str(folder), folder.parent), 1, 4)
        assert not torch.allclose(initial.adapter.parameters()[0], reference["weights"][0])
