"""On-policy RL through the official SDK: sample a group of answers per prompt, score
them with a programmatic reward, turn rewards into group-relative advantages, take an
``importance_sampling`` step, sample again from the new weights.

The task of :func:`main`: answer simple questions right, in one word. The instruct model
answers in sentences at first; the reward (:func:`concise_answer_reward`) pays for the
right word and divides by the length of the answer, so it learns brevity without
learning to say any one word to everything (a pure one-word reward taught it to answer
"SmolLM" to every question).

    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local \\
        python -m treadle.demo.rl --steps 16
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections.abc import Callable, Sequence

import tinker
from tinker import types

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Each question with the words accepted as its answer.
QUESTIONS = [
    ("What color is the sky on a clear day?", ("blue",)),
    ("Which animal says moo?", ("cow", "cows")),
    ("What is the opposite of hot?", ("cold",)),
    ("What is frozen water called?", ("ice",)),
    ("Which planet do we live on?", ("earth",)),
    ("What do bees make?", ("honey",)),
    ("What is the capital of Italy?", ("rome",)),
    ("How many legs does a spider have?", ("eight", "8")),
]

# (index of the prompt, sampled tokens) -> reward
Reward = Callable[[int, list[int]], float]


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """Each sample's reward minus its group's mean (GRPO-style, without the std division,
    which explodes on groups that are almost all equal)."""
    mean = statistics.fmean(rewards)
    return [r - mean for r in rewards]


def rl_loop(
    training_client: tinker.TrainingClient,
    prompts: Sequence[list[int]],
    reward: Reward,
    *,
    steps: int,
    group_size: int,
    max_tokens: int,
    learning_rate: float,
    stop: list[int] | None = None,
    temperature: float = 1.0,
    on_step: Callable[[int, float], None] | None = None,
    seed: int | None = None,
) -> list[float]:
    """Run ``steps`` on-policy steps over all ``prompts``; returns the mean reward of each
    step's samples (taken before that step's update). A ``seed`` makes the draws, and so
    the whole run, reproducible."""
    history = []
    for step in range(steps):
        params = types.SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            seed=None if seed is None else seed + step,
        )
        sampler = training_client.save_weights_and_get_sampling_client().result()
        futures = [
            sampler.sample(types.ModelInput.from_ints(p), group_size, params) for p in prompts
        ]
        data: list[types.Datum] = []
        rewards_all: list[float] = []
        for index, (prompt, future) in enumerate(zip(prompts, futures, strict=True)):
            sequences = future.result().sequences
            rewards = [reward(index, list(s.tokens)) for s in sequences]
            rewards_all += rewards
            for seq, advantage in zip(sequences, group_advantages(rewards), strict=True):
                if advantage == 0 or not seq.tokens:
                    continue  # no learning signal
                tokens = prompt + list(seq.tokens)
                n_prompt = len(prompt) - 1
                data.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={
                            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
                            "logprobs": types.TensorData(
                                data=[0.0] * n_prompt + list(seq.logprobs or []), dtype="float32"
                            ),
                            "advantages": types.TensorData(
                                data=[0.0] * n_prompt + [advantage] * len(seq.tokens),
                                dtype="float32",
                            ),
                        },
                    )
                )
        mean_reward = statistics.fmean(rewards_all)
        history.append(mean_reward)
        if on_step is not None:
            on_step(step, mean_reward)
        if data:
            update = training_client.forward_backward(data, "importance_sampling")
            step_done = training_client.optim_step(types.AdamParams(learning_rate=learning_rate))
            update.result()
            step_done.result()
    return history


def concise_answer_reward(
    decode: Callable[[list[int]], str], answers: Sequence[Sequence[str]], end_of_turn: int
) -> Reward:
    """1 / (words in the answer) if the answer to prompt ``i`` contains one of
    ``answers[i]`` and the model ended its turn, else 0: the right word alone scores 1."""

    def reward(index: int, tokens: list[int]) -> float:
        if not tokens or tokens[-1] != end_of_turn:
            return 0.0
        words = re.findall(r"[a-z0-9']+", decode(tokens[:-1]).lower())
        if not any(answer in words for answer in answers[index]):
            return 0.0
        return 1.0 / len(words)

    return reward


def main(argv: Sequence[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description="Teach right one-word answers by RL.")
    parser.add_argument("--model", default=MODEL_NAME)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    service_client = tinker.ServiceClient()
    training_client = service_client.create_lora_training_client(
        base_model=args.model, rank=16, seed=0
    ).result()
    tokenizer = training_client.get_tokenizer()
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for q, _ in QUESTIONS
    ]
    end_of_turn = tokenizer.eos_token_id
    history = rl_loop(
        training_client,
        prompts,
        concise_answer_reward(
            lambda t: str(tokenizer.decode(t)), [a for _, a in QUESTIONS], end_of_turn
        ),
        steps=args.steps,
        group_size=args.group_size,
        max_tokens=args.max_tokens,
        learning_rate=args.learning_rate,
        stop=[end_of_turn],
        on_step=lambda step, r: print(f"step {step + 1:2d}  mean reward {r:.3f}", flush=True),
    )
    sampler = training_client.save_weights_and_get_sampling_client().result()
    greedy = types.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=[end_of_turn])
    for (question, _), prompt in zip(QUESTIONS, prompts, strict=True):
        answer = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy).result()
        text = tokenizer.decode(answer.sequences[0].tokens, skip_special_tokens=True)
        print(f"{question} -> {text!r}")
    return history


if __name__ == "__main__":
    main()
