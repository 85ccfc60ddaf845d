"""GRPO training job: the driver. Starts (or joins) Ray, launches the buffer, the rollout workers
and the learner, runs the loop, checkpoints, and writes the final model.

    make train                                          # the embedded default: tiny + explicit_pos
    python -m deploy.train deploy/configs/tiny.yaml --rollout.num-workers 2
    python -m deploy.train --run-dir runs/20261124-120000 --resume
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m deploy.train deploy/configs/pythia-410m.yaml
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path

import yaml

from common import config as config_lib
from common import data, models
from common.config import Config, ConfigError
from common.data import DataError, PromptSampler
from common.models import ModelError
from common.rewards import RewardError
from learner.checkpoint import CheckpointError

log = logging.getLogger("grpo-ray")
ONE_LINE_ERRORS = (ConfigError, ModelError, DataError, RewardError, CheckpointError, TimeoutError)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = config_lib.parse(sys.argv[1:] if argv is None else argv, description=__doc__)
        problems = config_lib.validate(cfg)
        if problems:
            raise ConfigError(problems)
        run(cfg)
        return 0
    except ConfigError as e:
        for line in e.problems:
            print(f"config error: {line}", file=sys.stderr)
        return 2
    except Exception as e:  # a failure inside an actor arrives wrapped: report its cause
        cause = _cause(e)
        if not isinstance(cause, ONE_LINE_ERRORS + (RuntimeError,)):
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 1


def _cause(e: BaseException) -> BaseException:
    import ray

    while isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        e = e.cause
    return e


def prepare_run_dir(cfg: Config) -> Path:
    from learner import checkpoint

    run_dir = Path(cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S")).resolve()
    cfg.run_dir = str(run_dir)  # absolute: the actors' working directories may differ
    if cfg.resume:
        checkpoint.latest(run_dir)  # fail now, with the reason, not after starting the cluster
    elif checkpoint.complete(run_dir):
        raise ConfigError([f"{run_dir} already holds a run: pass --resume to continue it, or "
                           "choose another --run-dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
    return run_dir


def load_prompts(cfg: Config) -> tuple[list, list, int]:
    tokenizer = models.load_tokenizer(models.resolve(cfg.model.name, cfg.model.cache_dir))
    train, overlong = data.prepare(data.load_split(cfg.data, cfg.data.train_split), cfg.data, tokenizer)
    evals: list = []
    if cfg.data.eval_split:
        evals, skipped = data.prepare(data.load_split(cfg.data, cfg.data.eval_split), cfg.data, tokenizer)
        overlong += skipped
        evals = evals[: cfg.data.eval_prompts or None]
    return train, evals, overlong


def run(cfg: Config) -> dict:
    """Train; returns the run's summary. Everything it writes goes under cfg.run_dir."""
    import ray

    from deploy.launch import init_ray, launch
    from deploy.metrics import MetricsLog, plot_rewards, read_jsonl
    from deploy.rollouts import Rollouts
    from deploy.sync import WeightSync

    started = time.perf_counter()
    run_dir = prepare_run_dir(cfg)
    train_prompts, eval_prompts, overlong = load_prompts(cfg)
    log.info("%d train prompts, %d eval prompts (%d over data.max_prompt_tokens, %s)",
             len(train_prompts), len(eval_prompts), overlong,
             "truncated" if cfg.data.overlong == "truncate" else "skipped")

    init_ray(cfg)
    timeout = cfg.cluster.call_timeout_s
    log.info("starting %d rollout worker(s) and the learner (a vLLM engine takes ~25 s on a CPU)",
             cfg.rollout.num_workers)
    cluster = launch(cfg, timeout)
    learner = cluster.learner
    sync = None
    try:
        ray.get([w.ready.remote() for w in cluster.workers], timeout=timeout)
        state = {"step": 0, "lost_groups": 0, "worker_restarts": 0, "eval_before": None}
        if cfg.resume:
            state = ray.get(learner.load_checkpoint.remote(cfg.run_dir), timeout=timeout)
            log.info("resumed from step %d", state["step"])
        step = state["step"]
        sync = WeightSync(cfg, cluster, run_id=uuid.uuid4().hex[:12])
        log.info("weight sync: %s (%.0f MB per update)", sync.transport, sync.nbytes / 1e6)
        sync.push(step)  # every engine starts from the learner's exact weights

        P = cfg.prompts_per_step
        sampler = PromptSampler(train_prompts, cfg.seed, position=step * P)
        rollouts = Rollouts(cfg, cluster, sampler)
        rollouts.lost_groups, rollouts.restarts = state["lost_groups"], state["worker_restarts"]
        metrics_log = MetricsLog(cfg, run_dir, first_step=step)
        if state["eval_before"] is None:
            state["eval_before"] = rollouts.evaluate(eval_prompts)
            metrics_log.note(f"eval reward before training: {state['eval_before']:+.4f}")

        def wait(ref, what: str, recover_now: bool):
            """ray.get with a timeout that names what it waited for, watching the workers."""
            deadline = time.monotonic() + timeout
            while not ray.wait([ref], timeout=0.5)[0]:
                rollouts.poll()
                if recover_now:  # the learner is idle: a restarted worker can be synced now
                    rollouts.recover(lambda dead: sync.restore(dead, learner_version))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            return ray.get(ref)

        lag, stop = cfg.buffer.max_policy_lag, cfg.steps
        if cfg.stop_after:
            stop = min(stop, step + cfg.stop_after)
        next_round = step
        while step < stop:
            step_start = time.perf_counter()
            learner_version = step
            # Keep generation `max_policy_lag` rounds ahead of training (0: strictly on-policy).
            while next_round <= min(step + lag, cfg.steps - 1):
                rollouts.submit(next_round)
                next_round += 1
            batch = cluster.buffer.get.remote(P, step, cfg.buffer.timeout_s)
            wait(batch, f"a batch of {P} groups for step {step + 1}", recover_now=True)
            metrics = wait(learner.train.remote(batch), f"learner step {step + 1}", recover_now=False)
            step += 1
            learner_version = step
            rollouts.poll()
            if rollouts.lost and sync.transport == "broadcast":
                sync.connect()  # a restarted engine must rejoin: re-form the group, then push
            sync_s = sync.push(step)
            rollouts.recover(lambda dead: None)  # the push above brought them up to date

            gen = rollouts.take_stats()
            gen_tokens, gen_s = sum(s.tokens for s in gen), sum(s.seconds for s in gen)
            buffer = ray.get(cluster.buffer.stats.remote(), timeout=timeout)
            metrics.update({
                "gen_tokens_per_s": gen_tokens / gen_s if gen_s else math.nan,
                "sync_s": sync_s, "step_s": time.perf_counter() - step_start,
                "elapsed_s": time.perf_counter() - started,
                "lost_groups": rollouts.lost_groups, "worker_restarts": rollouts.restarts,
                "buffer_size": buffer["size"], "dropped_stale": buffer["dropped_stale"],
            })
            if cfg.logging.eval_every and step % cfg.logging.eval_every == 0 and step < cfg.steps:
                metrics["eval_reward"] = rollouts.evaluate(eval_prompts)
            if step == cfg.steps:
                metrics["eval_reward"] = rollouts.evaluate(eval_prompts)
            metrics_log.log(metrics)

            every = cfg.learner.checkpoint_every
            if (every and step % every == 0) or step in (stop, cfg.steps):
                state = {"step": step, "lost_groups": rollouts.lost_groups,
                         "worker_restarts": rollouts.restarts, "eval_before": state["eval_before"]}
                ray.get(learner.save_checkpoint.remote(cfg.run_dir, state), timeout=timeout)

        metrics_log.close()
        if step < cfg.steps:
            log.info("stopped after step %d of %d (stop_after); continue with --resume", step, cfg.steps)
            return {"step": step}
        history = read_jsonl(run_dir / "metrics.jsonl")
        summary = summarize(history, state["eval_before"])
        summary["wandb_url"] = metrics_log.wandb_url
        final = ray.get(learner.export.remote(str(run_dir / "final"), summary), timeout=timeout)
        plot_rewards(history, run_dir / "reward_curve.png",
                     f"GRPO on {cfg.model.name}, reward {' + '.join(cfg.rollout.rewards)}",
                     eval_before=state["eval_before"])
        for key, value in summary["results"].items():
            log.info("%s: %s", key, value)
        log.info("final model: %s (load with transformers.pipeline('text-generation', model=...))", final)
        return summary
    finally:
        if sync is not None:
            sync.close()
        ray.util.remove_placement_group(cluster.placement_group)
        for actor in [*cluster.workers, learner, cluster.buffer]:
            ray.kill(actor)


def summarize(history: list[dict], eval_before: float) -> dict:
    rewards = [m["reward"] for m in history]
    fifth = max(1, len(rewards) // 5)
    first, last = sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth
    eval_after = history[-1].get("eval_reward", math.nan)
    return {"results": {
        "mean reward, first fifth of steps": round(first, 4),
        "mean reward, last fifth of steps": round(last, 4),
        "eval-split reward before training": round(eval_before, 4),
        "eval-split reward after training": round(eval_after, 4),
        "steps": len(history),
        "wall-clock seconds": round(history[-1]["elapsed_s"], 1),
    }, "first_fifth": first, "last_fifth": last, "eval_before": eval_before, "eval_after": eval_after}


if __name__ == "__main__":
    sys.exit(main())
