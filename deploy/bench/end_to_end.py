"""End to end: whole GRPO steps of this project (`deploy.train.run`, by default synchronous and
one step asynchronous) and of TRL's GRPOTrainer on the identical configuration, from each run's
per-step records: steady-state completions/s and tokens/s, and model FLOPs/s against the peak."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deploy.bench import flops, prompts, render
from deploy.bench.machine import ModelShape
from deploy.bench.runs import RunOf, RunRecord, Steady, run_config, steady

if TYPE_CHECKING:
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)
# Ours over TRL's GRPOTrainer in completions/s, and a whole step's model FLOPs/s over the peak.
TARGET_VS_TRL, TARGET_FRACTION = 10.0, 0.5


@dataclass
class Settings:
    """End to end: a GRPO step, ours (sync and async) vs TRL's GRPOTrainer."""

    preset: str = "pythia-70m-shape"
    """Model trained."""
    batch: int = 16
    """Completions per GRPO step."""
    tokens: int = 64
    """Completion length."""
    lr: float | None = None
    """Learning rate; None is the preset's default."""
    lags: tuple[int, ...] = (0, 1)
    """Our runs: buffer.max_policy_lag of each (0 synchronous, 1 asynchronous)."""
    steps: int = 6
    """Steps of each of our runs."""
    warmup: int = 2
    """First steps left out of the steady-state throughput (ours and TRL's)."""
    trl_steps: int = 4
    """Steps of TRL's run (its steps are the slow ones: fewer than ours)."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(preset="tiny", batch=8, tokens=8, lr=3e-2, lags=(0,), steps=2, warmup=1,
                   trl_steps=2)


@dataclass
class RunThroughput(RunOf, Steady):
    """A run's steady state (`runs.steady`) against the matmul peak and TRL's run."""

    startup_s: float
    """From the start of the run to the start of its first step."""
    model_gflops_per_step: float
    floor_s_per_step: float
    """The step's model FLOPs at the measured matmul peak: no system can be faster."""
    fraction_of_peak: float
    """`floor_s_per_step` over `seconds_per_step`."""
    vs_trl: float
    """Completions/s over TRL's run (1.0 for TRL's own)."""


@dataclass
class EndToEndResult:
    model: ModelShape
    config: dict[str, object]
    """What the numbers were measured with, as the report labels them."""
    mean_prompt_tokens: float
    ours: list[RunThroughput]
    """In the order they ran (synchronous first)."""
    trl: RunThroughput


def throughput(record: RunRecord, policy_lag: int | None, warmup: int, batch_size: int,
               step_gflops: Callable[[float], float], peak_gflops: float,
               trl: RunThroughput | None = None) -> RunThroughput:
    """The run's steady state, its model FLOPs/s against the peak, and its completions/s over
    TRL's run (`trl`; None if this is TRL's). `step_gflops` gives a step's model GFLOPs from its
    mean completion length."""
    window, _ = steady(record, warmup, batch_size)
    gflops = step_gflops(window.mean_completion_tokens)
    floor = gflops / peak_gflops
    return RunThroughput(
        **vars(window), policy_lag=policy_lag, startup_s=record.first_step_start_s,
        model_gflops_per_step=gflops, floor_s_per_step=floor,
        fraction_of_peak=floor / window.seconds_per_step,
        vs_trl=1.0 if trl is None else window.completions_per_s / trl.completions_per_s)


def run(harness: Harness, s: Settings) -> EndToEndResult:
    """Ours with each policy lag, then TRL's, on the same configuration; ratios against TRL."""
    cfg = harness.config(model=s.preset, batch=s.batch, tokens=s.tokens, lr=s.lr, steps=s.steps)
    shape, peak, g = harness.shape(s.preset), harness.peak_gflops, cfg.grpo
    mean_prompt = prompts.mean_length(prompts.train_prompts(cfg))
    records = {lag: harness.runner.ours(cfg, "e2e", lag) for lag in s.lags}
    trl_record = harness.runner.trl(cfg, "e2e", s.trl_steps)

    def step_gflops(completion_tokens: float) -> float:
        return flops.grpo_step(shape, cfg.prompts_per_step, g.group_size, mean_prompt,
                               completion_tokens) / 1e9

    trl = throughput(trl_record, None, s.warmup, g.batch_size, step_gflops, peak)
    ours = [throughput(record, lag, s.warmup, g.batch_size, step_gflops, peak, trl)
            for lag, record in records.items()]
    for side in [*ours, trl]:
        log.info("end to end %s: %.2f completions/s, %.0f tokens/s, %.0f%% of peak", side.mode,
                 side.completions_per_s, side.tokens_per_s, 100 * side.fraction_of_peak)
    return EndToEndResult(
        model=shape, mean_prompt_tokens=mean_prompt, ours=ours, trl=trl,
        config=run_config(cfg) | {"steps (ours / TRL)": f"{s.steps} / {s.trl_steps}",
                                  "warm-up steps left out": s.warmup})


def markdown(e: EndToEndResult) -> list[str]:
    rows = [[run.label, run.seconds_per_step, run.completions_per_s, run.tokens_per_s,
             render.pct(run.fraction_of_peak), run.startup_s, run.steps_measured,
             f"{run.vs_trl:.1f}x"] for run in [*e.ours, e.trl]]
    header = ["run", "s/step", "completions/s", "tokens/s", "model FLOPs vs peak", "startup s",
              "steps measured", "vs TRL"]
    return [*render.labelled(e.config, e.model, header, rows),
            f"The step's arithmetic floor at the measured peak: {e.trl.floor_s_per_step:.2f} s.",
            ""]


def targets(e: EndToEndResult) -> list[list[str]]:
    rows = []
    for run in e.ours:
        rows.append([f"end to end {run.mode}: completions/s vs TRL", f">= {TARGET_VS_TRL:.0f}x",
                     f"{run.vs_trl:.1f}x", render.met(run.vs_trl >= TARGET_VS_TRL)])
        rows.append([f"end to end {run.mode}: model FLOPs/s vs peak",
                     f">= {render.pct(TARGET_FRACTION)}", render.pct(run.fraction_of_peak),
                     render.met(run.fraction_of_peak >= TARGET_FRACTION)])
    return rows


def chart(ax, e: EndToEndResult) -> None:
    runs = [*e.ours, e.trl]
    render.bars(ax, [run.label for run in runs], [run.completions_per_s for run in runs],
                [f"{run.completions_per_s:.2f} ({run.vs_trl:.1f}x)" for run in runs])
    render.titled(ax, "End to end GRPO step", "completions/s", e.config, e.model)
