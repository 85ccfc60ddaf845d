"""GRPO training job: the driver. Starts (or joins) Ray, launches the buffer, the rollout workers
and the learner, runs the loop, checkpoints, and writes the final model.

    make train                                          # the embedded default: tiny + explicit_pos
    python -m deploy.train deploy/configs/tiny.yaml --rollout.num-workers 2
    python -m deploy.train --run-dir runs/20261124-120000 --resume
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m deploy.train deploy/configs/pythia-410m.yaml
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from common import config as config_lib
from common import config_loading
from common import logs, versions
from common.config import Config, ConfigError
from common.errors import RunError
from common.spans import Spans, Trace, busy_fraction
from common.types import RunState, RunSummary
from deploy.launch import RunActors
from deploy.remote import ActorDied

if TYPE_CHECKING:
    from common.data import PromptSplits

log = logging.getLogger("grpo-ray")


def main(argv: list[str] | None = None) -> int:
    logs.console()
    cfg = None
    try:
        cfg = config_loading.from_args(sys.argv[1:] if argv is None else argv, description=__doc__)
        stop_on_sigterm(cfg)
        run(cfg, from_process_start=True)
        return 0
    except ConfigError as e:
        for line in e.problems:
            print(f"config error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if TERMINATED.is_set():  # the line was printed on arrival
            return 143  # 128 + SIGTERM, as a shell reports it
        print(interrupted(cfg), file=sys.stderr)
        return 130
    except Exception as e:  # a failure inside an actor arrives wrapped: report its cause
        cause = cause_of(e)
        if isinstance(cause, OSError) and cause.errno in DISK_REFUSED:
            hint = resume_hint(cfg)
            print(f"error: cannot write {cause.filename or 'the run directory'}: {cause.strerror}"
                  + (f"; {hint}" if hint else ""), file=sys.stderr)
            return 1
        if not isinstance(cause, RunError):
            raise  # a bug, here or in a library: its traceback is what to read
        print(f"error: {cause}", file=sys.stderr)
        return 1


# What a disk or file system says when it will not take what the run writes (a full disk, a
# read-only or immutable directory, a file where a directory should be): the run's
# surroundings, not a bug, so one line instead of a traceback.
DISK_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.EFBIG, errno.EIO}


TERMINATED = threading.Event()
"""Set when SIGTERM arrived (what `ray job stop`, Kubernetes and most schedulers send first)."""


def stop_on_sigterm(cfg: Config) -> None:
    """Make SIGTERM stop the run as Ctrl-C does: a KeyboardInterrupt at the same points, through
    the same clean-up (Ray's calls re-raise one of their own, so the signal is remembered here).
    Called again once Ray is up: ray.init installs a failure-signal handler for SIGTERM in the
    driver that aborts it with a C++ stack dump (absl's FailureSignalHandler, "*** SIGTERM
    received ***"). The line saying how to continue is printed on arrival: `ray job stop` kills
    the driver 3 s later (RAY_JOB_STOP_WAIT_TIME_S, ray/dashboard/modules/job/job_supervisor.py),
    maybe before the clean-up is done."""
    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; the clean-up runs once
        TERMINATED.set()
        print(interrupted(cfg), file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)


def interrupted(cfg: Config | None) -> str:
    """The line an interrupted run ends with: how to continue, if a checkpoint exists."""
    hint = resume_hint(cfg)
    if hint:
        return f"interrupted: {hint}"
    return f"interrupted before the first checkpoint: nothing to resume{f' in {cfg.run_dir}' if cfg and cfg.run_dir else ''}"


def resume_hint(cfg: Config | None) -> str:
    """How to continue the run from its last checkpoint; empty when it has none."""
    from learner import checkpoint

    if cfg is None or not cfg.run_dir:
        return ""
    try:
        saved = checkpoint.complete(cfg.run_dir)
    except OSError:
        return ""
    if not saved:
        return ""
    return (f"continue from the last checkpoint (step {checkpoint.step_of(saved[-1])}) "
            f"with --resume --run-dir {cfg.run_dir}")


def cause_of(e: BaseException) -> BaseException:
    """What an actor raised, out of the task errors Ray wraps it in."""
    import ray

    while isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
        e = e.cause
    return e


RUNS_ENV = "GRPO_RAY_RUNS"


def default_run_dir() -> Path:
    """`runs/<date>-<time>` under the working directory; under `ray job submit`, whose working
    directory is deleted with the job, `<date>-<time>-<job id>` under $GRPO_RAY_RUNS (default
    `~/grpo-ray/runs`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job = ray_job_id()
    if job is None:
        return Path("runs") / stamp
    return Path(os.environ.get(RUNS_ENV) or "~/grpo-ray/runs").expanduser() / f"{stamp}-{job}"


def ray_job_id() -> str | None:
    """The submission id when this process is a job's driver (`ray job submit`), else None."""
    # Ray's job supervisor hands its driver the job's config in this variable
    # (ray/dashboard/modules/job/job_supervisor.py, JobSupervisor._get_driver_env_vars).
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return job_config.get("metadata", {}).get("job_submission_id")


def prepare_run_dir(cfg: Config) -> Path:
    from learner import checkpoint

    run_dir = Path(cfg.run_dir or default_run_dir()).resolve()
    cfg.run_dir = str(run_dir)  # absolute: the actors' working directories may differ
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--run-dir {run_dir} is a file, not a directory")
    if cfg.resume:
        checkpoint.latest(run_dir)  # fail now, with the reason, not after starting the cluster
    elif checkpoint.complete(run_dir):
        raise ConfigError([f"{run_dir} already holds a run: pass --resume to continue it, or "
                           "choose another --run-dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / config_loading.SAVED_CONFIG).write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
    return run_dir


def finished(run_dir: Path, steps: int) -> bool:
    """Whether the run in `run_dir` has done `steps` steps and written its final model."""
    from learner import checkpoint

    return (run_dir / "final").is_dir() and checkpoint.step_of(checkpoint.latest(run_dir)) >= steps



def prompts_loading(cfg: Config, spans: Spans) -> Future:
    """The prompts (`load_prompts`), on a thread of their own while Ray and the actors start:
    none needs the others, and each takes seconds (bad data stops the run once the actors are
    placed, and they are shut down)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="prompts", initializer=yield_the_cores)
    loading = pool.submit(load_prompts, cfg, spans)
    pool.shutdown(wait=False)  # the thread finishes its one task
    return loading


def yield_the_cores() -> None:
    """The prompts' thread runs at niceness 10 (on Linux niceness is a thread's own): Ray's start
    and the actors' imports, which the first step waits for, get the cores first."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def load_prompts(cfg: Config, spans: Spans) -> tuple[object, PromptSplits]:
    """The model's tokenizer, and the train and eval prompts rendered and tokenized with it."""
    from common import data, models

    with spans.span("load prompts"):
        tokenizer = models.tokenizer_for(cfg.model.name, cfg.model.cache_dir)
        prompts = data.load_prompts(cfg.data, tokenizer)
    log.info("%d train prompts, %d eval prompts (%d over data.max_prompt_tokens, %s)",
             len(prompts.train), len(prompts.eval), prompts.overlong,
             "truncated" if cfg.data.overlong == "truncate" else "skipped")
    return tokenizer, prompts


def dtype_choice(device: str) -> str:
    """`model.dtype auto` on this machine, in words; the learner and the engines each decide it
    on their own hardware, which is this machine's unless the cluster puts them elsewhere."""
    import torch

    from common import models

    if device == "gpu" and not torch.cuda.is_available():
        return "bfloat16 on GPUs of compute capability 8.0 or more, else float32 (decided on each GPU)"
    dtype, why = models.auto_dtype(device)
    mixed = " (mixed precision: float32 master weights)" if dtype != torch.float32 else ""
    return f"{str(dtype).removeprefix('torch.')}{mixed}: {why}"


def log_choices(cfg: Config) -> None:
    """What the run decided for itself (device, dtype), and what it warns of."""
    from common import models
    from learner.grpo import loss_notes

    detected = models.detect_device()
    log.info("device: %s (%s)", cfg.cluster.device,
             models.why_device(detected) if detected == cfg.cluster.device else "cluster.device")
    if cfg.model.dtype == "auto":
        log.info("model.dtype auto: %s", dtype_choice(cfg.cluster.device))
    mismatch = versions.vllm_mismatch()
    if mismatch:
        log.warning(mismatch)
    for note in loss_notes(cfg.grpo):
        log.warning(note)


def run(cfg: Config, from_process_start: bool = False) -> RunSummary:
    """Train; everything the run writes goes under cfg.run_dir. `from_process_start`
    (`python -m deploy.train`): the run's clock, its `elapsed_s`, starts with its process, the
    interpreter and the imports counted, as a user waits for them (and as the bench counts
    TRL's); otherwise with this call."""
    import psutil

    from deploy.launch import check_machine, cluster_address, init_ray, launch, shutdown

    started = time.perf_counter()
    if from_process_start:
        started -= time.time() - psutil.Process().create_time()
    if not cluster_address(cfg):
        check_machine(cfg)  # a Ray instance of our own: what it cannot hold is refused now
    run_dir = prepare_run_dir(cfg)
    logs.driver_file(run_dir)
    log.info("run directory: %s", run_dir)
    if cfg.resume and finished(run_dir, cfg.steps):
        log.info("the run is already complete (%d steps); its model is in %s", cfg.steps, run_dir / "final")
        return RunSummary(steps=cfg.steps, complete=True)
    spans = Spans("driver")  # the start-up's phases are the trace's first spans
    if from_process_start:
        spans.since_process_start("start process")
    # The start-up's order is the critical path's (the engines'): Ray starts before this process
    # imports torch, the actors as soon as Ray is up; the prompts load beside both, on a thread.
    loading = prompts_loading(cfg, spans)
    with spans.span("start ray"):
        init_ray(cfg)
    stop_on_sigterm(cfg)  # again: ray.init replaced the handler
    log_choices(cfg)
    log.info("starting %d rollout worker(s) and the learner (a vLLM engine takes about 10 s to "
             "start on a CPU)", cfg.rollout.num_workers)
    with spans.span("place actors"):
        actors = launch(cfg, cfg.cluster.call_timeout_s)
    log.info("run id %s (it names what the run keeps outside its run directory)", actors.run_id)
    try:
        tokenizer, prompts = loading.result()
        return Training(cfg, actors, run_dir, prompts, tokenizer, started, spans).run()
    except ActorDied as e:
        if e.at_start:
            raise
        # Rollout workers are restarted and served in the loop; the learner and the buffer
        # hold the run's state, which lives on in the last checkpoint.
        hint = resume_hint(cfg) or "there is no checkpoint yet to resume from"
        raise RunError(f"{e}; its log is in {logs.log_dir(run_dir)}; {hint}") from None
    finally:
        shutdown(actors)


class Training:
    """The driver's loop: one learner step at a time, with generation kept ahead of it, metrics,
    evaluation and checkpoints on their schedule, and the final model at the end."""

    def __init__(self, cfg: Config, actors: RunActors, run_dir: Path, prompts: PromptSplits,
                 tokenizer, started: float, spans: Spans):
        from common.data import PromptSampler
        from deploy.clients import BufferClient, LearnerClient
        from deploy.metrics import MetricsLog
        from deploy.rollouts import Rollouts
        from deploy.weight_check import WeightCheck
        from deploy.weight_push import weight_push
        from deploy.workers import RolloutWorkers

        self.cfg, self.run_dir, self.eval_prompts = cfg, run_dir, prompts.eval
        self.spans, self.trace = spans, Trace(run_dir / "trace.json")
        timeout = cfg.cluster.call_timeout_s
        self.learner = LearnerClient(actors.learner, timeout)
        self.buffer = BufferClient(actors.buffer, timeout)
        self.workers = RolloutWorkers(actors.workers, cfg)
        self.state = RunState()
        if cfg.resume:
            with spans.span("load checkpoint"):
                self.state = self.learner.load_checkpoint(cfg.run_dir)
            log.info("resumed from step %d", self.state.step)
            if self.state.buffer_counts:
                self.buffer.carry_on(self.state.buffer_counts)
        self.started = started - self.state.elapsed_s  # wall-clock counts earlier invocations too
        self.stop = min(cfg.steps, self.state.step + cfg.stop_after) if cfg.stop_after else cfg.steps
        self.constants = {"overlong_prompts": prompts.overlong}

        with spans.span("wait for engines"):  # the weight transport forms once every engine is up
            self.workers.start()
        with spans.span("weight channel"):
            self.transport = weight_push(cfg, actors, self.learner, self.workers, actors.run_id)
        dtypes = "/".join(sorted({s.dtype for s in self.transport.specs}))
        what = f"the LoRA adapter's {self.transport.nbytes / 1e6:.2g} MB" if cfg.learner.lora_rank \
            else f"{self.transport.nbytes / 1e6:.0f} MB"
        log.info("weight sync: %s (%s of %s per update, on %s); learner on node %s, workers on %s",
                 self.transport.name, what, dtypes, actors.sync_host,
                 actors.learner_node[0][:8], [node[:8] for node, _ in actors.worker_nodes])
        self.check_weights = WeightCheck(cfg, self.learner, self.workers, self.transport.specs,
                                         prompts.eval or prompts.train, tokenizer)
        position = self.state.prompts_taken
        sampler = PromptSampler(prompts.train, cfg.seed, position=self.state.step * cfg.prompts_per_step
                                if position is None else position)
        self.rollouts = Rollouts(cfg, self.workers, self.buffer, self.transport, sampler, self.state)
        self.metrics = MetricsLog(cfg, run_dir, first_step=self.state.step,
                                  checkpointed=self.state.metrics)

    def run(self) -> RunSummary:
        try:
            self.start()
            while self.state.step < self.stop:
                metrics = self.step()
                self.maybe_eval(metrics)
                self.state.metrics = metrics  # checkpointed: a resume logs it if this run does not
                self.maybe_checkpoint()  # first: a step in metrics.jsonl is one a resume keeps
                self.metrics.log(metrics)
            self.metrics.close()
        finally:
            self.transport.close()
            self.trace.add(self.spans.take())
            self.trace.write()
        return self.finish()

    def start(self) -> None:
        """Every engine starts from the learner's exact weights; the eval split is scored once."""
        with self.spans.span("first sync"):
            self.rollouts.push_weights(self.state.step)
        with self.spans.span("check weights"):
            self.check_weights(self.state.step)
        if not self.eval_prompts:
            self.metrics.note("no eval split: the eval reward is not measured (data.eval_split)")
        elif self.state.eval_before is None:
            with self.spans.span("evaluate"):
                self.state.eval_before = self.rollouts.evaluate(self.eval_prompts)
            self.metrics.note(f"eval reward before training: {self.state.eval_before:+.4f}")

    def step(self) -> dict:
        """One learner step on a batch from the buffer, then the new weights to every engine."""
        cfg, step = self.cfg, self.state.step
        start, began = time.perf_counter(), time.time()
        self.spans.step = step + 1
        self.rollouts.generate_ahead(step)
        # The batch is the first groups in prompt-stream order from this step's first round on
        # (what earlier batches took skipped), so the same groups fill it whichever arrive first.
        batch = self.buffer.batch(cfg.prompts_per_step, step, self.rollouts.round_starts[step],
                                  cfg.buffer.timeout_s)
        self.rollouts.wait(batch, idle_step=step)
        metrics = self.rollouts.wait(self.learner.train(batch, step))
        self.state.step += 1
        sync_start = time.perf_counter()
        with self.spans.span("push weights"):
            self.rollouts.push_weights(self.state.step)
        sync_s = time.perf_counter() - sync_start
        with self.spans.span("check weights"):
            agreement = self.check_weights(self.state.step)

        gen = self.rollouts.take_stats()
        gen_tokens, gen_s = sum(s.tokens for s in gen), sum(s.seconds for s in gen)
        held = self.buffer.stats()
        self.state.buffer_counts = {"produced": held["produced"] - held["size"], "consumed": held["consumed"],
                                    "dropped_stale": held["dropped_stale"],
                                    "dropped_zero_std": held["dropped_zero_std"]}
        self.state.prompts_taken = self.rollouts.prompts_taken(self.state.step)
        self.state.elapsed_s = time.perf_counter() - self.started
        return {
            **metrics, **self.constants, **agreement,
            "gen_tokens_per_s": gen_tokens / gen_s if gen_s else math.nan,
            "sync_s": sync_s, "step_s": time.perf_counter() - start, "elapsed_s": self.state.elapsed_s,
            **self.timeline(began, time.time()),
            "lost_groups": self.state.lost_groups, "worker_restarts": self.state.worker_restarts,
            "extra_groups": self.rollouts.take_extra_groups(step),
            **{f"buffer_{k}": v for k, v in held.items()},
        }

    def timeline(self, start: float, end: float) -> dict[str, float]:
        """Every actor's spans since the last step, into the trace; the share of [start, end]
        the engines spent generating and the learner training."""
        spans = [*self.spans.take(), *self.workers.take_spans(), *self.learner.take_spans(),
                 *self.buffer.take_spans()]
        self.trace.add(spans)
        return {"engine_busy": busy_fraction(spans, {"generate"}, start, end, len(self.workers)),
                "learner_busy": busy_fraction(spans, {"train"}, start, end, 1)}

    def maybe_eval(self, metrics: dict) -> None:
        every, step = self.cfg.logging.eval_every, self.state.step
        if self.eval_prompts and (step == self.cfg.steps or (every and step % every == 0)):
            with self.spans.span("evaluate"):
                metrics["eval_reward"] = self.rollouts.evaluate(self.eval_prompts)

    def maybe_checkpoint(self) -> None:
        every, step = self.cfg.learner.checkpoint_every, self.state.step
        if (every and step % every == 0) or step == self.stop:
            self.learner.save_checkpoint(self.cfg.run_dir, self.state)
            self.trace.write()

    def finish(self) -> RunSummary:
        """At the last step: the final model with its card, the reward curve, the results."""
        from deploy.metrics import plot_rewards, read_jsonl

        cfg, step = self.cfg, self.state.step
        if step < cfg.steps:
            log.info("stopped after step %d of %d (stop_after); continue with --resume", step, cfg.steps)
            return RunSummary(steps=step, complete=False)
        history = read_jsonl(self.run_dir / "metrics.jsonl")
        summary = RunSummary(steps=step, complete=True, wandb_url=self.metrics.wandb_url,
                             results=summarize(history, self.state.eval_before))
        final = self.learner.export(str(self.run_dir / "final"), summary)
        plot_rewards(history, self.run_dir / "reward_curve.png",
                     f"GRPO on {cfg.model.name}, reward {' + '.join(cfg.rollout.rewards)}",
                     eval_before=math.nan if self.state.eval_before is None else self.state.eval_before)
        for key, value in summary.results.items():
            log.info("%s: %s", key, value)
        log.info("final model: %s (load with transformers.pipeline('text-generation', model=...))", final)
        return summary


def summarize(history: list[dict], eval_before: float | None) -> dict[str, float | str]:
    """The figures a run reports: reward over the first and last fifth of its steps, the eval
    split before and after (None before: there is no eval split), the steps and the wall-clock
    time."""
    rewards = [m.get("reward", math.nan) for m in history]  # absent: no sample was scored
    fifth = max(1, len(rewards) // 5)
    evals = {"eval-split reward": "no eval split"} if eval_before is None else {
        "eval-split reward before training": round(eval_before, 4),
        "eval-split reward after training": round(history[-1]["eval_reward"], 4)}
    return {
        "mean reward, first fifth of steps": round(sum(rewards[:fifth]) / fifth, 4),
        "mean reward, last fifth of steps": round(sum(rewards[-fifth:]) / fifth, 4),
        **evals,
        "steps": len(history),
        "wall-clock seconds": round(history[-1]["elapsed_s"], 1),
    }


if __name__ == "__main__":
    sys.exit(main())
