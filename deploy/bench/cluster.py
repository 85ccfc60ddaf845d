"""The Ray clusters the in-process measurements run on (generation, scaling, weight sync): at most
one at a time, built by the training job's own launcher, kept while the next section can use it."""

from __future__ import annotations

import copy
import dataclasses
import logging

from common.config import Config
from deploy.launch import RunActors

log = logging.getLogger(__name__)

# Logical CPUs only: every actor sets its threads itself, so Ray's count just has to leave room
# for the benchmark's own actors (Hugging Face generate) beside a cluster.
RAY_CPUS = 16


@dataclasses.dataclass
class Running:
    cfg: Config
    actors: RunActors

    def first_worker(self) -> RunActors:
        """The run's actors as if it had only its first rollout worker."""
        return dataclasses.replace(self.actors, workers=self.actors.workers[:1],
                                   worker_nodes=self.actors.worker_nodes[:1])


class ClusterPool:
    def __init__(self, base: Config):
        self.base = base
        self.current: Running | None = None

    def get(self, model: str, workers: int, *, tokens: int | None = None,
            cpus: float | None = None, threads: int = 0) -> Running:
        """A learner and at least `workers` rollout workers for `model` generating `tokens` per
        completion, each worker with `cpus` CPUs and `threads` (0: the run's choice); None:
        whatever the running cluster has."""
        import ray

        from deploy.launch import init_ray, launch

        cur = self.current
        if (cur is not None and cur.cfg.model.name == model and len(cur.actors.workers) >= workers
                and tokens in (None, cur.cfg.rollout.max_tokens)
                and cpus in (None, cur.cfg.rollout.num_cpus)
                and cur.cfg.rollout.threads == threads):
            return cur
        self.stop()
        cfg = copy.deepcopy(self.base)
        cfg.model.name, cfg.rollout.num_workers = model, workers
        cfg.rollout.num_cpus, cfg.rollout.threads = cpus or 1, threads
        cfg.rollout.max_tokens = tokens or cfg.rollout.max_tokens
        cfg.cluster.num_cpus = RAY_CPUS
        if not ray.is_initialized():
            init_ray(cfg)
        log.info("starting %s with %d rollout worker(s) of %g CPU(s)", model, workers,
                 cfg.rollout.num_cpus)
        actors = launch(cfg, cfg.cluster.call_timeout_s)
        ray.get([w.ready.remote() for w in actors.workers]
                + [actors.learner.weight_specs.remote()], timeout=cfg.cluster.call_timeout_s)
        self.current = Running(cfg, actors)
        return self.current

    def stop(self) -> None:
        from deploy.launch import shutdown

        if self.current is None:
            return
        shutdown(self.current.actors)
        self.current = None

    def shutdown(self) -> None:
        """Stop the cluster and Ray itself (a training run starts its own)."""
        import ray

        self.stop()
        if ray.is_initialized():
            ray.shutdown()
