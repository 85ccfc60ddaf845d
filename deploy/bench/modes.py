"""When new weights reach the engines, three ways, on the same model, prompts and settings, with
completions of varied length (end of text allowed) and two rollout workers: synchronous
(on-policy rounds), rounds ahead (generation one step ahead, weights loaded between rounds) and
in flight (continuous generation, weights loaded between two decode steps). For each, from the
run's own metrics: the steady completions/s, how busy the engines and the learner were, and how
stale the trained-on tokens were. (How soon each reaches a reward level: the time-to-reward
section, on a model that learns in seconds.)"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deploy.bench import render
from deploy.bench.machine import ModelShape
from deploy.bench.runs import RunRecord, Steady, run_config, steady

if TYPE_CHECKING:
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)

# (name, buffer.max_policy_lag, rollout.weight_update)
MODES = (("synchronous", 0, "between_rounds"), ("rounds ahead", 1, "between_rounds"),
         ("in flight", 1, "in_flight"))


@dataclass
class Settings:
    """Modes: synchronous, rounds ahead and in-flight weight updates side by side."""

    preset: str = "pythia-70m-shape"
    """Model trained."""
    batch: int = 16
    """Completions per step."""
    tokens: int = 128
    """Most tokens per completion (end of text allowed: lengths vary)."""
    workers: int = 2
    """Rollout workers (one CPU each)."""
    steps: int = 12
    """Steps of each mode's run."""
    warmup: int = 2
    """First steps left out of the steady state."""
    lr: float | None = None
    """Learning rate; None is the preset's."""
    modes: tuple[str, ...] = tuple(name for name, _, _ in MODES)
    """Which modes run, by name."""

    @classmethod
    def smoke(cls) -> Settings:
        # The end-to-end smoke's configuration with one worker: its synchronous run is reused;
        # rounds ahead differs from in flight by a setting only, and is left out.
        return cls(preset="tiny", batch=8, tokens=8, workers=1, steps=2, warmup=1, lr=3e-2,
                   modes=("synchronous", "in flight"))


@dataclass
class ModeResult(Steady):
    """A mode's steady state (`runs.steady`), and what its run's metrics say of those steps."""

    mode: str
    policy_lag: int
    weight_update: str
    engine_busy: float
    """Share of the steady steps' wall time the engines spent generating (per engine)."""
    learner_busy: float
    """Share the learner spent training."""
    generate_s: float
    """Engine-seconds of generation per step, per engine: engine_busy x step time."""
    train_s: float
    """Seconds of the learner's step."""
    sync_s: float
    """Seconds of the weight sync after each step (push and reload, as the driver waits)."""
    token_lag_mean: float
    """Policy versions between the learner and the tokens it trained on, on average."""
    mixed_version_frac: float
    """Share of completions whose tokens came from two policy versions."""


@dataclass
class ModesResult:
    model: ModelShape
    config: dict[str, object]
    """What the numbers were measured with, as the report labels them."""
    modes: list[ModeResult]


def summarize(name: str, lag: int, weight_update: str, record: RunRecord, warmup: int,
              batch_size: int) -> ModeResult:
    """A run's steady state, with the means of the metrics it logged for those steps."""
    window, measured = steady(record, warmup, batch_size)

    def mean(key: str) -> float:
        return sum(s.metrics[key] for s in measured) / len(measured)

    generate_s = sum(s.metrics["engine_busy"] * s.metrics["step_s"] for s in measured)
    return ModeResult(
        **vars(window), mode=name, policy_lag=lag, weight_update=weight_update,
        engine_busy=mean("engine_busy"), learner_busy=mean("learner_busy"),
        generate_s=generate_s / len(measured), train_s=mean("train_s"), sync_s=mean("sync_s"),
        token_lag_mean=mean("token_lag_mean"), mixed_version_frac=mean("mixed_version_frac"))


def run(harness: Harness, s: Settings) -> ModesResult:
    """Each mode on the same configuration, one run each."""
    cfg = harness.config(model=s.preset, batch=s.batch, tokens=s.tokens, lr=s.lr, steps=s.steps,
                         extra=("--rollout.num-workers", str(s.workers)))
    results = []
    for name, lag, update in (mode for mode in MODES if mode[0] in s.modes):
        record = harness.runner.ours(cfg, "modes", lag, update)
        result = summarize(name, lag, update, record, s.warmup, cfg.grpo.batch_size)
        log.info("modes %s: %.2f completions/s, engines %.0f%% busy, learner %.0f%%, "
                 "token lag %.2f", name, result.completions_per_s, 100 * result.engine_busy,
                 100 * result.learner_busy, result.token_lag_mean)
        results.append(result)
    return ModesResult(model=harness.shape(s.preset), modes=results, config=run_config(cfg) | {
        "workers": cfg.rollout.num_workers, "max completion tokens": cfg.rollout.max_tokens,
        "max in flight": cfg.rollout.max_in_flight, "steps": cfg.steps,
        "warm-up steps left out": s.warmup})


def markdown(m: ModesResult) -> list[str]:
    rows = [[r.mode, r.seconds_per_step, r.completions_per_s, r.mean_completion_tokens,
             render.pct(r.engine_busy), render.pct(r.learner_busy),
             f"{r.generate_s:.2f} / {r.train_s:.2f} / {r.sync_s:.2f}", f"{r.token_lag_mean:.2f}",
             render.pct(r.mixed_version_frac)] for r in m.modes]
    header = ["mode", "s/step", "completions/s", "tokens per completion", "engines busy",
              "learner busy", "generate / train / sync s per step", "token lag",
              "completions from 2 versions"]
    return render.labelled(m.config, m.model, header, rows)


def chart(ax, m: ModesResult) -> None:
    render.bars(ax, [r.mode for r in m.modes], [r.completions_per_s for r in m.modes],
                [f"{r.completions_per_s:.2f} (engines {render.pct(r.engine_busy)}, "
                 f"learner {render.pct(r.learner_busy)})" for r in m.modes])
    render.titled(ax, "Weight-update modes", "completions/s", m.config, m.model)
