"""End to end: whole GRPO steps of this project (`deploy.train.run`, by default synchronous and
one step asynchronous) and of TRL's GRPOTrainer on the identical configuration, from each run's
per-step wall-clock times: steady-state completions/s and tokens/s, and model FLOPs/s against
the peak.

Both kinds of run are recorded the same way: `first_step_start_s` (seconds from the start of the
run to the start of step 1: Ray, actors and their imports, model load and engine start for ours;
the process with its imports, model load and trainer set-up for TRL's) and, per step,
`elapsed_s` at its end, its mean `reward` and completion `tokens`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import config as config_lib
from common import models
from common.config import Config
from deploy.bench import flops, prompts
from deploy.bench.machine import ModelShape

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Step:
    step: int
    elapsed_s: float
    """Seconds from the start of the run to the end of this step."""
    reward: float
    """Mean reward of the step's completions."""
    tokens: float
    """Completion tokens the step trained on."""
    phases: dict[str, float] | None = None
    """Ours: what the step's metrics say of where its time went and of staleness (step_s,
    train_s, sync_s, engine_busy, learner_busy, token_lag_mean, mixed_version_frac)."""


@dataclass
class RunRecord:
    """A finished training run, ours or TRL's, as the sections read it."""

    run_dir: str
    first_step_start_s: float
    """From the start of the run to the start of step 1: its startup."""
    steps: list[Step]
    stop_at: float | None = None
    """The reward TRL's run stopped at (None: it ran all its steps; always None for ours)."""


PHASES = ("step_s", "train_s", "sync_s", "engine_busy", "learner_busy", "token_lag_mean",
          "mixed_version_frac")


def run_mode(policy_lag: int | None, weight_update: str = "between_rounds") -> str:
    """A run in a word: sync, async (one step of lag), lagN, in_flight, or trl."""
    if policy_lag is None:
        return "trl"
    if weight_update == "in_flight":
        return "in_flight" if policy_lag == 1 else f"in_flight_lag{policy_lag}"
    return {0: "sync", 1: "async"}.get(policy_lag, f"lag{policy_lag}")


def run_label(policy_lag: int | None, weight_update: str = "between_rounds") -> str:
    """A run as tables and charts name it."""
    if policy_lag is None:
        return "TRL GRPOTrainer"
    if policy_lag == 0:
        return "ours, synchronous"
    steps = f"{policy_lag} step{'s' if policy_lag > 1 else ''}"
    return f"ours, in flight, {steps}" if weight_update == "in_flight" else f"ours, {steps} async"


@dataclass
class RunOf:
    """Whose run a result is of: ours with some policy lag, or TRL's."""

    policy_lag: int | None
    """Our run's buffer.max_policy_lag (0 synchronous); None for TRL's GRPOTrainer."""
    weight_update: str = field(default="between_rounds", kw_only=True)
    """Our run's rollout.weight_update."""

    @property
    def mode(self) -> str:
        return run_mode(self.policy_lag, self.weight_update)

    @property
    def label(self) -> str:
        return run_label(self.policy_lag, self.weight_update)


@dataclass
class RunThroughput(RunOf):
    """A run's steady state: the steps after its first (warm-up) ones."""

    steps_measured: int
    seconds_per_step: float
    completions_per_s: float
    tokens_per_s: float
    mean_completion_tokens: float
    startup_s: float
    """From the start of the run to the start of its first step."""
    model_gflops_per_step: float
    floor_s_per_step: float
    """The step's model FLOPs at the measured matmul peak: no system can be faster."""
    fraction_of_peak: float
    """`floor_s_per_step` over `seconds_per_step`."""
    vs_trl: float
    """Completions/s over TRL's run (1.0 for TRL's own)."""
    run_dir: str


@dataclass
class EndToEndResult:
    model: ModelShape
    config: dict[str, object]
    """What the numbers were measured with, as the report labels them."""
    mean_prompt_tokens: float
    ours: list[RunThroughput]
    """In the order they ran (synchronous first)."""
    trl: RunThroughput


def our_config(model: str, group_size: int, batch_size: int, max_tokens: int,
               learning_rate: float | None, steps: int, lag: int, extra: list[str]) -> Config:
    """A training run with these settings (no eval split, one checkpoint at the end), plus any
    overrides in `extra` (`--section.field value` as on deploy.train's command line)."""
    argv = ["--model.name", model, "--grpo.group-size", str(group_size),
            "--grpo.batch-size", str(batch_size), "--rollout.max-tokens", str(max_tokens),
            "--steps", str(steps), "--buffer.max-policy-lag", str(lag), "--data.eval-split", "",
            "--learner.checkpoint-every", "0", "--logging.progress", "lines", *extra]
    if learning_rate is not None:
        argv += ["--learner.learning-rate", str(learning_rate)]
    return config_lib.from_args(argv)


def total_threads(cfg: Config) -> int:
    """Threads our run keeps busy at once, at most the machine's cores: TRL's single process
    gets as many. Synchronous runs alternate generation and training; async ones overlap them."""
    cores = os.cpu_count() or 1
    learner = config_lib.cpu_threads(cfg, "learner", cores)
    engines = cfg.rollout.num_workers * config_lib.cpu_threads(cfg, "rollout", cores)
    ours = max(learner, engines) if cfg.buffer.max_policy_lag == 0 else learner + engines
    return min(ours, cores)


def spec_for(cfg: Config, threads: int, output_dir: str, stop_at: float | None) -> dict:
    """TRL's side of the identical configuration (see trl_baseline.py)."""
    g, l, r = cfg.grpo, cfg.learner, cfg.rollout
    micro = l.micro_batch_size if g.batch_size % l.micro_batch_size == 0 else g.batch_size
    return {
        "model_dir": str(models.resolve(cfg.model.name, cfg.model.cache_dir)),
        "prompts": [p.text for p in prompts.train_prompts(cfg)],
        "steps": cfg.steps, "seed": cfg.seed, "threads": threads,
        "batch_size": g.batch_size, "micro_batch_size": min(micro, g.batch_size),
        "group_size": g.group_size, "max_tokens": r.max_tokens, "temperature": r.temperature,
        "top_p": r.top_p, "rewards": list(r.rewards), "reward_weights": list(r.reward_weights),
        "learning_rate": cfg.learning_rate,
        "weight_decay": l.weight_decay, "max_grad_norm": l.max_grad_norm, "beta": g.beta,
        "loss_type": g.loss_type, "epsilon": g.epsilon, "epsilon_high": g.epsilon_high,
        "scale_rewards": g.scale_rewards, "num_iterations": g.num_iterations,
        "output_dir": output_dir, "stop_at": stop_at,
    }


class Runner:
    """Runs ours and TRL's, each configuration once: a later section asking for a run already
    made (the smoke's time-to-reward, say) gets the recorded one."""

    def __init__(self, out: Path):
        self.out = out / "runs"
        self.done: dict[str, RunRecord] = {}

    def ours(self, cfg: Config, label: str) -> RunRecord:
        import ray

        from deploy.metrics import read_jsonl
        from deploy.train import run

        key = "ours " + json.dumps({**config_lib.to_dict(cfg), "run_dir": ""}, sort_keys=True,
                                   default=str)
        if key in self.done:
            return self.done[key]
        cfg = copy.deepcopy(cfg)
        run_dir = self._fresh(label)
        cfg.run_dir = str(run_dir)
        log.info("our run %s: %s, %d steps, lag %d", label, cfg.model.name, cfg.steps,
                 cfg.buffer.max_policy_lag)
        if ray.is_initialized():
            ray.shutdown()  # every run starts its own Ray, as `python -m deploy.train` does
        try:
            run(cfg)
        finally:
            ray.shutdown()
        history = read_jsonl(run_dir / "metrics.jsonl")
        first = history[0]
        record = RunRecord(
            run_dir=str(run_dir), first_step_start_s=first["elapsed_s"] - first["step_s"],
            steps=[Step(step=m["step"], elapsed_s=m["elapsed_s"], reward=m["reward"],
                        tokens=m["train_tokens"], phases={k: m[k] for k in PHASES})
                   for m in history])
        self.done[key] = record
        return record

    def trl(self, cfg: Config, label: str, threads: int,
            stop_at: float | None = None) -> RunRecord:
        key = "trl " + json.dumps({**config_lib.to_dict(cfg), "run_dir": "", "threads": threads},
                                  sort_keys=True, default=str)
        cached = self.done.get(key)
        if cached is not None and cached.stop_at in (None, stop_at):
            return cached
        run_dir = self._fresh(label)
        spec = spec_for(cfg, threads, str(run_dir / "trainer"), stop_at)
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        log.info("TRL GRPOTrainer run %s: %s, %d steps", label, cfg.model.name, cfg.steps)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        with open(run_dir / "trl.log", "w") as logfile:
            proc = subprocess.run([sys.executable, "-m", "deploy.bench.trl_baseline",
                                   str(run_dir / "spec.json"), str(run_dir / "result.json")],
                                  cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = (run_dir / "trl.log").read_text()[-2000:]
            raise RuntimeError(f"TRL baseline exited {proc.returncode}:\n{tail}")
        result = json.loads((run_dir / "result.json").read_text())
        record = RunRecord(run_dir=str(run_dir), first_step_start_s=result["first_step_start_s"],
                           steps=[Step(**step) for step in result["steps"]], stop_at=stop_at)
        shutil.rmtree(run_dir / "trainer", ignore_errors=True)
        self.done[key] = record
        return record

    def _fresh(self, label: str) -> Path:
        path = self.out / label
        shutil.rmtree(path, ignore_errors=True)  # a previous benchmark's run of the same name
        path.mkdir(parents=True)
        return path


def throughput(record: RunRecord, policy_lag: int | None, warmup: int, batch_size: int,
               step_gflops: Callable[[float], float], peak_gflops: float,
               trl: RunThroughput | None = None) -> RunThroughput:
    """The run's throughput over the steps after the first `warmup` (at least one step is kept),
    its model FLOPs/s against the peak, and its completions/s over TRL's run (`trl`; None if
    this is TRL's). `step_gflops` gives a step's model GFLOPs from its mean completion length."""
    steps = record.steps
    warmup = min(warmup, len(steps) - 1)
    start = steps[warmup - 1].elapsed_s if warmup else record.first_step_start_s
    measured = steps[warmup:]
    seconds = measured[-1].elapsed_s - start
    tokens = sum(s.tokens for s in measured)
    completions = batch_size * len(measured)
    gflops = step_gflops(tokens / completions)
    floor = gflops / peak_gflops
    seconds_per_step = seconds / len(measured)
    completions_per_s = completions / seconds
    return RunThroughput(
        policy_lag=policy_lag, steps_measured=len(measured), seconds_per_step=seconds_per_step,
        completions_per_s=completions_per_s, tokens_per_s=tokens / seconds,
        mean_completion_tokens=tokens / completions, startup_s=record.first_step_start_s,
        model_gflops_per_step=gflops, floor_s_per_step=floor,
        fraction_of_peak=floor / seconds_per_step,
        vs_trl=1.0 if trl is None else completions_per_s / trl.completions_per_s,
        run_dir=record.run_dir)


def with_lag(cfg: Config, lag: int) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.buffer.max_policy_lag = lag
    return cfg


def run_config(cfg: Config) -> dict[str, object]:
    """The settings of a training run that its results are labelled with."""
    g, l, r = cfg.grpo, cfg.learner, cfg.rollout
    return {"batch": g.batch_size, "G": g.group_size, "completion tokens": cfg.rollout.max_tokens,
            "lr": cfg.learning_rate, "beta": g.beta,
            "loss": g.loss_type, "micro batch": min(l.micro_batch_size, g.batch_size),
            "ours: learner / worker CPUs": f"{l.num_cpus:g} / {r.num_cpus:g} x {r.num_workers}",
            "TRL threads": total_threads(cfg)}


def run(runner: Runner, cfg: Config, shape: ModelShape, peak_gflops: float,
        lags: tuple[int, ...], warmup: int, trl_steps: int) -> EndToEndResult:
    """Ours with each policy lag (0 synchronous, 1 one step ahead), then TRL's, on `cfg`;
    ratios against TRL."""
    g = cfg.grpo
    mean_prompt = prompts.mean_length(prompts.train_prompts(cfg))
    records = {lag: runner.ours(with_lag(cfg, lag),
                                f"e2e-ours_{run_mode(lag)}-{cfg.model.name}") for lag in lags}
    trl_cfg = with_lag(cfg, 0)
    trl_cfg.steps = trl_steps
    trl_record = runner.trl(trl_cfg, f"e2e-trl-{cfg.model.name}", total_threads(cfg))

    def step_gflops(completion_tokens: float) -> float:
        return flops.grpo_step(shape, cfg.prompts_per_step, g.group_size, mean_prompt,
                               completion_tokens) / 1e9

    trl = throughput(trl_record, None, warmup, g.batch_size, step_gflops, peak_gflops)
    ours = [throughput(record, lag, warmup, g.batch_size, step_gflops, peak_gflops, trl)
            for lag, record in records.items()]
    for side in [*ours, trl]:
        log.info("end to end %s: %.2f completions/s, %.0f tokens/s, %.0f%% of peak", side.mode,
                 side.completions_per_s, side.tokens_per_s, 100 * side.fraction_of_peak)
    return EndToEndResult(
        model=shape, mean_prompt_tokens=mean_prompt, ours=ours, trl=trl,
        config=run_config(cfg) | {"steps (ours / TRL)": f"{cfg.steps} / {trl_steps}",
                                  "warm-up steps left out": warmup})
