"""GPU check: treadle's engine on a device against the CPU, then its training and decode
speed on a model of Qwen3-4B's shape against plain transformers + peft, in one run.
Prints JSON lines; exits non-zero if the device disagrees with the CPU or a treadle
part fails (a failing baseline is reported and does not count).

    benchmarks/gpu_check.sh                                   # on a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny   # the test suite's run

1. ``check``: a tiny random Qwen3 in fp32, one copy on ``--device`` and one on the CPU:
   a forward_backward's logprobs, loss and adapter gradients, the adapter after one
   AdamW step, and greedy samples from two adapters decoded together must agree.
2. ``train``: a random-weight model of Qwen3-4B's shape (``--tiny``: a small one, fp32)
   in bf16; LoRA rank 32 on every linear (the unembedding too), ``cross_entropy`` over
   ``--batch`` sequences of ``--seq`` tokens. treadle's forward_backward (packed passes
   of ``--pass-tokens``) + optim_step, then the same step in transformers + peft
   (micro-batches of ``--micro`` sequences, gradients accumulated, full log-softmax).
   tok/s from the median step after one warm-up step; MFU = model FLOPs/s over the
   device's dense bf16 peak (table below, by device name).
3. ``decode``: treadle's sampler against ``generate`` (peft, LoRA unmerged), both greedy,
   at 1 and ``--concurrency`` requests, ``--prompt`` prompt tokens and ``--new`` new tokens
   each; tok/s = generated tokens / wall time, prefill included, after a warm-up run.

Model FLOPs per trained token, counted as the project's perf notes
(``reference/perf-notes.md``) do: ``4·N`` over every matmul weight N including the
unembedding (forward 2N; backward 2N for the input gradients only — frozen weights get
no weight gradient), plus 3× the causal attention forward (``QKᵀ`` and ``AV``:
``4·layers·heads·head_dim·(s+1)/2``), plus ``6·r·Σ(in+out)`` for the LoRA pairs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

from treadle.engine.attention import SEGMENT_ATTENTION
from treadle.engine.lora import Adapter, new_adapter
from treadle.engine.losses import LOSSES
from treadle.engine.models import BaseLM, base_from_model
from treadle.engine.sample import Sampler, SampleRequest
from treadle.engine.thin_matmul import set_thin_matmul
from treadle.engine.train import ForwardBackwardWork, LoraModel, forward_backward, optim_step
from treadle.sampling_params import SamplingParams
from treadle.types import AdamParams, Datum, LoraSpec, SampleResult

RANK = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the device name;
# the first match wins, so the more specific names come first.
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "GH200": 989e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
}
# Qwen3-4B's shape (its config.json), random weights.
QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


# Every line printed, for the summary at the end.
LINES: list[dict[str, Any]] = []


def emit(**fields: Any) -> None:
    LINES.append(fields)
    print(json.dumps(fields), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def random_model(
    shape: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    attention: str = SEGMENT_ATTENTION,
) -> Any:
    """A Qwen3 of ``shape`` with random weights, built on ``device`` (no host copy)."""
    config = Qwen3Config(**shape, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    return model


def as_base(model: Any) -> BaseLM:
    # The benchmark never turns tokens into text, so a one-word tokenizer stands in.
    words = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    return base_from_model("random-qwen3", Path("."), model, tokenizer)


def adapter_for(base: BaseLM, seed: int) -> LoraModel:
    adapter = new_adapter(LoraSpec(RANK), base.layers, seed)
    # A fresh B is zero; drawn on the CPU so every device gets the same values.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pair in adapter.pairs.values():
            pair.b.copy_(torch.randn(pair.b.shape, generator=gen) * 0.05)
    return LoraModel.create(adapter)


def batch(rng: np.random.Generator, count: int, length: int, vocab: int) -> list[Datum]:
    out = []
    for _ in range(count):
        tokens = rng.integers(0, vocab, length + 1)
        targets = tokens[1:].astype(np.int64)
        weights = np.ones(length, np.float32)
        out.append(
            Datum(tokens[:-1].astype(np.int64), {"target_tokens": targets, "weights": weights})
        )
    return out


def greedy(
    base: BaseLM, adapters: list[Adapter | None], prompts: list[np.ndarray], new: int
) -> tuple[list[SampleResult], float]:
    """Greedy samples, one request per prompt (all decoded together); and the seconds."""
    sampler = Sampler(base, base.decode, max_batch=max(64, len(prompts)), max_prefill_tokens=2**16)
    results: list[Any] = []
    params = SamplingParams(max_tokens=new, temperature=0.0)
    for adapter, prompt in zip(adapters, prompts, strict=True):
        sampler.add(SampleRequest(prompt, 1, params, adapter), results.append)
    sync(base.device)
    start = time.perf_counter()
    while sampler.has_work():
        sampler.step()
    sync(base.device)
    seconds = time.perf_counter() - start
    failed = [r for r in results if not isinstance(r, SampleResult)]
    if failed:
        raise RuntimeError(f"sampling failed: {failed[0]!r}")
    return results, seconds


# ---------------------------------------------------------------- 1. device vs CPU


def check(device: torch.device) -> bool:
    """The tiny model in fp32 on ``device`` and on the CPU, the same calls on both."""
    cpu_model = random_model(TINY, torch.float32, torch.device("cpu"), seed=0)
    # A random tiny head gives near-flat distributions, whose greedy margins (~1e-3)
    # float noise could flip; a sharper head gives margins like a real model's.
    with torch.no_grad():
        cpu_model.get_output_embeddings().weight.mul_(8.0)
    device_model = copy.deepcopy(cpu_model).to(device)
    outcomes = {}
    for name, model in (("cpu", cpu_model), ("device", device_model)):
        base = as_base(model)
        lora = adapter_for(base, seed=1)
        other = adapter_for(base, seed=2)
        data = batch(np.random.default_rng(0), 3, 24, TINY["vocab_size"])
        work = ForwardBackwardWork(lora, data, LOSSES["cross_entropy"], {}, False)
        [outcome] = forward_backward(base, [work], max_tokens=32)
        grads = [
            t.grad.detach().cpu().clone() for t in lora.adapter.parameters() if t.grad is not None
        ]
        # eps makes AdamW's first step a smooth function of the gradient (with Tinker's
        # 1e-12 it is lr·sign(g), which float noise can flip where g is ~0).
        optim_step(lora, AdamParams(learning_rate=1e-2, eps=1e-3))
        prompts = [np.arange(5, dtype=np.int64) + 7, np.arange(9, dtype=np.int64) + 30]
        samples, _ = greedy(base, [lora.adapter.detached(), other.adapter.detached()], prompts, 8)
        outcomes[name] = {
            "loss": outcome.loss,
            "logprobs": np.concatenate(outcome.logprobs),
            "grads": grads,
            "weights": [t.detach().cpu() for t in lora.adapter.parameters()],
            "tokens": [s.sequences[0].tokens for s in samples],
            "sample_logprobs": np.array([s.sequences[0].logprobs for s in samples]),
        }
    cpu, dev = outcomes["cpu"], outcomes["device"]
    grad_scale = max(float(g.abs().max()) for g in cpu["grads"])
    diffs = {
        "loss_rel": abs(dev["loss"] - cpu["loss"]) / abs(cpu["loss"]),
        "logprobs_abs": float(np.abs(dev["logprobs"] - cpu["logprobs"]).max()),
        "grads_rel": max(
            float((a - b).abs().max()) for a, b in zip(dev["grads"], cpu["grads"], strict=True)
        )
        / grad_scale,
        "weights_abs": max(
            float((a - b).abs().max()) for a, b in zip(dev["weights"], cpu["weights"], strict=True)
        ),
        "sample_logprobs_abs": float(np.abs(dev["sample_logprobs"] - cpu["sample_logprobs"]).max()),
    }
    # fp32 on both; what differs is only the order of summation inside kernels.
    limits = {
        "loss_rel": 1e-4,
        "logprobs_abs": 1e-4,
        "grads_rel": 1e-4,
        "weights_abs": 1e-5,
        "sample_logprobs_abs": 1e-4,
    }
    same_tokens = dev["tokens"] == cpu["tokens"]
    ok = same_tokens and all(diffs[key] <= limits[key] for key in limits)
    emit(
        part="check",
        device=str(device),
        ok=ok,
        same_greedy_tokens=same_tokens,
        **{key: float(f"{value:.3g}") for key, value in diffs.items()},
        limits=limits,
    )
    return ok


# ---------------------------------------------------------------- 2. training


def train_flops_per_token(shape: dict[str, Any], seq: int) -> float:
    """Model FLOPs of one trained token of a LoRA step (see the module docstring)."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    heads, kv_heads, dim = (
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["head_dim"],
    )
    layers, vocab = shape["num_hidden_layers"], shape["vocab_size"]
    # (in, out) of every adapted linear: q, k, v, o, gate, up, down per layer; the head.
    linears = [
        (hidden, heads * dim),
        (hidden, kv_heads * dim),
        (hidden, kv_heads * dim),
        (heads * dim, hidden),
        (hidden, inner),
        (hidden, inner),
        (inner, hidden),
    ] * layers + [(hidden, vocab)]
    weights = sum(i * o for i, o in linears)
    lora = sum(i + o for i, o in linears) * RANK
    attention_forward = 4 * layers * heads * dim * (seq + 1) / 2
    return 4 * weights + 3 * attention_forward + 6 * lora


def timed_steps(step: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def report_train(
    impl: str, times: list[float], tokens: int, flops: float, device: torch.device
) -> None:
    median = statistics.median(times[1:]) if len(times) > 1 else times[0]
    peak = peak_flops(device)
    emit(
        part="train",
        impl=impl,
        tok_s=round(tokens / median, 1),
        step_s=[round(t, 3) for t in times],
        mfu=None if peak is None else round(tokens * flops / median / peak, 4),
        peak_mem_gb=peak_memory_gb(device),
    )


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 2)


def train_treadle(base: BaseLM, args: argparse.Namespace, shape: dict[str, Any]) -> None:
    model = adapter_for(base, seed=3)
    data = batch(np.random.default_rng(1), args.batch, args.seq, shape["vocab_size"])
    work = ForwardBackwardWork(model, data, LOSSES["cross_entropy"], {}, False)
    adam = AdamParams(learning_rate=1e-5)

    def step() -> None:
        forward_backward(base, [work], max_tokens=args.pass_tokens)
        optim_step(model, adam)

    times = timed_steps(step, args.steps, base.device)
    flops = train_flops_per_token(shape, args.seq)
    report_train("treadle", times, args.batch * args.seq, flops, base.device)


def train_peft(
    peft_model: Any, args: argparse.Namespace, shape: dict[str, Any], device: torch.device
) -> None:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    rng = np.random.default_rng(1)
    tokens = torch.from_numpy(rng.integers(0, shape["vocab_size"], (args.batch, args.seq + 1))).to(
        device
    )

    def step() -> None:
        # Micro-batches with gradient accumulation: 8 x 2048 tokens at once would need
        # well over 100 GB of activations and full-vocabulary log-softmax copies.
        for start in range(0, args.batch, args.micro):
            part = tokens[start : start + args.micro]
            logits = peft_model(input_ids=part[:, :-1]).logits
            lp = torch.log_softmax(logits.float(), -1).gather(-1, part[:, 1:, None])
            (-lp.sum()).backward()
            del logits, lp
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed_steps(step, args.steps, device)
    flops = train_flops_per_token(shape, args.seq)
    report_train("peft", times, args.batch * args.seq, flops, device)


# ---------------------------------------------------------------- 3. decoding


def decode_treadle(base: BaseLM, args: argparse.Namespace, shape: dict[str, Any]) -> None:
    adapter = adapter_for(base, seed=4).adapter.detached()
    rng = np.random.default_rng(2)
    for concurrency in (1, args.concurrency):
        prompts = [rng.integers(0, shape["vocab_size"], args.prompt) for _ in range(concurrency)]
        greedy(base, [adapter] * concurrency, prompts, 4)  # warm-up: kernels, cache
        results, seconds = greedy(base, [adapter] * concurrency, prompts, args.new)
        generated = sum(len(r.sequences[0].tokens) for r in results)
        emit(
            part="decode",
            impl="treadle",
            concurrency=concurrency,
            tok_s=round(generated / seconds, 1),
            seconds=round(seconds, 3),
        )


def decode_generate(
    peft_model: Any, args: argparse.Namespace, shape: dict[str, Any], device: torch.device
) -> None:
    rng = np.random.default_rng(2)
    peft_model.eval()
    for concurrency in (1, args.concurrency):
        prompts = torch.from_numpy(
            rng.integers(0, shape["vocab_size"], (concurrency, args.prompt))
        ).to(device)

        def run(new: int, prompts: torch.Tensor = prompts) -> torch.Tensor:
            with torch.inference_mode():
                out: torch.Tensor = peft_model.generate(
                    input_ids=prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )
            return out

        run(4)  # warm-up
        sync(device)
        start = time.perf_counter()
        out = run(args.new)
        sync(device)
        seconds = time.perf_counter() - start
        generated = (out.shape[1] - args.prompt) * concurrency
        emit(
            part="decode",
            impl="generate",
            concurrency=concurrency,
            tok_s=round(generated / seconds, 1),
            seconds=round(seconds, 3),
        )


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny fp32 model in place of Qwen3-4B's shape, small sizes (a smoke run)",
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="training steps per implementation (1 warm-up)"
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per training step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per training sequence")
    parser.add_argument(
        "--pass-tokens",
        type=int,
        default=4096,
        help="treadle's pass budget (tokens per packed forward/backward pass)",
    )
    parser.add_argument(
        "--micro", type=int, default=2, help="sequences per forward/backward of the peft step"
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="concurrent decode requests (and 1)"
    )
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per decode request")
    parser.add_argument("--new", type=int, default=128, help="new tokens per decode request")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.seq, args.pass_tokens, args.steps = 2, 32, 48, 2
        args.concurrency, args.prompt, args.new = 4, 8, 8
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # The CPU decode kernel would be compiled on first use (~30 s) only to decline.
        set_thin_matmul(False)
    emit(
        part="setup",
        device=str(device),
        name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        peak_bf16_flops=peak_flops(device),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=importlib.metadata.version("peft"),
        tiny=args.tiny,
        args=vars(args),
    )
    ok = check(device)

    shape = TINY if args.tiny else QWEN3_4B
    # fp32 on CPU: bf16 matmuls there are ~100x slower than fp32 (perf-notes.md).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ok &= measure_treadle(args, shape, dtype, device)
    free(device)  # the model is gone: room for the baseline's copy

    from peft import LoraConfig, get_peft_model

    # The stock attention, as a user would run it.
    plain = random_model(shape, dtype, device, seed=0, attention="sdpa")
    peft_model = get_peft_model(
        plain, LoraConfig(r=RANK, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    )
    guarded("train", lambda: train_peft(peft_model, args, shape, device))
    guarded("decode", lambda: decode_generate(peft_model, args, shape, device))
    summary(args.concurrency)
    return 0 if ok else 1


def summary(concurrency: int) -> None:
    """The issue's targets against this run: treadle's training MFU (>= 0.40 on an
    H100/H200-class GPU) and its decode speed at ``concurrency`` requests (>= 2x
    ``generate``); each ratio is against the baseline measured above."""

    def find(part: str, impl: str, **match: Any) -> dict[str, Any]:
        for line in LINES:
            wanted = {"part": part, "impl": impl, **match}
            if all(line.get(key) == value for key, value in wanted.items()):
                return line
        return {}

    train, peft = find("train", "treadle"), find("train", "peft")
    ours = find("decode", "treadle", concurrency=concurrency)
    theirs = find("decode", "generate", concurrency=concurrency)
    emit(
        part="summary",
        treadle_mfu=train.get("mfu"),
        mfu_target=0.40,
        train_vs_peft=_ratio(train.get("tok_s"), peft.get("tok_s")),
        decode_vs_generate=_ratio(ours.get("tok_s"), theirs.get("tok_s")),
        decode_target=2.0,
        concurrency=concurrency,
    )


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if not ours or not theirs else round(ours / theirs, 3)


def measure_treadle(
    args: argparse.Namespace, shape: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> bool:
    base = as_base(random_model(shape, dtype, device, seed=0))
    trained = guarded("train", lambda: train_treadle(base, args, shape))
    return guarded("decode", lambda: decode_treadle(base, args, shape)) and trained


def guarded(part: str, run: Callable[[], None]) -> bool:
    """Run one measurement; a failure (out of memory, above all) is reported as a line
    and the run goes on to the next part."""
    try:
        run()
    except Exception as exc:
        emit(part=part, error=f"{type(exc).__name__}: {str(exc)[:500]}")
        return False
    return True


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
