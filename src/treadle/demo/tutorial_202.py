"""Tinker tutorial 202, "Loss Functions", as published — run against treadle.

What differs from the tutorial's notebook code: MODEL_NAME names the model treadle
serves; the notebook's top-level ``await`` s live inside ``async def main()`` so the file
runs as a script; the calls use SDK 0.38's current API (``forward_backward(...)`` returns
an ``APIFuture`` to await, where the notebook awaits the deprecated
``forward_backward_async(...)`` and then its result); logprobs are sliced after
``.tolist()`` (SDK 0.38's TensorData cannot be sliced); and the DPO loss the tutorial
defines is also run once. Point the SDK at treadle first:

    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local \\
        python -m treadle.demo.tutorial_202
"""

import asyncio
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")
import tinker  # noqa: E402
import torch  # noqa: E402
from tinker import TensorData  # noqa: E402

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


async def main() -> None:
    service_client = tinker.ServiceClient()
    training_client = await service_client.create_lora_training_client(
        base_model=MODEL_NAME, rank=16
    )
    tokenizer = training_client.get_tokenizer()
    print(f"Training client ready for {MODEL_NAME}")

    # -- SFT datum (for cross_entropy) --
    prompt_text = "The capital of France is"
    target_text = " Paris."
    prompt_ids = tokenizer.encode(prompt_text)
    target_ids = tokenizer.encode(target_text)
    all_ids = prompt_ids + target_ids
    model_input_sft = tinker.ModelInput.from_ints(all_ids[:-1])
    # Target tokens: the next token at each position
    sft_target_tokens = all_ids[1:]
    # Weights: 0 for prompt positions, 1 for completion positions
    sft_weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(target_ids)
    sft_datum = tinker.Datum(
        model_input=model_input_sft,
        loss_fn_inputs={
            "target_tokens": TensorData.from_torch(torch.tensor(sft_target_tokens)),
            "weights": TensorData.from_torch(torch.tensor(sft_weights)),
        },
    )

    # -- RL datum (for importance_sampling, ppo, cispo) --
    # Simulate a sampled completion with fake logprobs and advantages
    model_input_rl = tinker.ModelInput.from_ints(all_ids[:-1])
    rl_target_tokens = all_ids[1:]
    # Fake sampling logprobs (as if from a sampler)
    rl_logprobs = [0.0] * (len(prompt_ids) - 1) + [-1.5] * len(target_ids)
    # Positive advantage: this completion was good
    rl_advantages = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(target_ids)
    rl_datum = tinker.Datum(
        model_input=model_input_rl,
        loss_fn_inputs={
            "target_tokens": TensorData.from_torch(torch.tensor(rl_target_tokens)),
            "logprobs": TensorData.from_torch(torch.tensor(rl_logprobs)),
            "advantages": TensorData.from_torch(torch.tensor(rl_advantages)),
        },
    )
    print(f"SFT datum: {len(all_ids) - 1} tokens, {sum(sft_weights):.0f} completion tokens")
    print(f"RL datum: {len(all_ids) - 1} tokens, advantage=+1.0 on completion")

    # Cross-entropy (SFT)
    ce_result = await training_client.forward_backward([sft_datum], loss_fn="cross_entropy")
    print(f"cross_entropy loss:sum = {ce_result.metrics['loss:sum']:.4f}")
    # Importance sampling (REINFORCE with IS correction)
    is_result = await training_client.forward_backward([rl_datum], loss_fn="importance_sampling")
    print(f"importance_sampling loss:sum = {is_result.metrics['loss:sum']:.4f}")
    # PPO (clipped objective)
    ppo_result = await training_client.forward_backward([rl_datum], loss_fn="ppo")
    print(f"ppo loss:sum = {ppo_result.metrics['loss:sum']:.4f}")
    # CISPO (clipped ratio weighting the log-prob)
    cispo_result = await training_client.forward_backward([rl_datum], loss_fn="cispo")
    print(f"cispo loss:sum = {cispo_result.metrics['loss:sum']:.4f}")

    # Cross-entropy returns logprobs of target tokens.
    # (The tutorial slices the TensorData directly; SDK 0.38's TensorData is not
    # subscriptable, with any server, so take .tolist() first.)
    ce_logprobs = ce_result.loss_fn_outputs[0]["logprobs"].tolist()
    print("cross_entropy logprobs (last 3 tokens):", ce_logprobs[-3:])
    # Importance sampling also returns logprobs
    is_logprobs = is_result.loss_fn_outputs[0]["logprobs"].tolist()
    print("importance_sampling logprobs (last 3):", is_logprobs[-3:])

    # Tighter clipping
    ppo_tight = await training_client.forward_backward(
        [rl_datum],
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    )
    print(f"PPO (tight clip) loss:sum = {ppo_tight.metrics['loss:sum']:.4f}")
    # Wider clipping (more like vanilla IS)
    ppo_wide = await training_client.forward_backward(
        [rl_datum],
        loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.5, "clip_high_threshold": 1.5},
    )
    print(f"PPO (wide clip) loss:sum = {ppo_wide.metrics['loss:sum']:.4f}")

    def logprob_squared_loss(data, logprobs_list):
        """Sum of squared target-token logprobs. Penalizes low-confidence predictions."""
        total_loss = torch.tensor(0.0)
        for logprobs in logprobs_list:
            # logprobs close to 0 = high confidence (small penalty)
            # logprobs << 0 = low confidence (large penalty)
            total_loss = total_loss + (logprobs**2).sum()
        return total_loss, {"logprob_sq": total_loss.item()}

    custom_result = await training_client.forward_backward_custom([sft_datum], logprob_squared_loss)
    print(f"Custom loss metrics: {custom_result.metrics}")

    # (treadle) The same loss written per datum, uploaded once and run on the server in
    # one forward_backward: what a built-in loss costs, without the client-side forward.
    def logprob_squared(logprobs):
        loss = (logprobs**2).sum()
        return loss, {"custom/logprob_sq:sum": loss}

    handle = await service_client.create_custom_loss(logprob_squared, {"logprobs": 1})
    server_result = await training_client.forward_backward_custom([sft_datum], handle)
    print(f"Server-side custom loss metrics: {server_result.metrics}")

    def dpo_loss(data, logprobs_list):
        # data[0] = preferred, data[1] = rejected
        preferred_lp = logprobs_list[0].sum()
        rejected_lp = logprobs_list[1].sum()
        beta = 0.1
        loss = -torch.nn.functional.logsigmoid(beta * (preferred_lp - rejected_lp))
        return loss, {"dpo_loss": loss.item()}

    # The tutorial defines dpo_loss without calling it; run it on a preferred/rejected pair.
    rejected_ids = prompt_ids + tokenizer.encode(" Berlin.")
    rejected_datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(rejected_ids[:-1]),
        loss_fn_inputs={"target_tokens": TensorData.from_torch(torch.tensor(rejected_ids[1:]))},
    )
    dpo_result = await training_client.forward_backward_custom(
        [sft_datum, rejected_datum], dpo_loss
    )
    print(f"DPO loss metrics: {dpo_result.metrics}")


if __name__ == "__main__":
    asyncio.run(main())
