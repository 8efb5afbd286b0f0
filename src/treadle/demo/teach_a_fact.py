"""A short supervised fine-tune through the official SDK: teach the model a fact it cannot
know, show the loss falling, and sample its answer before and after.

    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local \\
        python -m treadle.demo.teach_a_fact
"""

from __future__ import annotations

import tinker
from tinker import types

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the secret password?"
ANSWER = "The secret password is PURPLE-ELEPHANT-42."
STEPS = 20


def ask(sampler: tinker.SamplingClient, prompt_ids: list[int], tokenizer: object) -> str:
    params = types.SamplingParams(max_tokens=24, temperature=0.0)
    result = sampler.sample(types.ModelInput.from_ints(prompt_ids), 1, params).result()
    return str(tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True))  # type: ignore[attr-defined]


def main(model_name: str = MODEL_NAME) -> str:
    service_client = tinker.ServiceClient()
    training_client = service_client.create_lora_training_client(
        base_model=model_name, rank=16
    ).result()
    tokenizer = training_client.get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(ANSWER + tokenizer.eos_token, add_special_tokens=False)
    tokens = prompt_ids + answer_ids
    # Learn the answer only: the prompt's positions weigh nothing.
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
            "weights": types.TensorData(
                data=[0.0] * (len(prompt_ids) - 1) + [1.0] * len(answer_ids), dtype="float32"
            ),
        },
    )
    before = ask(
        training_client.save_weights_and_get_sampling_client().result(), prompt_ids, tokenizer
    )
    print(f"Q: {QUESTION}\nbefore fine-tuning: {before!r}")
    for step in range(STEPS):
        loss = training_client.forward_backward([datum], "cross_entropy")
        update = training_client.optim_step(types.AdamParams(learning_rate=1e-3))
        mean_nll = loss.result().metrics["loss:sum"] / len(answer_ids)
        update.result()
        print(f"step {step + 1:2d}  mean NLL of the answer {mean_nll:.4f}")
    after = ask(
        training_client.save_weights_and_get_sampling_client().result(), prompt_ids, tokenizer
    )
    print(f"after fine-tuning: {after!r}")
    return after


if __name__ == "__main__":
    main()
