"""Time to reward: wall-clock seconds until a step's mean reward first reaches a threshold, ours
(synchronous and asynchronous) against TRL's GRPOTrainer on the identical configuration, both
from the start of the run (startup included) and from the start of its first step."""

from __future__ import annotations

import logging

from common.config import Config
from deploy.bench.end_to_end import Runner, run_name, total_threads, with_lag

log = logging.getLogger(__name__)


def first_reaching(record: dict, threshold: float) -> dict:
    steps = record["steps"]
    for s in steps:
        if s["reward"] >= threshold:
            return {"reached": True, "step": s["step"], "seconds_incl_startup": s["elapsed_s"],
                    "seconds_excl_startup": s["elapsed_s"] - record["first_step_start_s"],
                    "startup_s": record["first_step_start_s"], "run_dir": record["run_dir"]}
    return {"reached": False, "steps_run": len(steps),
            "best_reward": max(s["reward"] for s in steps),
            "startup_s": record["first_step_start_s"], "run_dir": record["run_dir"]}


def run(runner: Runner, cfg: Config, threshold: float, lags: tuple[int, ...],
        trl_steps: int) -> dict:
    out: dict = {"threshold": threshold}
    for lag in lags:
        name = run_name(lag)
        record = runner.ours(with_lag(cfg, lag), f"ttr-{name}-{cfg.model.name}")
        out[name] = first_reaching(record, threshold)
    trl_cfg = with_lag(cfg, 0)
    trl_cfg.steps = trl_steps
    trl = runner.trl(trl_cfg, f"ttr-trl-{cfg.model.name}", total_threads(cfg), threshold)
    out["trl"] = first_reaching(trl, threshold)
    for name, side in list(out.items()):
        if name.startswith("ours") and side["reached"] and out["trl"]["reached"]:
            for basis in ("incl", "excl"):
                key = f"seconds_{basis}_startup"
                out[f"{name}_vs_trl_{basis}_startup"] = side[key] / out["trl"][key]
        if isinstance(side, dict):
            log.info("time to reward %s: %s", name,
                     f"step {side['step']}, {side['seconds_incl_startup']:.1f} s incl. startup, "
                     f"{side['seconds_excl_startup']:.1f} s excl." if side["reached"] else
                     f"not reached in {side['steps_run']} steps (best {side['best_reward']:.3f})")
    return out
