"""Padding: the learner's step on completions whose lengths spread over a range (real completions
end where the model stops; the random-init presets never stop, so every other section's rows are
full length), with the batch's sequences in micro-batches in the batch's order and by length
(what the learner does: learner/batch.py, `micro_batches`). The in-order layout is the learner's
own with `grpo.loss_type bnpo`, the one loss whose normaliser is the micro-batch's tokens and so
keeps the batch's order; its arithmetic per token is the default loss's. No engines, no Ray."""

from __future__ import annotations

import logging
import random
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.types import Prompt, RolloutGroup
from deploy.bench import render
from deploy.bench.machine import ModelShape

if TYPE_CHECKING:
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)
TARGET_SHARE = 0.15  # padded positions the learner computes, at most


@dataclass
class Settings:
    """Padding: the learner's step on completions of spread lengths, in order and by length."""

    preset: str = "pythia-70m-shape"
    """Model trained."""
    batch: int = 64
    """Completions per learner step."""
    prompt_tokens: int = 32
    """Prompt length."""
    shortest: int = 8
    """Completion lengths spread evenly from this..."""
    longest: int = 128
    """...to this, over the batch, in random order."""
    micro_batch: int = 16
    """Sequences per micro-batch (learner.micro_batch_size)."""
    steps: int = 3
    """Timed learner steps per layout (after one warm-up step)."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(preset="tiny", batch=16, prompt_tokens=8, shortest=2, longest=16, micro_batch=4,
                   steps=1)


@dataclass
class Layout:
    name: str
    padded_share: float
    """Padded positions over all positions the forward passes compute (the step's `pad_frac`)."""
    seconds_per_step: float
    """Median over the timed steps."""


@dataclass
class PaddingResult:
    model: ModelShape
    config: dict[str, object]
    in_order: Layout
    by_length: Layout
    gain: float
    """In-order seconds over by-length seconds."""


def spread_batch(group_size: int, prompts: int, prompt_tokens: int, shortest: int, longest: int,
                 seed: int = 0) -> list[RolloutGroup]:
    """Groups of random token ids whose completion lengths spread evenly over [shortest,
    longest] across the batch, shuffled: the learner's work depends on the shapes, not the text."""
    rng = random.Random(seed)
    n = group_size * prompts
    lengths = [round(shortest + (longest - shortest) * i / max(n - 1, 1)) for i in range(n)]
    rng.shuffle(lengths)
    groups = []
    for p in range(prompts):
        ids = [[rng.randrange(50, 50000) for _ in range(lengths[p * group_size + i])]
               for i in range(group_size)]
        groups.append(RolloutGroup(
            prompt=Prompt(p, "", [rng.randrange(50, 50000) for _ in range(prompt_tokens)]),
            completions=[""] * group_size, completion_ids=ids,
            logprobs=[[-rng.uniform(5, 12) for _ in c] for c in ids],
            token_versions=[[0] * len(c) for c in ids], finish_reasons=["stop"] * group_size,
            rewards=[rng.random() for _ in ids], reward_parts={}, policy_version=0))
    return groups


def _measure(harness: Harness, s: Settings, loss_type: str, groups: list[RolloutGroup]) -> Layout:
    from learner.learner import Learner

    cfg = harness.config(model=s.preset, batch=s.batch, tokens=s.longest,
                         extra=("--learner.micro-batch-size", str(s.micro_batch),
                                "--learner.threads", str(harness.options.threads),
                                "--grpo.loss-type", loss_type))
    learner = Learner(cfg)
    learner.train(groups)  # warm-up
    steps = [learner.train(groups) for _ in range(s.steps)]
    name = "in batch order" if loss_type == "bnpo" else "by length (the learner's default)"
    return Layout(name=name, padded_share=steps[0]["pad_frac"],
                  seconds_per_step=statistics.median(m["train_s"] for m in steps))


def run(harness: Harness, s: Settings) -> PaddingResult:
    g = harness.options.group_size
    groups = spread_batch(g, s.batch // g, s.prompt_tokens, s.shortest, s.longest)
    in_order = _measure(harness, s, "bnpo", groups)
    by_length = _measure(harness, s, "dapo", groups)
    result = PaddingResult(
        model=harness.shape(s.preset), in_order=in_order, by_length=by_length,
        gain=in_order.seconds_per_step / by_length.seconds_per_step,
        config={"completions": s.batch, "G": g, "prompt tokens": s.prompt_tokens,
                "completion tokens": f"{s.shortest}..{s.longest}", "micro-batch": s.micro_batch,
                "threads": harness.options.threads, "timed steps": s.steps})
    log.info("padding: %.0f%% in order, %.0f%% by length; %.2fx faster",
             100 * in_order.padded_share, 100 * by_length.padded_share, result.gain)
    return result


def markdown(r: PaddingResult) -> list[str]:
    rows = [[x.name, render.pct(x.padded_share), x.seconds_per_step]
            for x in (r.in_order, r.by_length)]
    return [*render.labelled(r.config, r.model, ["micro-batches", "padded positions", "s/step"],
                             rows),
            f"By length, the learner's step is {r.gain:.2f}x as fast.", ""]


def targets(r: PaddingResult) -> list[list[str]]:
    return [["learner: padded positions, completions of spread lengths",
             f"<= {render.pct(TARGET_SHARE)}", render.pct(r.by_length.padded_share),
             render.met(r.by_length.padded_share <= TARGET_SHARE)]]
