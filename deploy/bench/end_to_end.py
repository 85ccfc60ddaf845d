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
import time
from pathlib import Path

from common import config as config_lib
from common import models
from common.config import Config
from deploy.bench import flops, prompts

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


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
        self.done: dict[str, dict] = {}

    def ours(self, cfg: Config, label: str) -> dict:
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
        start = time.perf_counter()
        try:
            run(cfg)
        finally:
            ray.shutdown()
        wall = time.perf_counter() - start
        history = read_jsonl(run_dir / "metrics.jsonl")
        first = history[0]
        record = {
            "run_dir": str(run_dir), "wall_s": wall,
            "first_step_start_s": first["elapsed_s"] - first["step_s"],
            "steps": [{"step": m["step"], "elapsed_s": m["elapsed_s"], "reward": m["reward"],
                       "tokens": m["train_tokens"], "gen_tokens_per_s": m.get("gen_tokens_per_s"),
                       "train_s": m.get("train_s"), "sync_s": m.get("sync_s")} for m in history],
        }
        self.done[key] = record
        return record

    def trl(self, cfg: Config, label: str, threads: int, stop_at: float | None = None) -> dict:
        key = "trl " + json.dumps({**config_lib.to_dict(cfg), "run_dir": "", "threads": threads},
                                  sort_keys=True, default=str)
        cached = self.done.get(key)
        if cached is not None and cached["stop_at"] in (None, stop_at):
            return cached
        run_dir = self._fresh(label)
        spec = spec_for(cfg, threads, str(run_dir / "trainer"), stop_at)
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        log.info("TRL GRPOTrainer run %s: %s, %d steps", label, cfg.model.name, cfg.steps)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        with open(run_dir / "trl.log", "w") as logfile:
            proc = subprocess.run([sys.executable, "-m", "deploy.bench.trl_baseline",
                                   str(run_dir / "spec.json"), str(run_dir / "result.json")],
                                  cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = (run_dir / "trl.log").read_text()[-2000:]
            raise RuntimeError(f"TRL baseline exited {proc.returncode}:\n{tail}")
        record = json.loads((run_dir / "result.json").read_text())
        record.update(run_dir=str(run_dir), wall_s=time.perf_counter() - start, stop_at=stop_at)
        shutil.rmtree(run_dir / "trainer", ignore_errors=True)
        self.done[key] = record
        return record

    def _fresh(self, label: str) -> Path:
        path = self.out / label
        shutil.rmtree(path, ignore_errors=True)  # a previous benchmark's run of the same name
        path.mkdir(parents=True)
        return path


def steady(record: dict, warmup: int, batch_size: int) -> dict:
    """Throughput over the steps after the first `warmup` (at least one step is kept)."""
    steps = record["steps"]
    warmup = min(warmup, len(steps) - 1)
    start = steps[warmup - 1]["elapsed_s"] if warmup else record["first_step_start_s"]
    measured = steps[warmup:]
    seconds = measured[-1]["elapsed_s"] - start
    tokens = sum(s["tokens"] for s in measured)
    return {"steps_measured": len(measured), "seconds_per_step": seconds / len(measured),
            "completions_per_s": batch_size * len(measured) / seconds,
            "tokens_per_s": tokens / seconds,
            "mean_completion_tokens": tokens / (batch_size * len(measured)),
            "startup_s": record["first_step_start_s"]}


def run_name(lag: int) -> str:
    """How results name our run with `buffer.max_policy_lag` = lag."""
    return {0: "ours_sync", 1: "ours_async"}.get(lag, f"ours_lag{lag}")


def with_lag(cfg: Config, lag: int) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.buffer.max_policy_lag = lag
    return cfg


def run(runner: Runner, cfg: Config, shape: dict, peak_gflops: float, lags: tuple[int, ...],
        warmup: int, trl_steps: int) -> dict:
    """Ours with each policy lag (0 synchronous, 1 one step ahead), then TRL's, on `cfg`;
    ratios against TRL."""
    g = cfg.grpo
    mean_prompt = prompts.mean_length(prompts.train_prompts(cfg))
    out: dict = {"mean_prompt_tokens": mean_prompt}
    records = {run_name(lag): runner.ours(with_lag(cfg, lag),
                                          f"e2e-{run_name(lag)}-{cfg.model.name}")
               for lag in lags}
    trl_cfg = with_lag(cfg, 0)
    trl_cfg.steps = trl_steps
    records["trl"] = runner.trl(trl_cfg, f"e2e-trl-{cfg.model.name}", total_threads(cfg))
    for name, record in records.items():
        side = steady(record, warmup, g.batch_size)
        step_flops = flops.grpo_step(shape, cfg.prompts_per_step, g.group_size, mean_prompt,
                                     side["mean_completion_tokens"])
        side["model_gflops_per_step"] = step_flops / 1e9
        side["floor_s_per_step"] = step_flops / 1e9 / peak_gflops
        side["fraction_of_peak"] = side["floor_s_per_step"] / side["seconds_per_step"]
        side["run_dir"] = record["run_dir"]
        out[name] = side
        log.info("end to end %s: %.2f completions/s, %.0f tokens/s, %.0f%% of peak", name,
                 side["completions_per_s"], side["tokens_per_s"], 100 * side["fraction_of_peak"])
    for lag in lags:
        name = run_name(lag)
        out[f"{name}_vs_trl"] = out[name]["completions_per_s"] / out["trl"]["completions_per_s"]
    return out
