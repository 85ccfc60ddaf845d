"""End to end: whole GRPO steps of this project (`python -m deploy.train`: synchronous and one
step asynchronous, each again with compiled engines) and of TRL's GRPOTrainer
(float32 and bf16) on the identical configuration, from each run's per-step records:
steady-state completions/s and tokens/s, and each step against its roofline floor, phase by
phase."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deploy.bench import flops, prompts, render, roofline
from deploy.bench.machine import ModelShape
from deploy.bench.peak import PeakResult
from deploy.bench.roofline import Phase
from deploy.bench.runs import RunOf, RunRecord, Steady, Step, run_config, steady

if TYPE_CHECKING:
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)
# Ours over TRL's GRPOTrainer in its faster dtype in completions/s, and a whole step's roofline
# floor over its time.
TARGET_VS_TRL, TARGET_SHARE = 2.5, 0.5


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
    compiled_lags: tuple[int, ...] = (0, 1)
    """Our runs again with compiled engines (rollout.compile): buffer.max_policy_lag of each."""
    steps: int = 6
    """Steps of each of our runs."""
    warmup: int = 2
    """First steps left out of the steady-state throughput (ours and TRL's)."""
    trl_steps: int = 4
    """Steps of each of TRL's runs (its steps are the slow ones: fewer than ours)."""
    trl_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """TRL's runs: float32, and bfloat16 (its `bf16=True`); the faster is the anchor."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(preset="tiny", batch=8, tokens=8, lr=3e-2, lags=(0,), compiled_lags=(), steps=2,
                   warmup=1, trl_steps=2, trl_dtypes=("bfloat16",))


@dataclass
class RunThroughput(RunOf, Steady):
    """A run's steady state (`runs.steady`) against its roofline floor and TRL's run."""

    startup_s: float
    """From the start of the run to the start of its first step."""
    floor_s_per_step: float
    """The step's roofline floor in the run's dtype (`step_phases`): no system can be faster."""
    share_of_floor: float
    """`floor_s_per_step` over `seconds_per_step`."""
    vs_trl: float
    """Completions/s over TRL's anchor run (1.0 for the anchor itself)."""
    phases: list[Phase]
    """Our synchronous run's step in phases, each against its floor (empty for the others)."""


@dataclass
class EndToEndResult:
    model: ModelShape
    config: dict[str, object]
    """What the numbers were measured with, as the report labels them."""
    mean_prompt_tokens: float
    ours: list[RunThroughput]
    """In the order they ran (synchronous first)."""
    trl: RunThroughput
    """TRL's faster run: the anchor."""
    trl_others: list[RunThroughput]
    """TRL's other runs (its other dtypes)."""


StepPhases = Callable[[str, float, list[Step]], list[Phase]]


def throughput(record: RunRecord, policy_lag: int | None, warmup: int, batch_size: int,
               step_phases: StepPhases, dtype: str, trl: RunThroughput | None = None,
               weight_update: str = "between_rounds", compiled: bool = False) -> RunThroughput:
    """The run's steady state, its floor, and its completions/s over TRL's anchor (`trl`; None
    if this is TRL's). `step_phases(dtype, mean completion tokens, steady steps)` gives the
    step's phases; the floor is their sum."""
    window, measured = steady(record, warmup, batch_size)
    phases = step_phases(dtype, window.mean_completion_tokens, measured)
    floor = sum(p.floor_s for p in phases)
    return RunThroughput(
        **vars(window), policy_lag=policy_lag, weight_update=weight_update, dtype=dtype,
        compiled=compiled,
        startup_s=record.first_step_start_s, floor_s_per_step=floor,
        share_of_floor=floor / window.seconds_per_step,
        vs_trl=1.0 if trl is None else window.completions_per_s / trl.completions_per_s,
        phases=phases if policy_lag == 0 else [])


def phases_of(shape: ModelShape, peak: PeakResult, prompts_per_step: int, group_size: int,
              prompt_len: float, micro_batches: int) -> StepPhases:
    """A GRPO step in phases: generation (prefill and decode of every completion), the learner
    (forward and backward over every sequence, AdamW) and the rest (weight sync, scoring,
    scheduling: no arithmetic floor). Measured from our steps' records where they have them
    (generation from `gen_tokens_per_s`, the learner's `train_s`); TRL's records have none."""

    def step_phases(dtype: str, completion_len: float, steps: list[Step]) -> list[Phase]:
        prompts = [round(prompt_len)] * prompts_per_step
        lengths = [[round(completion_len)] * group_size] * prompts_per_step
        mean = lambda f: sum(map(f, steps)) / len(steps) if steps and steps[0].metrics else math.nan
        # metrics.jsonl leaves out a NaN (a step whose rounds were all generated before it)
        gen_s = mean(lambda s: s.tokens / s.metrics.get("gen_tokens_per_s", math.nan))
        train_s = mean(lambda s: s.metrics["train_s"])
        step_s = mean(lambda s: s.metrics["step_s"])
        sequences = prompts_per_step * group_size
        return [
            roofline.phase("prefill + decode", dtype, gen_s,
                           flops.generation(shape, prompts, lengths) / 1e9,
                           roofline.prefill_gbytes(shape, prompts, dtype)
                           + roofline.decode_gbytes(shape, prompts, lengths, dtype), peak),
            roofline.phase("learner", dtype, train_s,
                           sequences * flops.training(shape, prompt_len, completion_len) / 1e9,
                           roofline.learner_gbytes(shape, micro_batches, dtype), peak),
            roofline.phase("the rest", dtype, step_s - gen_s - train_s, 0.0, 0.0, peak)]

    return step_phases


def run(harness: Harness, s: Settings) -> EndToEndResult:
    """Ours with each policy lag, then TRL's in each dtype, on the same configuration; ratios
    against TRL's faster run."""
    cfg = harness.config(model=s.preset, batch=s.batch, tokens=s.tokens, lr=s.lr, steps=s.steps)
    shape, g, ours_dtype = harness.shape(s.preset), cfg.grpo, harness.dtype(cfg)
    mean_prompt = prompts.mean_length(prompts.train_prompts(cfg))
    records = {(lag, compiled): harness.runner.ours(cfg, "e2e", lag, compiled=compiled)
               for compiled, lags in ((False, s.lags), (True, s.compiled_lags)) for lag in lags}
    micro_batches = -(-g.batch_size // cfg.learner.micro_batch_size)
    step_phases = phases_of(shape, harness.peak, cfg.prompts_per_step, g.group_size, mean_prompt,
                            micro_batches)
    trls = sorted((throughput(harness.runner.trl(cfg, "e2e", s.trl_steps, dtype=dtype), None,
                              s.warmup, g.batch_size, step_phases, dtype)
                   for dtype in s.trl_dtypes), key=lambda t: -t.completions_per_s)
    trl = trls[0]
    ours = [throughput(record, lag, s.warmup, g.batch_size, step_phases, ours_dtype, trl,
                       compiled=compiled)
            for (lag, compiled), record in records.items()]
    for side in [*ours, *trls]:
        log.info("end to end %s: %.2f completions/s, %.0f tokens/s, %.0f%% of its floor",
                 side.mode, side.completions_per_s, side.tokens_per_s, 100 * side.share_of_floor)
    return EndToEndResult(
        model=shape, mean_prompt_tokens=mean_prompt, ours=ours, trl=trl, trl_others=trls[1:],
        config=run_config(cfg) | {"ours in": ours_dtype,
                                  "steps (ours / TRL)": f"{s.steps} / {s.trl_steps}",
                                  "warm-up steps left out": s.warmup})


def markdown(e: EndToEndResult) -> list[str]:
    runs = [*e.ours, e.trl, *e.trl_others]
    rows = [[run.label, run.dtype, run.seconds_per_step, run.completions_per_s, run.tokens_per_s,
             f"{run.floor_s_per_step:.2f}", render.pct(run.share_of_floor), run.startup_s,
             run.steps_measured, f"{run.vs_trl:.1f}x" if run in [*e.ours, e.trl] else ""]
            for run in runs]
    header = ["run", "dtype", "s/step", "completions/s", "tokens/s", "floor s/step",
              "share of floor", "startup s", "steps measured", "vs TRL's faster"]
    lines = [*render.labelled(e.config, e.model, header, rows),
             f"TRL's faster configuration here: {e.trl.label} (the anchor of every ratio).", ""]
    for run in e.ours:
        if run.phases:
            lines += [f"{run.label}, a step in phases (means over the steady steps):", "",
                      *render.table(roofline.HEADER, roofline.rows(run.phases))]
    return lines


def targets(e: EndToEndResult) -> list[list[str]]:
    rows = []
    for run in e.ours:
        rows.append([f"end to end {run.mode}: completions/s vs TRL's faster", f">= {TARGET_VS_TRL}x",
                     f"{run.vs_trl:.1f}x", render.met(run.vs_trl >= TARGET_VS_TRL)])
        rows.append([f"end to end {run.mode}: share of the step's roofline floor",
                     f">= {render.pct(TARGET_SHARE)}", render.pct(run.share_of_floor),
                     render.met(run.share_of_floor >= TARGET_SHARE)])
    return rows


def chart(ax, e: EndToEndResult) -> None:
    runs = [*e.ours, e.trl]
    render.bars(ax, [run.label for run in runs], [run.completions_per_s for run in runs],
                [f"{run.completions_per_s:.2f} ({run.vs_trl:.1f}x)" for run in runs])
    render.titled(ax, "End to end GRPO step", "completions/s", e.config, e.model)
