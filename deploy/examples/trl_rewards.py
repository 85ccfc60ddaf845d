"""Reward functions exactly as TRL's GRPOTrainer documentation writes them, to pass unchanged:

    python -m deploy.train --rollout.rewards deploy.examples.trl_rewards:reward_len

`format_reward_func` reads completions as chat messages: it is for a dataset whose prompts are
messages (and a model with a chat template).
"""

import re


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]
