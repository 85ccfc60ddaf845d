"""Time to reward: wall-clock seconds until a step's mean reward first reaches a threshold, ours
(synchronous and asynchronous) against TRL's GRPOTrainer on the identical configuration, both
from the start of the run (startup included) and from the start of its first step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deploy.bench import render
from deploy.bench.machine import ModelShape
from deploy.bench.runs import RunOf, RunRecord, StartupSpan, run_config

if TYPE_CHECKING:
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)
TARGET_VS_TRL = 0.5  # wall time to the threshold, ours over TRL's, startup included


@dataclass
class Settings:
    """Time to reward: seconds to a mean reward, ours vs TRL, on a model that learns in seconds."""

    preset: str = "tiny"
    """Model trained."""
    batch: int = 32
    """Completions per step."""
    tokens: int = 24
    """Completion length."""
    lr: float = 3e-2
    """Learning rate (the random-init `tiny` needs a large one)."""
    threshold: float = 0.9
    """Mean reward of one step that counts as reached."""
    steps: int = 30
    """Steps of our runs (they run them all; the first step reaching counts)."""
    trl_steps: int = 30
    """Most steps of TRL's run (it stops at the first step reaching)."""
    lags: tuple[int, ...] = (0, 1)
    """Our runs: buffer.max_policy_lag of each (0 synchronous)."""
    in_flight: bool = True
    """Also a run one step ahead with weights updated in flight."""
    trl_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """TRL's runs: float32, and bfloat16 (its `bf16=True`); the faster to the threshold is the
    anchor."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(batch=8, tokens=8, steps=2, trl_steps=2, lags=(0,), in_flight=False,
                   trl_dtypes=("bfloat16",))


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
    startup: list[StartupSpan] = field(default_factory=list)
    """Ours: its start-up's spans (runs.startup_spans)."""

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
    """TRL's faster run to the threshold: the anchor."""
    trl_others: list[TimeToRewardSide] = field(default_factory=list)
    """TRL's runs in its other dtypes."""


def first_reaching(record: RunRecord, threshold: float, policy_lag: int | None,
                   trl: TimeToRewardSide | None = None, weight_update: str = "between_rounds",
                   dtype: str = "float32") -> TimeToRewardSide:
    """The run's first step at `threshold`, and how long it took against TRL's run (`trl`; None
    if this is TRL's)."""
    startup = record.first_step_start_s
    hit = next((s for s in record.steps if s.reward >= threshold), None)
    incl = None if hit is None else hit.elapsed_s
    excl = None if hit is None else hit.elapsed_s - startup
    compared = trl is not None and trl.reached and hit is not None
    return TimeToRewardSide(
        policy_lag=policy_lag, weight_update=weight_update, dtype=dtype,
        step=None if hit is None else hit.step,
        seconds_incl_startup=incl, seconds_excl_startup=excl, startup_s=startup,
        steps_run=len(record.steps), best_reward=max(s.reward for s in record.steps),
        vs_trl_incl_startup=incl / trl.seconds_incl_startup if compared else None,
        vs_trl_excl_startup=excl / trl.seconds_excl_startup if compared else None,
        run_dir=record.run_dir, startup=record.startup)


def run(harness: Harness, s: Settings) -> TimeToRewardResult:
    """Ours with each policy lag (and one step ahead in flight), then TRL's; the first step
    reaching the threshold in each."""
    cfg = harness.config(model=s.preset, batch=s.batch, tokens=s.tokens, lr=s.lr, steps=s.steps)
    modes = [(lag, "between_rounds") for lag in s.lags]
    modes += [(1, "in_flight")] if s.in_flight else []
    records = {(lag, update): harness.runner.ours(cfg, "ttr", lag, update) for lag, update in modes}
    trls = sorted((first_reaching(harness.runner.trl(cfg, "ttr", s.trl_steps, s.threshold, dtype),
                                  s.threshold, None, dtype=dtype) for dtype in s.trl_dtypes),
                  key=lambda t: (not t.reached, t.seconds_incl_startup or 0.0))
    trl = trls[0]
    ours = [first_reaching(record, s.threshold, lag, trl, update, harness.dtype(cfg))
            for (lag, update), record in records.items()]
    for side in [*ours, *trls]:
        log.info("time to reward %s: step %s (best reward %.3f)", side.mode, side.step,
                 side.best_reward)
    return TimeToRewardResult(
        model=harness.shape(s.preset), threshold=s.threshold, ours=ours, trl=trl,
        trl_others=trls[1:],
        config=run_config(cfg) | {"reward": "+".join(cfg.rollout.rewards),
                                  "steps (ours / TRL at most)": f"{s.steps} / {s.trl_steps}"})


def markdown(t: TimeToRewardResult) -> list[str]:
    rows = []
    for side in [*t.ours, t.trl, *t.trl_others]:
        if side.reached:
            ratio = ("-" if side.vs_trl_incl_startup is None else
                     f"{side.vs_trl_incl_startup:.2f}x / {side.vs_trl_excl_startup:.2f}x")
            rows.append([side.label, side.step, side.seconds_incl_startup,
                         side.seconds_excl_startup, side.startup_s, ratio])
        else:
            missed = f"not in {side.steps_run} steps (best {side.best_reward:.3f})"
            rows.append([side.label, missed, "-", "-", side.startup_s, "-"])
    header = ["run", f"step reaching {t.threshold}", "s incl. startup", "s excl. startup",
              "startup s", "vs TRL (incl. / excl.)"]
    lines = [*render.labelled(t.config, t.model, header, rows),
             f"TRL's faster run to the threshold: {t.trl.label} (the anchor of every ratio).", ""]
    first = t.ours[0]
    if first.startup:
        lines += [f"{first.label}: its start-up in phases, from its trace (`trace.json`), by when "
                  "they began (phases of different actors overlap):", "",
                  *render.table(["actor", "phase", "begins at s", "seconds"],
                                [[s.actor, s.name, f"{s.start_s:.2f}", f"{s.seconds:.2f}"]
                                 for s in first.startup])]
    return lines


def targets(t: TimeToRewardResult) -> list[list[str]]:
    rows = [[f"time to reward {t.threshold}: {side.mode} vs TRL's faster (incl. startup)",
             f"<= {TARGET_VS_TRL:.1f}x", f"{side.vs_trl_incl_startup:.2f}x",
             render.met(side.vs_trl_incl_startup <= TARGET_VS_TRL)]
            for side in t.ours if side.vs_trl_incl_startup is not None]
    return rows + [[f"startup: {side.mode} vs TRL's faster", f"<= {t.trl.startup_s:.1f} s",
                    f"{side.startup_s:.1f} s", render.met(side.startup_s <= t.trl.startup_s)]
                   for side in t.ours[:1]]


def chart(ax, t: TimeToRewardResult) -> None:
    sides = [*t.ours, t.trl]
    render.bars(ax, [side.label for side in sides],
                [side.seconds_incl_startup if side.reached else 0.0 for side in sides],
                [f"{side.seconds_incl_startup:.0f} s (step {side.step})" if side.reached
                 else "not reached" for side in sides])
    render.titled(ax, f"Time to mean reward {t.threshold}", "seconds incl. startup", t.config,
                  t.model)
