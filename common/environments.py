"""Environments for multi-turn episodes: skyrl-gym's text environments, as SkyRL runs them.

An environment is a `skyrl_gym.envs.BaseTextEnv`: `init(prompt_messages) -> (messages, info)`,
then `step(model_text) -> {observations, reward, done, metadata}` once per model turn, then
`close()`. It is built per episode by `skyrl_gym.make(id, env_config=..., extras=...)` with the
dataset row's other columns as `extras` (SkyRL's datasets carry `reward_spec` and `extra_info`
there), so an environment written for SkyRL runs here unchanged. Observations are chat
messages; `observation_ids` turns them into the tokens that follow the model's own, which are
never re-tokenized.
"""

from __future__ import annotations

import importlib
import math
import numbers
from typing import Any

from common.errors import RunError, one_line

BUILTINS = {
    "say_word": "common.builtin_envs:SayWordEnv",
    "calculator": "common.builtin_envs:CalculatorEnv",
}
"""This project's environments, registered with skyrl-gym under these ids."""


class EnvError(RunError):
    """An environment that cannot be found, raised, answered malformed or took too long."""


def resolve(name: str) -> str:
    """The skyrl-gym id of environment `name` (a registered id or `package.module:Class`,
    registered here under that name), checking it can be built."""
    import skyrl_gym

    for env_id, entry in BUILTINS.items():
        if env_id not in skyrl_gym.registry:
            skyrl_gym.register(id=env_id, entry_point=entry)
    if name in skyrl_gym.registry:
        return name
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise EnvError(f"unknown environment `{name}`: registered are "
                       f"{', '.join(sorted(skyrl_gym.registry))}; or give a package.module:Class path")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # a plug-in may fail to import for any reason
        raise EnvError(f"environment `{name}`: cannot import it ({type(e).__name__}: {e})") from e
    from skyrl_gym.envs.base_text_env import BaseTextEnv

    if not (isinstance(cls, type) and issubclass(cls, BaseTextEnv)):
        raise EnvError(f"environment `{name}` is not a skyrl_gym BaseTextEnv subclass")
    skyrl_gym.register(id=name, entry_point=cls)
    return name


def make(env_id: str, columns: dict, max_turns: int):
    """A new environment (of an id `resolve` gave) for one episode of a row with `columns`."""
    import skyrl_gym

    return skyrl_gym.make(env_id, env_config={}, extras={**columns, "max_turns": max_turns})


def checked_step(output: Any) -> tuple[list[dict], float, bool]:
    """(observations, reward, done) of what `step` returned; EnvError if it is not a
    BaseTextEnvStepOutput (a reward of None counts 0, as SkyRL sums it)."""
    if not isinstance(output, dict) or not {"observations", "reward", "done"} <= output.keys():
        raise EnvError(f"step returned {one_line(repr(output), 120)}, expected a dict with "
                       "observations, reward and done")
    observations, reward, done = output["observations"], output["reward"], output["done"]
    return checked_messages(observations, "observations"), checked_reward(reward), bool(done)


def checked_messages(messages: Any, what: str) -> list[dict]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise EnvError(f"{what} must be a list of chat messages (role and content strings), got "
                       f"{one_line(repr(messages), 120)}")
    return messages


def checked_reward(reward: Any) -> float:
    if reward is None:
        return 0.0
    if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise EnvError(f"reward must be a finite number, got {one_line(repr(reward), 60)}")
    return float(reward)


class ObservationTokens:
    """Environment messages as the tokens that follow a model turn, from the tokenizer's chat
    template: the template applied to a fixed conversation with and without the messages (and
    the cue for the next assistant turn), the difference taken after the fixed conversation's
    last end-of-text. The model's tokens before them are never re-tokenized, so its behaviour
    log-probs stay the engine's (SkyRL's and TRL's method)."""

    BASE = [{"role": "user", "content": "I am a user."},
            {"role": "assistant", "content": "I am an assistant."}]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        base = self._ids(self.BASE, cue=False)
        eos = tokenizer.eos_token_id
        self.base = base[: len(base) - base[::-1].index(eos)] if eos in base else base

    def __call__(self, messages: list[dict]) -> list[int]:
        ids = self._ids(self.BASE + messages, cue=True)
        if ids[: len(self.base)] != self.base:
            raise EnvError("the chat template renders a conversation differently once messages "
                           "follow it; environment turns cannot be appended token by token")
        return ids[len(self.base):]

    def _ids(self, messages: list[dict], cue: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=cue)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
