"""Reward functions: the built-ins, plug-ins named by `module:function`, and their weighted sum.

A reward function is one of TRL's `reward_funcs`, called as TRL's GRPOTrainer calls it:
`fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)`, returning
a list of float or None (a completion it does not score). Prompts and completions are strings,
or chat messages when the dataset's prompts are (a completion is then
`[{"role": "assistant", "content": text}]`); `columns` are the dataset's other columns, each a
list aligned with `prompts`. Functions take `**kwargs` for what they ignore, and may be `async`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from common.errors import RunError, one_line

RewardFn = Callable[..., list[float]]
MODEL_PREFIX = "model:"
"""In rollout.rewards, `model:PATH` scores with the sequence-classification model at PATH, in
actors of its own (actors/reward_model.py)."""


def is_reward_model(name: str) -> bool:
    return name.startswith(MODEL_PREFIX)


def model_rewards(rewards: Sequence[str]) -> list[str]:
    """The `model:PATH` entries of `rollout.rewards`, in order: each has its own actors."""
    return [name for name in rewards if is_reward_model(name)]


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
    """Scores completions with several reward functions combined by weights, calling each as
    TRL's GRPOTrainer does (`_calculate_rewards`): by keyword, `async` ones awaited.

    Calls run on the scorer's own thread, so scoring never holds up the caller: `async`
    functions on an event loop, as many at once as there are groups to score; plain ones one
    at a time on a second thread (a plug-in need not be thread-safe)."""

    def __init__(self, names: Sequence[str], weights: Sequence[float] = (), timeout_s: float = 120.0,
                 functions: dict[str, RewardFn] | None = None):
        """`functions` gives the function of names that `resolve` does not know (the rollout
        worker's clients of `model:PATH` reward models)."""
        from trl.trainer.utils import is_async_callable

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
        functions = functions or {}
        self._fns = [functions[n] if n in functions else resolve(n) for n in self.names]
        self._is_async = [is_async_callable(fn) for fn in self._fns]
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="rewards", daemon=True).start()
        self._plain = ThreadPoolExecutor(1, thread_name_prefix="reward")

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]] | None = None,
                 columns: dict[str, list] | None = None, step: int = 0
                 ) -> tuple[list[float], dict[str, list[float]]]:
        """`submit`, waited for."""
        return self.submit(prompts, completions, completion_ids, columns, step).result()

    def submit(self, prompts: list, completions: list, completion_ids: list[list[int]] | None = None,
               columns: dict[str, list] | None = None, step: int = 0) -> Future:
        """Score `completions` of `prompts` (strings, or chat messages as TRL gives them) with
        every function; a Future of (weighted sum per completion, {name: that function's
        scores}). `columns` are the dataset's other columns, `step` the learner steps done
        (TRL's `trainer_state.global_step`). A function may return None for a completion it
        does not score (TRL's convention, for multi-task data): the sum is over the functions
        that scored it, NaN when none did."""
        from transformers import TrainerState

        n = len(completions)
        kwargs = dict(prompts=prompts, completions=completions,
                      completion_ids=completion_ids if completion_ids is not None else [[] for _ in completions],
                      **(columns or {}))
        for key, values in kwargs.items():
            if len(values) != n:
                raise RewardError(f"`{key}` has {len(values)} values for {n} completions")
        kwargs["trainer_state"] = TrainerState(global_step=step)
        return asyncio.run_coroutine_threadsafe(self._score(kwargs), self._loop)

    async def _score(self, kwargs: dict) -> tuple[list[float], dict[str, list[float]]]:
        scores = await asyncio.gather(*(self._one(name, fn, is_async, kwargs) for name, fn, is_async
                                        in zip(self.names, self._fns, self._is_async)))
        return combine(scores, self.weights), dict(zip(self.names, scores))

    async def _one(self, name: str, fn: RewardFn, is_async: bool, kwargs: dict) -> list[float]:
        if not is_async:
            return await asyncio.get_running_loop().run_in_executor(self._plain, _call, name, fn, kwargs)
        n = len(kwargs["completions"])
        try:
            scores = await asyncio.wait_for(fn(**kwargs), self.timeout_s)
        except TimeoutError:
            raise RewardError(f"reward `{name}` took over {self.timeout_s:g} s on {n} completions "
                              "(rollout.reward_timeout_s)") from None
        except Exception as e:
            raise RewardError(f"reward `{name}` raised {one_line(repr(e), 200)} on {n} completions") from e
        return _checked(name, scores, kwargs["completions"])


def combine(scores: list[list[float]], weights: Sequence[float]) -> list[float]:
    """`scores[f][i]`: function f's score of completion i, NaN where it returned None. Per
    completion, the weighted sum over the functions that scored it, as TRL sums (nansum); NaN
    when none did, so the completion is left out of its group's statistics."""
    totals = []
    for column in zip(*scores):
        scored = [w * s for w, s in zip(weights, column) if not math.isnan(s)]
        totals.append(sum(scored) if scored else math.nan)
    return totals


def _call(name: str, fn: RewardFn, kwargs: dict) -> list[float]:
    """Run one reward function and check what it returns, so bad scores never reach the loss."""
    completions = kwargs["completions"]
    if not completions:
        return []
    try:
        scores = fn(**kwargs)
    except Exception as e:
        i, err = _first_failing_sample(fn, kwargs)
        if err is None:
            raise RewardError(f"reward `{name}` raised {one_line(repr(e), 200)} on a batch of "
                              f"{len(completions)} (no single sample fails alone)") from e
        raise RewardError(f"reward `{name}` raised {one_line(repr(err), 200)} on sample {i} "
                          f"(completion: {_snippet(completions[i])})") from err
    return _checked(name, scores, completions)


def _checked(name: str, scores: Any, completions: list) -> list[float]:
    """`scores` as floats, NaN for None; a RewardError for anything that is not one finite
    number per completion."""
    n = len(completions)
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


def _first_failing_sample(fn: RewardFn, kwargs: dict) -> tuple[int, Exception | None]:
    # A batched call cannot say which sample broke it; rerunning one at a time (only on this
    # error path) finds the first that fails alone.
    for i in range(len(kwargs["completions"])):
        try:
            fn(**{k: v if k == "trainer_state" else v[i:i + 1] for k, v in kwargs.items()})
        except Exception as e:
            return i, e
    return -1, None


def _snippet(completion: str | list[dict], limit: int = 60) -> str:
    text = text_of(completion)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def text_of(completion: str | list[dict]) -> str:
    """A completion's text: itself, or the content of its last message when it is
    conversational (TRL's `[{"role": "assistant", "content": ...}]`)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


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
def explicit_pos(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """VADER compound sentiment of the completion alone, in [-1, 1]."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(text_of(c))["compound"]) for c in completions]


@register("length")
def length(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """Word count over LENGTH_TARGET_WORDS, capped at 1."""
    return [min(len(text_of(c).split()) / LENGTH_TARGET_WORDS, 1.0) for c in completions]


@register("format")
def format_(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1 if the completion ends a sentence (`.`, `!` or `?`), else 0."""
    return [1.0 if text_of(c).strip().endswith(_ENDINGS) else 0.0 for c in completions]
