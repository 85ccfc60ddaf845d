"""The driver's side of weight sync: one class per transport, with the same two verbs, `push` (every
engine to the learner's new version) and `revive` (workers Ray restarted, brought up to date).
The learner sends and each engine receives on a channel of the same transport
(`common/weight_sync.py`); this side sets the channels up and says when to send."""

from __future__ import annotations

import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable

from common.config import Config, ConfigError
from common.held import remove_unheld
from common.weight_sync import SHARED_WEIGHTS, TensorSpec, plan_buckets
from deploy.clients import LearnerClient
from deploy.launch import RunActors
from deploy.workers import RolloutWorkers, Settled, TransferFailed

log = logging.getLogger(__name__)


class WeightPush(ABC):
    """Gets the learner's weights into every engine, through one transport."""

    name: str

    def __init__(self, cfg: Config, learner: LearnerClient, workers: RolloutWorkers):
        self.cfg, self.learner, self.workers = cfg, learner, workers
        self.specs: list[TensorSpec] = learner.weight_specs()
        self.nbytes = sum(s.nbytes for s in self.specs)

    @abstractmethod
    def push(self, version: int) -> None:
        """Bring every engine to policy `version` (the learner's current one). Raises
        TransferFailed naming the workers that died before or during the transfer (none if the
        transfer broke with every member alive)."""

    @abstractmethod
    def revive(self, workers: list[int], version: int) -> None:
        """Bring `workers`, which Ray restarted, and every engine not at `version` to it; with
        no workers, start the transport afresh after a failed transfer."""

    def close(self) -> None:
        self.learner.close_weight_sync()

    def _check(self, settled: Settled) -> None:
        """Raise TransferFailed if any side failed, naming the workers that died."""
        dead = settled.dead
        if settled.errors and not dead:
            # A restarted worker fails a transfer without dying again (it has no channel yet,
            # or the group it would meet in is gone): ask who is new.
            dead = self.workers.restarted()
        if dead or settled.errors:
            raise TransferFailed(dead, cause=settled.errors[0] if settled.errors else None)


class SharedMemoryPush(WeightPush):
    """The learner writes one file in /dev/shm; each engine on its node loads from it."""

    name = "shm"

    def __init__(self, cfg: Config, learner: LearnerClient, workers: RolloutWorkers, run_id: str):
        super().__init__(cfg, learner, workers)
        self.path = SHARED_WEIGHTS.format(run_id)
        self.written = -1  # the version in the file
        self.holds: dict[int, int] = {}  # worker -> the version it loaded last
        learner.open_shared_weights(self.path)
        self._open(range(len(workers)))

    def push(self, version: int) -> None:
        self._send(version, range(len(self.workers)))

    def close(self) -> None:
        """The learner removes its file; if the learner is gone, the file is removed here when
        this node is the learner's (else the next run there does it)."""
        try:
            super().close()
        finally:
            remove_unheld(SHARED_WEIGHTS.format("*"))

    def revive(self, workers: list[int], version: int) -> None:
        for i in workers:
            self.holds.pop(i, None)
        self._open(workers)
        self._send(version, [i for i in range(len(self.workers)) if self.holds.get(i) != version])

    def _open(self, workers: Iterable[int]) -> None:
        calls = self.workers.open_shared_weights(self.path, self.specs, only=workers)
        self._check(self.workers.settle(calls, "the engines to open the shared weights"))

    def _send(self, version: int, workers: Iterable[int]) -> None:
        if self.written != version:
            self.learner.send_weights().result()
            self.written = version
        settled = self.workers.settle(self.workers.receive_weights(version, only=workers),
                                      f"weights version {version} to load")
        self.holds.update((i, version) for i in settled.ok)
        self._check(settled)


class BroadcastPush(WeightPush):
    """A process group of the learner (rank 0) and every engine's ranks; the learner broadcasts
    flat buckets of tensors. A group cannot be rejoined by one member alone, so a restarted
    worker means forming it again, with every member."""

    name = "broadcast"

    def __init__(self, cfg: Config, learner: LearnerClient, workers: RolloutWorkers, host: str):
        super().__init__(cfg, learner, workers)
        self.host = host
        self.buckets = plan_buckets(self.specs, cfg.cluster.sync_bucket_mb << 20)
        self._form_group()

    def push(self, version: int) -> None:
        restarted = self.workers.restarted()  # every member must be alive before it starts
        if restarted:
            raise TransferFailed(restarted)
        sent = self.learner.send_weights()
        received = self.workers.receive_weights(version)
        self._check(self.workers.settle(received, f"weights version {version} to load", [sent]))

    def revive(self, workers: list[int], version: int) -> None:
        self._form_group()
        self.push(version)

    def _form_group(self) -> None:
        """The learner is rank 0, then every tensor-parallel rank of every engine."""
        c, tp = self.cfg.cluster, self.cfg.rollout.tensor_parallel_size
        world = 1 + tp * len(self.workers)
        secret = secrets.token_hex(16)  # only the members told it can meet in the group
        port = self.learner.open_weight_group(self.host, c.weight_sync_port)
        connected = self.learner.connect_weight_group(world, self.buckets, c.weight_sync_timeout_s, secret)
        joined = self.workers.join_weight_group(self.host, port, world, self.specs, self.buckets,
                                                c.weight_sync_timeout_s, secret)
        self._check(self.workers.settle(joined, "the weight-sync group to form", [connected]))


def choose_transport(cfg: Config, actors: RunActors) -> str:
    """`shm` needs CPU engines on the learner's node; anything else broadcasts."""
    if cfg.cluster.weight_sync != "auto":
        return cfg.cluster.weight_sync
    return "shm" if cfg.cluster.device == "cpu" and actors.single_node else "broadcast"


def weight_push(cfg: Config, actors: RunActors, learner: LearnerClient, workers: RolloutWorkers,
                run_id: str) -> WeightPush:
    """The transport `cluster.weight_sync` asks for (or the fastest that fits the cluster)."""
    if choose_transport(cfg, actors) == "shm":
        if not actors.single_node:
            raise ConfigError(["cluster.weight_sync shm needs every rollout worker on the learner's node"])
        return SharedMemoryPush(cfg, learner, workers, run_id)
    return BroadcastPush(cfg, learner, workers, actors.sync_host)
