"""Sampling throughput: treadle through the official SDK vs. transformers ``generate`` with
the same PEFT adapter (unmerged), on the built-in model, in one run. Prints JSON lines.

    .venv/bin/python benchmarks/sample_throughput.py [--repeats 2]

Prompt 64 tokens, 128 new tokens (no early stop), temperature 1; batch 1 and 16 requests
at once (treadle: 16 concurrent ``sample`` calls; generate: one batch of 16). tok/s counts
generated tokens per wall-clock second. Time to first token is the wall time of the same
requests with ``max_tokens=1`` (the SDK does not stream). The adapter is a rank-32 LoRA
on every linear, saved by treadle and loaded into peft for ``generate``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT_LEN, NEW_TOKENS = 64, 128


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def prompts(count: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(100, 40000, PROMPT_LEN).tolist() for _ in range(count)]


def bench_treadle(url: str, repeats: int) -> Path:
    import tinker
    from tinker import types

    client = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    tc = client.create_lora_training_client(base_model=MODEL, rank=32, seed=0).result()
    # One step so the adapter is not zero (B starts at zero).
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(prompts(1)[0][:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=prompts(1)[0][1:], dtype="int64")},
    )
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    path = tc.save_weights_for_sampler("bench").result().path
    sampler = tc.save_weights_and_get_sampling_client().result()
    for batch in (1, 16):
        for new_tokens, label in ((1, "ttft_s"), (NEW_TOKENS, "tok_s")):
            params = types.SamplingParams(max_tokens=new_tokens, temperature=1.0, stop=[], seed=1)
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                futures = [
                    sampler.sample(types.ModelInput.from_ints(p), 1, params) for p in prompts(batch)
                ]
                generated = sum(len(f.result().sequences[0].tokens) for f in futures)
                times.append(time.perf_counter() - start)
            wall = statistics.median(times[1:])
            value = wall if label == "ttft_s" else generated / wall
            emit(impl="treadle_sdk", batch=batch, metric=label, value=round(value, 3))
    client.close("success")
    run, kind, name = path.removeprefix("tinker://").split("/")
    return Path(run) / kind / name


def bench_generate(folder: Path, adapter: Path, repeats: int) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    for batch in (1, 16):
        input_ids = torch.tensor(prompts(batch))
        for new_tokens, label in ((1, "ttft_s"), (NEW_TOKENS, "tok_s")):
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        do_sample=True,
                        temperature=1.0,
                        top_k=0,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        pad_token_id=0,
                    )
                times.append(time.perf_counter() - start)
            generated = (out.shape[1] - PROMPT_LEN) * batch
            wall = statistics.median(times[1:])
            value = wall if label == "ttft_s" else generated / wall
            emit(impl="generate_peft", batch=batch, metric=label, value=round(value, 3))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".treadle")
    parser.add_argument("--port", type=int, default=8732)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx

    from treadle.engine.embedded import embedded_model_folder

    folder = embedded_model_folder(args.data_dir)
    emit(event="start", cpus=os.cpu_count(), model=MODEL)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        (data_dir / "models").mkdir()
        (data_dir / "models" / folder.name).symlink_to(folder)
        server = subprocess.Popen(
            [sys.executable, "-m", "treadle", "serve", "--port", str(args.port)]
            + ["--data-dir", str(data_dir), "--log-level", "warning"]
        )
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            adapter = data_dir / "checkpoints" / bench_treadle(url, args.repeats)
        finally:
            server.terminate()
            server.wait()
        bench_generate(folder, adapter, args.repeats)


if __name__ == "__main__":
    main()
