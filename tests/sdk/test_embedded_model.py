"""The built-in SmolLM2-135M-Instruct end to end: ``treadle demo`` (tutorial 202 as
published, then a fine-tune that teaches a fact), every printed number checked against
plain transformers on the same weights; and the model knows things."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from tests.fixtures.reference import base_logprobs
from tests.fixtures.server import free_port

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def demo_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def demo_run(embedded_data_dir: Path, demo_port: int) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "treadle", "demo", "--port", str(demo_port)]
        + ["--data-dir", str(embedded_data_dir)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def demo_output(demo_run: subprocess.CompletedProcess[str]) -> str:
    return demo_run.stdout


def _number(output: str, label: str) -> float:
    match = re.search(re.escape(label) + r" = (-?\d+\.\d+)", output)
    assert match, f"{label!r} not printed"
    return float(match.group(1))


def test_demo_prints_the_tutorial_numbers_right(demo_output: str, embedded_data_dir: Path):
    folder = embedded_data_dir / "models" / "SmolLM2-135M-Instruct"
    tok = AutoTokenizer.from_pretrained(folder)
    prompt_ids = tok.encode("The capital of France is")
    target_ids = tok.encode(" Paris.")
    ids = prompt_ids + target_ids
    n_prompt = len(prompt_ids) - 1
    lp = base_logprobs(folder, ids[:-1], ids[1:])
    weights = torch.tensor([0.0] * n_prompt + [1.0] * len(target_ids), dtype=torch.float64)
    q = torch.tensor([0.0] * n_prompt + [-1.5] * len(target_ids), dtype=torch.float64)
    ratio = torch.exp(lp - q)
    adv = weights

    def ppo(lo: float, hi: float) -> float:
        return float(-torch.min(ratio * adv, torch.clamp(ratio, lo, hi) * adv).sum())

    expected = {
        "cross_entropy loss:sum": float(-(lp * weights).sum()),
        "importance_sampling loss:sum": float(-(ratio * adv).sum()),
        "ppo loss:sum": ppo(0.8, 1.2),
        "cispo loss:sum": float(-(torch.clamp(ratio, 0.8, 1.2) * lp * adv).sum()),
        "PPO (tight clip) loss:sum": ppo(0.9, 1.1),
        "PPO (wide clip) loss:sum": ppo(0.5, 1.5),
    }
    for label, want in expected.items():
        assert _number(demo_output, label) == pytest.approx(want, abs=2e-4), label
    last3 = re.search(r"cross_entropy logprobs \(last 3 tokens\): \[(.*)\]", demo_output)
    assert last3
    got = [float(x) for x in last3.group(1).split(",")]
    assert got == pytest.approx(lp[-3:].tolist(), abs=1e-4)
    squared = re.search(r"'logprob_sq': (-?[\d.e+-]+)", demo_output)
    assert squared and float(squared.group(1)) == pytest.approx(float((lp**2).sum()), rel=1e-4)
    # The per-datum port of the same loss, run on the server: the same number.
    on_server = re.search(r"'custom/logprob_sq:sum': (-?[\d.e+-]+)", demo_output)
    assert on_server and float(on_server.group(1)) == pytest.approx(float((lp**2).sum()), rel=1e-4)
    rejected = prompt_ids + tok.encode(" Berlin.")
    lp_rejected = base_logprobs(folder, rejected[:-1], rejected[1:])
    dpo = -torch.nn.functional.logsigmoid(0.1 * (lp.sum() - lp_rejected.sum()))
    found = re.search(r"'dpo_loss': (-?[\d.e+-]+)", demo_output)
    assert found and float(found.group(1)) == pytest.approx(float(dpo), rel=1e-4)


def test_demo_teaches_the_fact(demo_output: str):
    losses = [float(x) for x in re.findall(r"mean NLL of the answer (\d+\.\d+)", demo_output)]
    assert len(losses) == 20
    assert losses[-1] < losses[0] / 10
    before = re.search(r"before fine-tuning: (.*)", demo_output)
    after = re.search(r"after fine-tuning: (.*)", demo_output)
    assert before and "PURPLE-ELEPHANT-42" not in before.group(1)
    assert after and "PURPLE-ELEPHANT-42" in after.group(1)
    assert "the model learned the fact" in demo_output


def test_demo_prints_no_warnings_and_where_to_look_next(
    demo_run: subprocess.CompletedProcess[str], demo_port: int
):
    everything = demo_run.stdout + demo_run.stderr
    for noise in ("DeprecationWarning", "FutureWarning", "DEPRECATED", "Traceback"):
        assert noise not in everything, everything[everything.find(noise) - 500 :][:1500]
    url = f"http://127.0.0.1:{demo_port}"
    assert f"{url}/console" in demo_run.stdout
    assert f"{url}/oai/api/v1" in demo_run.stdout
    curl = re.search(r"^\s*(curl .*)$", demo_run.stdout, re.MULTILINE)
    assert curl, "no curl example printed"
    assert f"{url}/oai/api/v1/chat/completions" in curl.group(1)
    assert f'"model": "{MODEL}"' in curl.group(1)
    # Not at a terminal, the demo stops its server when done.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/api/v1/healthz", timeout=2)


def test_the_default_model_knows_the_capital_of_france(embedded_data_dir: Path):
    import tinker
    from tinker import types

    from tests.fixtures.server import Server

    server = Server({}, embedded_data_dir)
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key="tml-test")
        sampler = client.create_sampling_client(base_model=MODEL).result()
        # SamplingClient.get_tokenizer() looks the name up on the Hub; read the folder.
        tok = AutoTokenizer.from_pretrained(embedded_data_dir / "models" / "SmolLM2-135M-Instruct")
        prompt = types.ModelInput.from_ints(tok.encode("The capital of France is"))
        result = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0))
        text = tok.decode(result.result().sequences[0].tokens)
        assert "Paris" in text, text
        client.close("success")
    finally:
        server.stop()
