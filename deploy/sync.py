"""Driver side of weight sync: after each update, the learner's weights reach every engine,
by broadcast (gloo/NCCL, across nodes) or through shared memory (CPU, same node)."""

from __future__ import annotations

import logging
import secrets
import time

import ray

from common.config import Config, ConfigError
from common.weight_sync import TensorSpec, plan_buckets
from deploy.launch import Cluster

log = logging.getLogger(__name__)


def choose_transport(cfg: Config, cluster: Cluster) -> str:
    """`shm` needs CPU engines on the learner's node; anything else broadcasts."""
    if cfg.cluster.weight_sync != "auto":
        return cfg.cluster.weight_sync
    same_node = all(node == cluster.learner_node[0] for node, _ in cluster.worker_nodes)
    return "shm" if cfg.cluster.device == "cpu" and same_node else "broadcast"


class WeightSync:
    def __init__(self, cfg: Config, cluster: Cluster, run_id: str):
        self.cfg, self.cluster = cfg, cluster
        self.transport = choose_transport(cfg, cluster)
        if self.transport == "shm" and any(node != cluster.learner_node[0] for node, _ in cluster.worker_nodes):
            raise ConfigError(["cluster.weight_sync shm needs every rollout worker on the learner's node"])
        self.timeout_s = cfg.cluster.call_timeout_s
        self.specs = ray.get(cluster.learner.weight_specs.remote(), timeout=self.timeout_s)
        typed = [TensorSpec(n, d, tuple(s)) for n, d, s in self.specs]
        self.buckets = plan_buckets(typed, cfg.cluster.sync_bucket_mb << 20)
        self.nbytes = sum(s.nbytes for s in typed)
        self.path = f"/dev/shm/grpo-ray-{run_id}.weights"
        if self.transport == "broadcast":
            self.connect()

    def connect(self) -> None:
        """(Re)form the broadcast group: the learner is rank 0, then every tensor-parallel rank
        of every engine. Used at start and after a worker restarted (a group cannot be rejoined
        by one member alone)."""
        host = self.cluster.learner_node[1]
        tp = self.cfg.rollout.tensor_parallel_size
        world = 1 + tp * len(self.cluster.workers)
        learner = self.cluster.learner
        secret = secrets.token_hex(16)  # only the members told it can meet in the group
        port = ray.get(learner.open_weight_group.remote(host, self.cfg.cluster.weight_sync_port),
                       timeout=self.timeout_s)
        self._wait([learner.connect_weight_group.remote(world, self.timeout_s, secret)] + [
            w.join_weight_group.remote(host, port, 1 + i * tp, world, self.timeout_s, secret)
            for i, w in enumerate(self.cluster.workers)
        ], "the weight-sync group to form")

    def push(self, version: int, workers: list[int] | None = None) -> list[int]:
        """Send the learner's current weights (policy `version`) to the engines: all of them, or
        with shared memory just `workers`. Returns the workers that died on the way; any other
        failure raises (a broadcast with a member missing fails on the learner's side too)."""
        learner, chosen = self.cluster.learner, list(range(len(self.cluster.workers)))
        if self.transport == "broadcast":
            sent = learner.broadcast_weights.remote(self.buckets)
            received = {i: self.cluster.workers[i].receive_broadcast.remote(self.specs, self.buckets, version)
                        for i in chosen}
        else:
            self._wait([learner.write_shared.remote(self.path)], "the learner to write weights")
            chosen = chosen if workers is None else workers
            received = {i: self.cluster.workers[i].receive_shared.remote(self.path, self.specs, version)
                        for i in chosen}
            sent = None
        what = f"engines to load weights version {version}"
        dead = [i for i, ref in received.items() if self._died(ref, what)]
        if sent is not None:
            self._wait([sent], f"the learner to broadcast weights version {version}")
        return dead

    def _died(self, ref, what: str) -> bool:
        try:
            self._wait([ref], what)
            return False
        except ray.exceptions.RayActorError:
            return True

    def close(self) -> None:
        try:
            self._wait([self.cluster.learner.close_weight_sync.remote()], "the weight sync to close")
        except ray.exceptions.RayActorError:
            pass  # the learner is gone, and its shared-memory file with its node's /dev/shm

    def _wait(self, refs: list, what: str) -> list:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"waited {self.timeout_s:.0f} s for {what}") from None
