"""Whole training runs, ours (`python -m deploy.train`) and TRL's GRPOTrainer (`trl_baseline.py`),
each in a process of its own, on the identical configuration, as the end-to-end, time-to-reward
and modes sections read them: the run's own per-step records, and one steady-state window over
them.

Both kinds of run are recorded the same way: `first_step_start_s` (seconds from the start of the
run's process to the start of step 1: for ours the driver's imports, Ray, the actors and their
imports, model load and engine start; for TRL's the imports, model load and trainer set-up)
and, per step, `elapsed_s` at its end, its mean `reward` and completion `tokens`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common import config as config_lib
from common import models
from common.config import Config
from deploy.bench import prompts
from deploy.bench.cluster import ClusterPool
from deploy.launch import learner_env

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
    metrics: dict = field(default_factory=dict)
    """Ours: the step's line of the run's metrics.jsonl (timings, busy fractions, staleness)."""


@dataclass
class RunRecord:
    """A finished training run, ours or TRL's, as the sections read it."""

    run_dir: str
    first_step_start_s: float
    """From the start of the run to the start of step 1: its startup."""
    steps: list[Step]
    stop_at: float | None = None
    """The reward TRL's run stopped at (None: it ran all its steps; always None for ours)."""
    startup: list[StartupSpan] = field(default_factory=list)
    """Ours: the spans of its trace before the first step, by when they started."""


@dataclass
class StartupSpan:
    actor: str
    name: str
    start_s: float
    """Seconds after the first span of the run began."""
    seconds: float


def startup_spans(trace_path: Path) -> list[StartupSpan]:
    """The spans of a run's trace.json that belong to no step (its start-up, the eval before
    training among them), in the order they started."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    rows = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    spans = [e for e in events if e["ph"] == "X" and e["args"]["step"] is None]
    first = min((e["ts"] for e in spans), default=0.0)
    return sorted((StartupSpan(rows[e["tid"]], e["name"], (e["ts"] - first) / 1e6, e["dur"] / 1e6)
                   for e in spans), key=lambda s: s.start_s)


@dataclass
class Steady:
    """A run's steady state: the steps after its first (warm-up) ones."""

    steps_measured: int
    seconds_per_step: float
    """From the end of the last warm-up step (the start of step 1 without one) to the end."""
    completions_per_s: float
    tokens_per_s: float
    mean_completion_tokens: float
    run_dir: str


def steady(record: RunRecord, warmup: int, batch_size: int) -> tuple[Steady, list[Step]]:
    """The run over the steps after the first `warmup` (the last step at least), and those steps."""
    warmup = min(warmup, len(record.steps) - 1)
    start = record.steps[warmup - 1].elapsed_s if warmup else record.first_step_start_s
    measured = record.steps[warmup:]
    seconds, tokens = measured[-1].elapsed_s - start, sum(s.tokens for s in measured)
    completions = batch_size * len(measured)
    return Steady(steps_measured=len(measured), seconds_per_step=seconds / len(measured),
                  completions_per_s=completions / seconds, tokens_per_s=tokens / seconds,
                  mean_completion_tokens=tokens / completions, run_dir=record.run_dir), measured


@dataclass
class RunOf:
    """Whose run a result is of: ours with some policy lag, or TRL's."""

    policy_lag: int | None
    """Our run's buffer.max_policy_lag (0 synchronous); None for TRL's GRPOTrainer."""
    weight_update: str = field(default="between_rounds", kw_only=True)
    """Our run's rollout.weight_update."""
    dtype: str = field(default="float32", kw_only=True)
    """What the run computes in (TRL's: float32, or bfloat16 with its `bf16=True`)."""
    compiled: bool = field(default=False, kw_only=True)
    """Our run's rollout.compile."""

    @property
    def mode(self) -> str:
        """The run in a word: sync, async (one step of lag), lagN, in_flight, or trl; `_compiled`
        after it for compiled engines."""
        lag = self.policy_lag
        if lag is None:
            return "trl" if self.dtype == "float32" else "trl_bf16"
        if self.weight_update == "in_flight":
            mode = "in_flight" if lag == 1 else f"in_flight_lag{lag}"
        else:
            mode = {0: "sync", 1: "async"}.get(lag, f"lag{lag}")
        return mode + ("_compiled" if self.compiled else "")

    @property
    def label(self) -> str:
        """The run as tables and charts name it."""
        lag = self.policy_lag
        if lag is None:
            return "TRL GRPOTrainer" + ("" if self.dtype == "float32" else ", bf16=True")
        steps = f"{lag} step{'s' if lag > 1 else ''}"
        if lag == 0:
            label = "ours, synchronous"
        elif self.weight_update == "in_flight":
            label = f"ours, in flight, {steps}"
        else:
            label = f"ours, {steps} async"
        return label + (", engines compiled" if self.compiled else "")


def total_threads(cfg: Config) -> int:
    """Threads our run keeps busy at once, at most the machine's cores: TRL's single process
    gets as many. Synchronous runs alternate generation and training; async ones overlap them."""
    cores = os.cpu_count() or 1
    learner = config_lib.cpu_threads(cfg, "learner", cores)
    engines = cfg.rollout.num_workers * config_lib.cpu_threads(cfg, "rollout", cores)
    ours = max(learner, engines) if cfg.buffer.max_policy_lag == 0 else learner + engines
    return min(ours, cores)


def run_config(cfg: Config) -> dict[str, object]:
    """The settings of a training run that its results are labelled with."""
    g, l, r = cfg.grpo, cfg.learner, cfg.rollout
    return {"batch": g.batch_size, "G": g.group_size, "completion tokens": cfg.rollout.max_tokens,
            "lr": cfg.learner.learning_rate, "beta": g.beta,
            "loss": g.loss_type, "micro batch": min(l.micro_batch_size, g.batch_size),
            "ours: learner / worker CPUs": f"{l.num_cpus:g} / {r.num_cpus:g} x {r.num_workers}",
            "TRL threads": total_threads(cfg)}


def spec_for(cfg: Config, threads: int, output_dir: str, stop_at: float | None,
             dtype: str = "float32") -> dict:
    """TRL's side of the identical configuration (see trl_baseline.py), in `dtype` (bfloat16:
    its `bf16=True`, autocast over float32 weights, as our mixed precision)."""
    g, l, r = cfg.grpo, cfg.learner, cfg.rollout
    micro = l.micro_batch_size if g.batch_size % l.micro_batch_size == 0 else g.batch_size
    return {
        "model_dir": str(models.resolve(cfg.model.name, cfg.model.cache_dir)),
        "prompts": [p.text for p in prompts.train_prompts(cfg)],
        "steps": cfg.steps, "seed": cfg.seed, "threads": threads,
        "batch_size": g.batch_size, "micro_batch_size": min(micro, g.batch_size),
        "group_size": g.group_size, "max_tokens": r.max_tokens, "temperature": r.temperature,
        "top_p": r.top_p, "rewards": list(r.rewards), "reward_weights": list(r.reward_weights),
        "learning_rate": cfg.learner.learning_rate,
        "weight_decay": l.weight_decay, "max_grad_norm": l.max_grad_norm, "beta": g.beta,
        "loss_type": g.loss_type, "epsilon": g.epsilon, "epsilon_high": g.epsilon_high,
        "scale_rewards": g.scale_rewards, "num_iterations": g.num_iterations,
        "output_dir": output_dir, "stop_at": stop_at, "bf16": dtype == "bfloat16",
    }


class Runner:
    """Runs ours and TRL's, each configuration once: a later section asking for a run already
    made (the smoke's time-to-reward, say) gets the recorded one. A run takes the whole machine,
    so the sections' shared cluster is stopped first."""

    def __init__(self, out: Path, pool: ClusterPool):
        self.out, self.pool = out, pool
        self.done: dict[str, RunRecord] = {}

    def ours(self, cfg: Config, section: str, lag: int, weight_update: str | None = None,
             compiled: bool | None = None) -> RunRecord:
        """Our run of `cfg` with this policy lag (and weight update, and compiled engines or
        not), read back from its metrics.jsonl."""
        import yaml

        from deploy.metrics import read_jsonl

        cfg = copy.deepcopy(cfg)
        cfg.buffer.max_policy_lag = lag
        cfg.rollout.weight_update = weight_update or cfg.rollout.weight_update
        cfg.rollout.compile = cfg.rollout.compile if compiled is None else compiled
        key = "ours " + _key(cfg)
        if key in self.done:
            return self.done[key]
        self.pool.shutdown()  # the run starts its own Ray
        mode = RunOf(lag, weight_update=cfg.rollout.weight_update, compiled=cfg.rollout.compile).mode
        label = f"{section}-ours_{mode}-{cfg.model.name}"
        run_dir = self._fresh(label)
        cfg.run_dir = str(run_dir)
        log.info("our run %s: %s, %d steps, lag %d", label, cfg.model.name, cfg.steps,
                 cfg.buffer.max_policy_lag)
        # As a user runs it, `python -m deploy.train`, in a process of its own: its start-up
        # counts from that process's start, the interpreter and the imports included, as TRL's
        # does (trl_baseline.py). In this process they were long done.
        run_file = self.out / f"{label}.yaml"
        run_file.write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
        log_file = self.out / f"{label}.log"
        with open(log_file, "w") as logfile:
            proc = subprocess.run([sys.executable, "-m", "deploy.train", str(run_file)], cwd=ROOT,
                                  stdout=logfile, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log_file.read_text()[-2000:]
            raise RuntimeError(f"our run {label} exited {proc.returncode}:\n{tail}")
        history = read_jsonl(run_dir / "metrics.jsonl")
        self.done[key] = RunRecord(
            run_dir=str(run_dir), first_step_start_s=history[0]["elapsed_s"] - history[0]["step_s"],
            startup=startup_spans(run_dir / "trace.json"),
            steps=[Step(step=m["step"], elapsed_s=m["elapsed_s"], reward=m.get("reward", math.nan),
                        tokens=m["train_tokens"], metrics=m) for m in history])
        return self.done[key]

    def trl(self, cfg: Config, section: str, steps: int, stop_at: float | None = None,
            dtype: str = "float32") -> RunRecord:
        """TRL's run of `cfg` for `steps` in its own process, in `dtype`, on as many threads as
        our synchronous run uses; with `stop_at`, it stops at the first step whose mean reward
        reaches it."""
        cfg = copy.deepcopy(cfg)
        cfg.buffer.max_policy_lag, cfg.steps = 0, steps
        threads, label = total_threads(cfg), f"{section}-trl_{dtype}-{cfg.model.name}"
        key = f"trl {threads} {dtype} " + _key(cfg)
        cached = self.done.get(key)
        if cached is not None and cached.stop_at in (None, stop_at):
            return cached
        self.pool.shutdown()
        run_dir = self._fresh(label)
        spec = spec_for(cfg, threads, str(run_dir / "trainer"), stop_at, dtype)
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        log.info("TRL GRPOTrainer run %s: %s, %d steps, %s", label, cfg.model.name, cfg.steps,
                 dtype)
        # Our learner's allocator settings (deploy/launch.py, LEARNER_ENV): the comparison is
        # of the two systems, not of a setting either could have.
        env = {**os.environ, **learner_env(), "OMP_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false"}
        with open(run_dir / "trl.log", "w") as logfile:
            proc = subprocess.run([sys.executable, "-m", "deploy.bench.trl_baseline",
                                   str(run_dir / "spec.json"), str(run_dir / "result.json")],
                                  cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = (run_dir / "trl.log").read_text()[-2000:]
            raise RuntimeError(f"TRL baseline exited {proc.returncode}:\n{tail}")
        result = json.loads((run_dir / "result.json").read_text())
        shutil.rmtree(run_dir / "trainer", ignore_errors=True)
        self.done[key] = RunRecord(run_dir=str(run_dir), stop_at=stop_at,
                                   first_step_start_s=result["first_step_start_s"],
                                   steps=[Step(**step) for step in result["steps"]])
        return self.done[key]

    def _fresh(self, label: str) -> Path:
        path = self.out / label
        shutil.rmtree(path, ignore_errors=True)  # a previous benchmark's run of the same name
        path.mkdir(parents=True)
        return path


def _key(cfg: Config) -> str:
    """A run's configuration apart from where it is written."""
    return json.dumps({**config_lib.to_dict(cfg), "run_dir": ""}, sort_keys=True, default=str)
