"""Run by an old tinker SDK (JSON forward_backward era) in its own venv; prints JSON.

Usage: python old_sdk_client.py BASE_URL MODEL_NAME. Kept free of treadle and test imports:
the old venv has only its SDK.
"""

import json
import sys

import tinker
from tinker import types


def datum(tokens, **inputs):
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
    )


def main():
    base_url, model = sys.argv[1], sys.argv[2]
    client = tinker.ServiceClient(base_url=base_url, api_key="tml-old-sdk")
    tc = client.create_lora_training_client(base_model=model, rank=4, seed=3)
    if hasattr(tc, "result"):
        tc = tc.result()
    out = {"version": tinker.__version__}
    a, b = [72, 101, 108, 108, 111], [1, 2, 3, 4, 5, 6, 7]
    ce = tc.forward_backward(
        [datum(a, weights=[1.0] * 4), datum(b, weights=[0.5] * 6)], "cross_entropy"
    ).result()
    out["ce_loss"] = ce.metrics["loss:sum"]
    out["ce_logprobs"] = [o["logprobs"].tolist() for o in ce.loss_fn_outputs]
    ppo = tc.forward_backward(
        [datum(a, logprobs=[-5.0, -6.0, -5.5, -5.8], advantages=[1.0, -1.0, 1.0, 0.5])],
        "ppo",
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    ).result()
    out["ppo_loss"] = ppo.metrics["loss:sum"]
    out["forward_before"] = tc.forward([datum(b)], "cross_entropy").result().metrics["loss:sum"]
    out["optim"] = tc.optim_step(types.AdamParams(learning_rate=0.05)).result().metrics
    out["forward_after"] = tc.forward([datum(b)], "cross_entropy").result().metrics["loss:sum"]
    # More than 1024 datums: the SDK splits the call (0.24 sends the first chunk last).
    many = [datum([i % 200 + 1, 7, 9], weights=[1.0, 1.0]) for i in range(1030)]
    big = tc.forward(many, "cross_entropy").result()
    out["chunked_loss"] = big.metrics["loss:sum"]
    out["chunked_outputs"] = len(big.loss_fn_outputs)
    pieces = [tc.forward(many[i : i + 515], "cross_entropy") for i in (0, 515)]
    out["pieces_loss"] = sum(p.result().metrics["loss:sum"] for p in pieces)
    try:
        tc.forward_backward([datum([1, 100_000, 2], weights=[1.0] * 2)], "cross_entropy").result()
    except tinker.RequestFailedError as exc:
        out["error"] = {"category": str(getattr(exc, "category", "")), "message": str(exc)}
    out["after_error"] = tc.forward([datum(a)], "cross_entropy").result().metrics["loss:sum"]
    print(json.dumps(out))


main()
