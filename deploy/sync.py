"""Driver side of weight sync: after each update, the learner's weights reach every engine,
by broadcast (gloo/NCCL, across nodes) or through shared memory (CPU, same node)."""

from __future__ import annotations

import logging
import secrets

import ray

from common.config import Config, ConfigError
from common.weight_sync import TensorSpec, plan_buckets
from deploy.launch import Cluster, get

log = logging.getLogger(__name__)


def choose_transport(cfg: Config, cluster: Cluster) -> str:
    """`shm` needs CPU engines on the learner's node; anything else broadcasts."""
    if cfg.cluster.weight_sync != "auto":
        return cfg.cluster.weight_sync
    return "shm" if cfg.cluster.device == "cpu" and cluster.single_node else "broadcast"


class WeightSync:
    def __init__(self, cfg: Config, cluster: Cluster, run_id: str):
        self.cfg, self.cluster = cfg, cluster
        self.transport = choose_transport(cfg, cluster)
        if self.transport == "shm" and not cluster.single_node:
            raise ConfigError(["cluster.weight_sync shm needs every rollout worker on the learner's node"])
        self.timeout_s = cfg.cluster.call_timeout_s
        self.specs = self._wait(cluster.learner.weight_specs.remote(), "the learner to start")
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
        host = self.cluster.sync_host
        tp = self.cfg.rollout.tensor_parallel_size
        world = 1 + tp * len(self.cluster.workers)
        learner = self.cluster.learner
        secret = secrets.token_hex(16)  # only the members told it can meet in the group
        port = self._wait(learner.open_weight_group.remote(host, self.cfg.cluster.weight_sync_port),
                          "the learner to open the weight-sync port")
        group_timeout = self.cfg.cluster.weight_sync_timeout_s
        self._wait([learner.connect_weight_group.remote(world, group_timeout, secret)] + [
            w.join_weight_group.remote(host, port, 1 + i * tp, world, group_timeout, secret)
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
        refs = [*received.values(), *([sent] if sent is not None else [])]
        if len(ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)[0]) < len(refs):
            raise TimeoutError(f"waited {self.timeout_s:.0f} s for weights version {version} to load")
        dead, failures = [], []
        for i, ref in received.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.append(i)
            except ray.exceptions.RayTaskError as e:
                failures.append(e)
        if sent is not None:
            try:
                ray.get(sent)
            except ray.exceptions.RayTaskError as e:
                failures.append(e)
        if failures and not dead:  # no one died that we know of: the caller looks closer
            raise failures[0]
        return dead

    def close(self) -> None:
        try:
            self._wait([self.cluster.learner.close_weight_sync.remote()], "the weight sync to close")
        except ray.exceptions.RayActorError:
            pass  # the learner is gone, and its shared-memory file with its node's /dev/shm

    def _wait(self, refs, what: str):
        return get(refs, self.timeout_s, what)
