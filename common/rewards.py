"""Reward functions: the built-ins, plug-ins named by `module:function`, and their weighted sum.

A reward function is batched like TRL's reward_funcs:
`fn(prompts, completions, **columns) -> list[float | None]`, where `columns` are the dataset's
other columns (each a list aligned with `prompts`); functions take `**kwargs` for those they
ignore, and return None for a completion they do not score.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from common.errors import RunError, one_line

RewardFn = Callable[..., list[float]]

_REGISTRY: dict[str, RewardFn] = {}


class RewardError(RunError, ValueError):
    """A reward function that cannot be found, or that misbehaved; the message is one line."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding `fn` to the built-in rewards under `name`."""
    if not name or ":" in name:
        raise RewardError(f"reward name `{name}` must be non-empty and contain no `:`")

    def add(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise RewardError(f"reward `{name}` is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def resolve(name: str) -> RewardFn:
    """A built-in reward by name, or a `package.module:function` path imported on demand."""
    if ":" not in name:
        if name in _REGISTRY:
            return _REGISTRY[name]
        raise RewardError(f"unknown reward `{name}`: built-ins are {', '.join(_REGISTRY)}; "
                          "or give a module:function path")
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise RewardError(f"reward `{name}`: expected a `package.module:function` path")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # a plug-in may fail to import for any reason; report it as config
        raise RewardError(f"reward `{name}`: cannot import module `{module_name}` "
                          f"({type(e).__name__}: {e})") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise RewardError(f"reward `{name}`: `{getattr(obj, '__name__', obj)}` has no "
                              f"attribute `{attr}`")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise RewardError(f"reward `{name}` is a {type(obj).__name__}, not a callable")
    return obj


class Scorer:
    """Scores completions with several reward functions combined by weights."""

    def __init__(self, names: Sequence[str], weights: Sequence[float] = ()):
        self.names = list(names)
        if not self.names:
            raise RewardError("at least one reward function is needed")
        if len(set(self.names)) != len(self.names):
            raise RewardError(f"reward functions listed more than once: {self.names}")
        self.weights = [float(w) for w in weights] if weights else [1.0] * len(self.names)
        if len(self.weights) != len(self.names):
            raise RewardError(f"{len(self.weights)} reward weights for "
                              f"{len(self.names)} reward functions")
        if not all(math.isfinite(w) for w in self.weights):
            raise RewardError(f"reward weights must be finite numbers (got {self.weights})")
        self._fns = [resolve(n) for n in self.names]

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted sum per completion, {name: that function's raw scores}). A function may
        return None for a completion it does not score (TRL's convention, for multi-task data):
        the sum is over the functions that scored it, NaN when none did."""
        columns = columns or {}
        n = len(completions)
        if len(prompts) != n:
            raise RewardError(f"{len(prompts)} prompts for {n} completions")
        for key, values in columns.items():
            if len(values) != n:
                raise RewardError(f"column `{key}` has {len(values)} values for {n} completions")
        parts = {name: _call(name, fn, prompts, completions, columns)
                 for name, fn in zip(self.names, self._fns)}
        return combine(list(parts.values()), self.weights), parts


def combine(scores: list[list[float]], weights: Sequence[float]) -> list[float]:
    """`scores[f][i]`: function f's score of completion i, NaN where it returned None. Per
    completion, the weighted sum over the functions that scored it, as TRL sums (nansum); NaN
    when none did, so the completion is left out of its group's statistics."""
    totals = []
    for column in zip(*scores):
        scored = [w * s for w, s in zip(weights, column) if not math.isnan(s)]
        totals.append(sum(scored) if scored else math.nan)
    return totals


def _call(name: str, fn: RewardFn, prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> list[float]:
    """Run one reward function and check what it returns, so bad scores never reach the loss."""
    n = len(completions)
    if n == 0:
        return []
    try:
        scores = fn(prompts, completions, **columns)
    except Exception as e:
        i, err = _first_failing_sample(fn, prompts, completions, columns)
        if err is None:
            raise RewardError(f"reward `{name}` raised {one_line(repr(e), 200)} on a batch of {n} "
                              "(no single sample fails alone)") from e
        raise RewardError(f"reward `{name}` raised {one_line(repr(err), 200)} on sample {i} "
                          f"(completion: {_snippet(completions[i])})") from err
    if not isinstance(scores, (list, tuple)):
        raise RewardError(f"reward `{name}` returned a {type(scores).__name__}, "
                          "expected a list of floats")
    if len(scores) != n:
        raise RewardError(f"reward `{name}` returned {len(scores)} scores for {n} completions")
    out = []
    for i, s in enumerate(scores):
        if s is None:  # not this function's sample to score
            out.append(math.nan)
            continue
        if not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise RewardError(f"reward `{name}` returned {one_line(repr(s), 200)} on sample {i}, "
                              f"expected a finite number or None (completion: {_snippet(completions[i])})")
        out.append(float(s))
    return out


def _first_failing_sample(fn: RewardFn, prompts: list[str], completions: list[str],
                          columns: dict[str, list]) -> tuple[int, Exception | None]:
    # A batched call cannot say which sample broke it; rerunning one at a time (only on this
    # error path) finds the first that fails alone.
    for i in range(len(completions)):
        try:
            fn(prompts[i:i + 1], completions[i:i + 1],
               **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception as e:
            return i, e
    return -1, None


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# ---- built-ins ----

LENGTH_TARGET_WORDS = 20
"""`length` rises linearly with the word count and saturates here: reachable within
rollout.max_tokens, so a tiny model can learn it quickly in tests."""

_ENDINGS = (".", "!", "?")


@functools.cache
def _vader() -> Any:
    # Imported and built on first use: building the analyzer parses the lexicon (slowish).
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@register("explicit_pos")
def explicit_pos(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """VADER compound sentiment of the completion alone, in [-1, 1]."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(c)["compound"]) for c in completions]


@register("length")
def length(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """Word count over LENGTH_TARGET_WORDS, capped at 1."""
    return [min(len(c.split()) / LENGTH_TARGET_WORDS, 1.0) for c in completions]


@register("format")
def format_(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """1 if the completion ends a sentence (`.`, `!` or `?`), else 0."""
    return [1.0 if c.strip().endswith(_ENDINGS) else 0.0 for c in completions]
