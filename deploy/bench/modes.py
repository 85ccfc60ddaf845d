"""When new weights reach the engines, three ways, on the same model, prompts and settings, with
completions of varied length (end of text allowed) and two rollout workers: synchronous
(on-policy rounds), rounds ahead (generation one step ahead, weights loaded between rounds) and
in flight (continuous generation, weights loaded between two decode steps). For each: the steady
completions/s, how busy the engines and the learner were, and how stale the trained-on tokens
were. (How soon each reaches a reward level: the time-to-reward section, on a model that learns
in seconds.)"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from common.config import Config
from deploy.bench.end_to_end import RunRecord, Runner, run_config
from deploy.bench.machine import ModelShape

log = logging.getLogger(__name__)

# (name, buffer.max_policy_lag, rollout.weight_update)
MODES = (("synchronous", 0, "between_rounds"), ("rounds ahead", 1, "between_rounds"),
         ("in flight", 1, "in_flight"))


@dataclass
class ModeResult:
    mode: str
    policy_lag: int
    weight_update: str
    steps_measured: int
    seconds_per_step: float
    completions_per_s: float
    mean_completion_tokens: float
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
    run_dir: str


@dataclass
class ModesResult:
    model: ModelShape
    config: dict[str, object]
    """What the numbers were measured with, as the report labels them."""
    modes: list[ModeResult]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(name: str, lag: int, weight_update: str, record: RunRecord, warmup: int,
              batch_size: int) -> ModeResult:
    """A run's steady state: the steps after the first `warmup`."""
    steps = record.steps
    warmup = min(warmup, len(steps) - 1)
    start = steps[warmup - 1].elapsed_s if warmup else record.first_step_start_s
    measured = steps[warmup:]
    seconds = measured[-1].elapsed_s - start
    phases = {key: _mean([s.phases[key] for s in measured]) for key in measured[0].phases}
    return ModeResult(
        mode=name, policy_lag=lag, weight_update=weight_update, steps_measured=len(measured),
        seconds_per_step=seconds / len(measured), completions_per_s=batch_size * len(measured) / seconds,
        mean_completion_tokens=sum(s.tokens for s in measured) / (batch_size * len(measured)),
        engine_busy=phases["engine_busy"], learner_busy=phases["learner_busy"],
        generate_s=_mean([s.phases["engine_busy"] * s.phases["step_s"] for s in measured]),
        train_s=phases["train_s"], sync_s=phases["sync_s"], token_lag_mean=phases["token_lag_mean"],
        mixed_version_frac=phases["mixed_version_frac"], run_dir=record.run_dir)


def run(runner: Runner, cfg: Config, model: ModelShape, warmup: int) -> ModesResult:
    """Each mode on `cfg` (which sets the model, lengths and workers), one run each."""
    results = []
    for name, lag, weight_update in MODES:
        mode_cfg = copy.deepcopy(cfg)
        mode_cfg.buffer.max_policy_lag, mode_cfg.rollout.weight_update = lag, weight_update
        record = runner.ours(mode_cfg, f"modes-{weight_update}-lag{lag}-{cfg.model.name}")
        result = summarize(name, lag, weight_update, record, warmup, cfg.grpo.batch_size)
        log.info("modes %s: %.2f completions/s, engines %.0f%% busy, learner %.0f%%, token lag %.2f",
                 name, result.completions_per_s, 100 * result.engine_busy, 100 * result.learner_busy,
                 result.token_lag_mean)
        results.append(result)
    return ModesResult(model=model, config=run_config(cfg) | {
        "workers": cfg.rollout.num_workers, "max completion tokens": cfg.rollout.max_tokens,
        "max in flight": cfg.rollout.max_in_flight, "steps": cfg.steps,
        "warm-up steps left out": warmup}, modes=results)
