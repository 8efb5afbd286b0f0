"""A complete on-policy RL loop through the SDK (sample -> reward -> group-relative
advantages -> importance_sampling step -> sample again) raises the reward."""

from __future__ import annotations

import statistics

from tests.conftest import QWEN
from treadle.demo.rl import concise_answer_reward, group_advantages, rl_loop


def test_group_advantages_are_centred_per_group():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1.0, 1.0]) == [0.0, 0.0]


def test_concise_answer_reward_pays_for_the_right_word_alone():
    end = 0
    reward = concise_answer_reward(lambda t: bytes(t).decode(), [("blue",), ("eight", "8")], end)

    def said(text: str, ended: bool = True) -> list[int]:
        return [*text.encode(), end] if ended else list(text.encode())

    assert reward(0, said("Blue.")) == 1.0
    assert reward(0, said("The sky is blue.")) == 0.25
    assert reward(0, said("SmolLM")) == 0.0  # one word, wrong: nothing
    assert reward(0, said("Blue", ended=False)) == 0.0  # cut off by max_tokens
    assert reward(1, said("8 legs")) == 0.5
    assert reward(1, said("Blue.")) == 0.0  # each prompt has its own answer


def test_rl_loop_raises_the_reward(service_client):
    """Reward: the share of sampled tokens that are ASCII letters. A random tiny model
    starts near a sixth; the policy should climb well above where it started."""
    tc = service_client.create_lora_training_client(base_model=QWEN, rank=8, seed=0).result()

    def reward(index: int, tokens: list[int]) -> float:
        return sum(chr(t).isalpha() for t in tokens if t < 128) / max(len(tokens), 1)

    prompts = [[72, 105, 33, 32], [79, 75, 46, 32], [10, 62, 32], [49, 50, 51, 32]]
    history = rl_loop(
        tc,
        prompts,
        reward,
        steps=10,
        group_size=8,
        max_tokens=8,
        learning_rate=0.02,
        stop=[],
        seed=0,  # reproducible: unseeded, a run now and then climbed too slowly
    )
    first, last = statistics.fmean(history[:3]), statistics.fmean(history[-3:])
    print("reward per step:", [round(r, 3) for r in history])
    assert last > first + 0.15, history
