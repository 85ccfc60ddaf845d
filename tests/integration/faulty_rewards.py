"""Reward functions that misbehave on purpose, for the reliability tests (loaded by path)."""

from __future__ import annotations


def raises_on_third(prompts: list[str], completions: list[str], **_) -> list[float]:
    if len(completions) > 2:
        raise ZeroDivisionError("a bug in a user's reward")
    return [0.0] * len(completions)


def nan_on_second(prompts: list[str], completions: list[str], **_) -> list[float]:
    return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]
