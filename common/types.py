"""Typed messages between the roles: what rollout workers produce and the learner consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Prompt:
    """One prompt, ready for an engine: its token ids after the chat template."""

    index: int
    """Position in its split, to trace a group back to its data row."""
    text: str
    """The rendered prompt (after the chat template), what the reward functions see."""
    token_ids: list[int]
    columns: dict = field(default_factory=dict)
    """The row's other dataset columns, passed to reward functions as keyword arguments."""
    raw: str | list[dict] | None = None
    """The dataset's prompt as it was, a string or chat messages: what reward functions get as
    `prompts`, as TRL gives it; None: `text`."""
    position: int = -1
    """Place in the run's prompt stream (how many prompts were taken before it); -1 outside
    the stream (evaluation, probes). A synchronous batch is chosen in this order."""


@dataclass
class RolloutGroup:
    """G completions of one prompt, scored, with everything the learner needs to train on them."""

    prompt: Prompt
    completions: list[str]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    """Behaviour log-prob of every sampled token, as the engine computed it."""
    token_versions: list[list[int]]
    """The policy version that sampled each token: with weights updated in flight, one
    completion's tokens can come from two versions."""
    finish_reasons: list[str]
    """`stop` (end of text) or `length` (hit rollout.max_tokens), per completion."""
    rewards: list[float]
    """Weighted sum of the reward functions that scored the completion; NaN if none did."""
    reward_parts: dict[str, list[float]]
    """Each reward function's own score, per completion (NaN where it returned None)."""
    policy_version: int
    """The oldest policy version that sampled any of its tokens: what its staleness is."""
    worker: int = 0
    """Index of the rollout worker that generated it."""
    model_masks: list[list[int]] | None = None
    """Multi-turn episodes: per token, 1 where the model sampled it, 0 where the environment
    wrote it (context: out of the loss, the KL and every token count; its log-prob is 0 and its
    version the turn's before it). None: every token is the model's."""
    episodes: list[Episode] | None = None
    """Multi-turn episodes: how each went; None for single-turn completions."""

    @property
    def zero_std(self) -> bool:
        """Whether the scored rewards (NaN: unscored) are all equal: every advantage is then 0,
        and the group teaches nothing."""
        return len({r for r in self.rewards if not math.isnan(r)}) <= 1

    @property
    def model_tokens(self) -> list[int]:
        """Tokens the model sampled, per completion (an episode's environment tokens left out)."""
        if self.model_masks is None:
            return [len(ids) for ids in self.completion_ids]
        return [sum(mask) for mask in self.model_masks]

    @property
    def num_tokens(self) -> int:
        """Tokens the model sampled, in all."""
        return sum(self.model_tokens)


@dataclass
class Episode:
    """How one multi-turn episode went."""

    turns: int
    """Model turns."""
    env_seconds: float
    """Seconds spent in the environment's calls."""
    tool_calls: int
    """Tool results the environment returned (its `tool` messages)."""
    error: str = ""
    """Why the environment failed, when env.on_error dropped the episode; empty otherwise."""


@dataclass
class GenerationStats:
    """Throughput of one generate call on one worker."""

    tokens: int
    """Completion tokens generated."""
    seconds: float


@dataclass
class RunState:
    """The driver's state saved with every checkpoint, so a resumed run carries on exactly."""

    step: int = 0
    """Learner steps done."""
    lost_groups: int = 0
    """Groups lost with a rollout worker that died (and generated again)."""
    worker_restarts: int = 0
    """Rollout workers Ray restarted."""
    eval_before: float | None = None
    """Eval-split reward before training; None until measured."""
    elapsed_s: float = 0.0
    """Wall-clock seconds of every invocation so far."""
    prompts_taken: int | None = None
    """Where the prompt stream stands at round `step`; None: step x prompts per step."""
    buffer_counts: dict[str, int] = field(default_factory=dict)
    """The rollout buffer's running counts at `step` (produced, consumed, dropped_stale,
    dropped_zero_std), produced less the groups it held then: a resumed run generates those
    again."""
    metrics: dict = field(default_factory=dict)
    """Step `step`'s metrics: a run stopped after the checkpoint, before their line in
    metrics.jsonl, writes the line when it resumes."""


@dataclass
class RunSummary:
    """How a run went: what `deploy.train.run` returns and what the model card reports."""

    steps: int
    """Steps done when this invocation stopped."""
    complete: bool
    """Whether the run reached its last step (else `stop_after` stopped it early)."""
    results: dict[str, float] = field(default_factory=dict)
    """Readable figures (rewards before and after, wall-clock); empty until complete."""
    wandb_url: str | None = None
