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
    cfg = None
    try:
        cfg = config_lib.from_args(sys.argv[1:] if argv is None else argv, description=__doc__)
        run(cfg)
        return 0
    except ConfigError as e:
        for line in e.problems:
            print(f"config error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f" --run-dir {cfg.run_dir}" if cfg is not None and cfg.run_dir else ""
        print(f"interrupted: continue from the last checkpoint with --resume{where}", file=sys.stderr)
        return 130
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


def run(cfg: Config) -> dict:
    """Train; returns the run's summary. Everything it writes goes under cfg.run_dir."""
    import ray

    from deploy.launch import init_ray, launch, shutdown

    started = time.perf_counter()
    run_dir = prepare_run_dir(cfg)
    prompts = data.load_prompts(cfg.data, models.tokenizer_for(cfg.model.name, cfg.model.cache_dir))
    train_prompts, eval_prompts, overlong = prompts.train, prompts.eval, prompts.overlong
    log.info("%d train prompts, %d eval prompts (%d over data.max_prompt_tokens, %s)",
             len(train_prompts), len(eval_prompts), overlong,
             "truncated" if cfg.data.overlong == "truncate" else "skipped")
    init_ray(cfg)
    log.info("starting %d rollout worker(s) and the learner (a vLLM engine takes ~25 s on a CPU)",
             cfg.rollout.num_workers)
    cluster = launch(cfg, cfg.cluster.call_timeout_s)
    try:
        return train_loop(cfg, cluster, run_dir, train_prompts, eval_prompts,
                          {"overlong_prompts": overlong}, started)
    except ray.exceptions.RayActorError as e:
        names = {cluster.learner._actor_id.hex(): "the learner",
                 cluster.buffer._actor_id.hex(): "the rollout buffer",
                 **{w._actor_id.hex(): f"rollout worker {i}" for i, w in enumerate(cluster.workers)}}
        who = names.get(e.actor_id, "an actor")
        if e.actor_init_failed:  # its constructor raised: the cause is the message, not a crash
            raise RuntimeError(f"{who} could not start: {_last_line(str(e))}") from None
        # Rollout workers are restarted and served in the loop; the learner and the buffer
        # hold the run's state, which lives on in the last checkpoint.
        raise RuntimeError(f"{who} died ({type(e).__name__}); continue from the last checkpoint "
                           f"with --resume --run-dir {run_dir}") from None
    finally:
        shutdown(cluster)


def train_loop(cfg: Config, cluster, run_dir: Path, train_prompts: list, eval_prompts: list,
               constants: dict, started: float) -> dict:
    import ray

    from deploy.launch import get
    from deploy.metrics import MetricsLog, plot_rewards, read_jsonl
    from deploy.rollouts import Rollouts
    from deploy.sync import WeightSync

    timeout, learner, buffer = cfg.cluster.call_timeout_s, cluster.learner, cluster.buffer
    state = {"step": 0, "lost_groups": 0, "worker_restarts": 0, "eval_before": None, "elapsed_s": 0.0}
    if cfg.resume:
        state = get(learner.load_checkpoint.remote(cfg.run_dir), timeout, "the learner to load the checkpoint")
        log.info("resumed from step %d", state["step"])
        started -= state["elapsed_s"]  # wall-clock counts the interrupted invocations too
    step, P = state["step"], cfg.prompts_per_step
    sync = WeightSync(cfg, cluster, run_id=uuid.uuid4().hex[:12])
    log.info("weight sync: %s (%.0f MB per update, on %s); learner on node %s, workers on %s",
             sync.transport, sync.nbytes / 1e6, cluster.sync_host, cluster.learner_node[0][:8],
             [node[:8] for node, _ in cluster.worker_nodes])
    try:
        rollouts = Rollouts(cfg, cluster, sync, PromptSampler(train_prompts, cfg.seed, position=step * P))
        rollouts.lost_groups, rollouts.restarts = state["lost_groups"], state["worker_restarts"]
        rollouts.push_weights(step)  # every engine starts from the learner's exact weights
        metrics_log = MetricsLog(cfg, run_dir, first_step=step)
        if state["eval_before"] is None:
            state["eval_before"] = rollouts.evaluate(eval_prompts)
            metrics_log.note(f"eval reward before training: {state['eval_before']:+.4f}")

        def wait(ref, what: str, learner_idle: bool):
            """ray.get with a timeout that names what it waited for, watching the workers."""
            deadline = time.monotonic() + timeout
            while not ray.wait([ref], timeout=0.5)[0]:
                rollouts.poll()
                if learner_idle:  # a dead worker can be revived (it needs the learner's weights)
                    rollouts.recover(step)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            return ray.get(ref)

        stop = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
        next_round = step
        while step < stop:
            step_start = time.perf_counter()
            # Keep generation `max_policy_lag` rounds ahead of training (0: strictly on-policy).
            while next_round <= min(step + cfg.buffer.max_policy_lag, cfg.steps - 1):
                rollouts.submit(next_round)
                next_round += 1
            batch = buffer.get.remote(P, step, cfg.buffer.timeout_s)
            wait(batch, f"a batch of {P} groups for step {step + 1}", learner_idle=True)
            metrics = wait(learner.train.remote(batch), f"learner step {step + 1}", learner_idle=False)
            step += 1
            sync_start = time.perf_counter()
            rollouts.poll()
            rollouts.recover(step)  # before the push: a broadcast needs every member alive
            rollouts.push_weights(step)
            sync_s = time.perf_counter() - sync_start

            gen = rollouts.take_stats()
            gen_tokens, gen_s = sum(s.tokens for s in gen), sum(s.seconds for s in gen)
            held = get(buffer.stats.remote(), timeout, "the buffer's counts")
            metrics.update({
                **constants,
                "gen_tokens_per_s": gen_tokens / gen_s if gen_s else math.nan,
                "sync_s": sync_s, "step_s": time.perf_counter() - step_start,
                "elapsed_s": time.perf_counter() - started,
                "lost_groups": rollouts.lost_groups, "worker_restarts": rollouts.restarts,
                **{f"buffer_{k}": v for k, v in held.items() if not k.startswith("lag")},
            })
            if step == cfg.steps or (cfg.logging.eval_every and step % cfg.logging.eval_every == 0):
                metrics["eval_reward"] = rollouts.evaluate(eval_prompts)
            metrics_log.log(metrics)

            every = cfg.learner.checkpoint_every
            if (every and step % every == 0) or step in (stop, cfg.steps):
                state = {"step": step, "lost_groups": rollouts.lost_groups,
                         "worker_restarts": rollouts.restarts, "eval_before": state["eval_before"],
                         "elapsed_s": time.perf_counter() - started}
                get(learner.save_checkpoint.remote(cfg.run_dir, state), timeout, f"checkpoint {step} to be saved")
        metrics_log.close()
    finally:
        sync.close()

    if step < cfg.steps:
        log.info("stopped after step %d of %d (stop_after); continue with --resume", step, cfg.steps)
        return {"step": step}
    history = read_jsonl(run_dir / "metrics.jsonl")
    summary = summarize(history, state["eval_before"])
    summary["wandb_url"] = metrics_log.wandb_url
    final = get(learner.export.remote(str(run_dir / "final"), summary), timeout, "the final model to be written")
    plot_rewards(history, run_dir / "reward_curve.png",
                 f"GRPO on {cfg.model.name}, reward {' + '.join(cfg.rollout.rewards)}",
                 eval_before=state["eval_before"])
    for key, value in summary["results"].items():
        log.info("%s: %s", key, value)
    log.info("final model: %s (load with transformers.pipeline('text-generation', model=...))", final)
    return summary


def _last_line(text: str) -> str:
    """The exception line at the end of a remote traceback."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


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
