"""Time to reward: wall-clock seconds until a step's mean reward first reaches a threshold, ours
(synchronous and asynchronous) against TRL's GRPOTrainer on the identical configuration, both
from the start of the run (startup included) and from the start of its first step."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.config import Config
from deploy.bench.end_to_end import (RunOf, RunRecord, Runner, run_config, run_mode,
                                     total_threads, with_lag)
from deploy.bench.machine import ModelShape

log = logging.getLogger(__name__)


@dataclass
class TimeToRewardSide(RunOf):
    """One run: the first step whose mean reward reached the threshold, if any."""

    step: int | None
    """The first step that reached the threshold; None if none did."""
    seconds_incl_startup: float | None
    """From the start of the run to the end of `step`."""
    seconds_excl_startup: float | None
    """From the start of the first step to the end of `step`."""
    startup_s: float
    steps_run: int
    best_reward: float
    """The best mean reward of a step."""
    vs_trl_incl_startup: float | None
    """`seconds_incl_startup` over TRL's; None for TRL's own or when either missed."""
    vs_trl_excl_startup: float | None
    run_dir: str

    @property
    def reached(self) -> bool:
        return self.step is not None


@dataclass
class TimeToRewardResult:
    model: ModelShape
    config: dict[str, object]
    """What the numbers were measured with, as the report labels them."""
    threshold: float
    ours: list[TimeToRewardSide]
    """In the order they ran (synchronous first)."""
    trl: TimeToRewardSide


def first_reaching(record: RunRecord, threshold: float, policy_lag: int | None,
                   trl: TimeToRewardSide | None = None,
                   weight_update: str = "between_rounds") -> TimeToRewardSide:
    """The run's first step at `threshold`, and how long it took against TRL's run (`trl`; None
    if this is TRL's)."""
    startup = record.first_step_start_s
    hit = next((s for s in record.steps if s.reward >= threshold), None)
    incl = None if hit is None else hit.elapsed_s
    excl = None if hit is None else hit.elapsed_s - startup
    compared = trl is not None and trl.reached and hit is not None
    return TimeToRewardSide(
        policy_lag=policy_lag, weight_update=weight_update, step=None if hit is None else hit.step,
        seconds_incl_startup=incl, seconds_excl_startup=excl, startup_s=startup,
        steps_run=len(record.steps), best_reward=max(s.reward for s in record.steps),
        vs_trl_incl_startup=incl / trl.seconds_incl_startup if compared else None,
        vs_trl_excl_startup=excl / trl.seconds_excl_startup if compared else None,
        run_dir=record.run_dir)


def run(runner: Runner, cfg: Config, shape: ModelShape, threshold: float, lags: tuple[int, ...],
        trl_steps: int, in_flight: bool = False) -> TimeToRewardResult:
    """Ours with each policy lag (and, with `in_flight`, one step ahead with weights updated in
    flight), then TRL's; the first step reaching `threshold` in each."""
    modes = [(lag, "between_rounds") for lag in lags] + ([(1, "in_flight")] if in_flight else [])
    records = {}
    for lag, weight_update in modes:
        run_cfg = with_lag(cfg, lag)
        run_cfg.rollout.weight_update = weight_update
        records[lag, weight_update] = runner.ours(
            run_cfg, f"ttr-ours_{run_mode(lag, weight_update)}-{cfg.model.name}")
    trl_cfg = with_lag(cfg, 0)
    trl_cfg.steps = trl_steps
    trl = first_reaching(runner.trl(trl_cfg, f"ttr-trl-{cfg.model.name}", total_threads(cfg),
                                    threshold), threshold, None)
    ours = [first_reaching(record, threshold, lag, trl, weight_update)
            for (lag, weight_update), record in records.items()]
    for side in [*ours, trl]:
        log.info("time to reward %s: %s", side.mode,
                 f"step {side.step}, {side.seconds_incl_startup:.1f} s incl. startup, "
                 f"{side.seconds_excl_startup:.1f} s excl." if side.reached else
                 f"not reached in {side.steps_run} steps (best {side.best_reward:.3f})")
    return TimeToRewardResult(
        model=shape, threshold=threshold, ours=ours, trl=trl,
        config=run_config(cfg) | {"reward": "+".join(cfg.rollout.rewards),
                                  "steps (ours / TRL at most)": f"{cfg.steps} / {trl_steps}"})
