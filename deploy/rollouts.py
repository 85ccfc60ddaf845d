"""Driver side of the rollout workers: hands each round's prompts to them, routes their groups
straight into the buffer (never through the driver), keeps their weights current, and survives
a worker that dies: Ray restarts it, it gets the current weights, and the share it was
generating is counted lost and generated again."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from common.config import Config
from common.data import PromptSampler
from common.types import GenerationStats, Prompt
from deploy.launch import Cluster, get
from deploy.sync import WeightSync

log = logging.getLogger(__name__)

EVAL_ROUND = -1  # every evaluation samples with the same seeds, so before/after compare fairly


@dataclass
class Share:
    """One worker's part of one round, in flight."""

    round: int
    worker: int
    prompts: list[Prompt]
    stats: ray.ObjectRef
    stored: ray.ObjectRef  # the buffer's put of the groups


def _discard(ref: ray.ObjectRef) -> None:
    """Read a result known to hold the same error, so Ray does not also print it as unhandled."""
    try:
        ray.get(ref)
    except ray.exceptions.RayError:
        pass


def split(items: list, parts: int) -> list[list]:
    """`items` in `parts` contiguous runs whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


class Rollouts:
    def __init__(self, cfg: Config, cluster: Cluster, sync: WeightSync, sampler: PromptSampler):
        self.cfg, self.cluster, self.sync, self.sampler = cfg, cluster, sync, sampler
        self.timeout = cfg.cluster.call_timeout_s
        self.incarnations = [inc for inc, _ in self._get([w.ready.remote() for w in cluster.workers],
                                                         "the rollout workers' engines to start")]
        self.pending: list[Share] = []
        self.lost: list[Share] = []        # shares whose worker died, to generate again
        self.finished: list[GenerationStats] = []
        self.lost_groups = 0
        self.restarts = 0
        self.synced_version = -1  # the policy version every engine is known to hold

    # --- generation --------------------------------------------------------------------------

    def submit(self, round_: int) -> None:
        prompts = self.sampler.take(self.cfg.prompts_per_step)
        for worker, share in enumerate(split(prompts, len(self.cluster.workers))):
            if share:
                self._launch(round_, worker, share)

    def _launch(self, round_: int, worker: int, prompts: list[Prompt]) -> None:
        groups, stats = self.cluster.workers[worker].generate.options(num_returns=2).remote(prompts, round_)
        stored = self.cluster.buffer.put.remote(groups, self.cfg.buffer.timeout_s)
        self.pending.append(Share(round_, worker, prompts, stats, stored))

    def poll(self) -> None:
        """Collect the shares that finished; move those whose worker died to `lost`."""
        if not self.pending:
            return
        done, _ = ray.wait([s.stored for s in self.pending], num_returns=len(self.pending), timeout=0)
        for share in [s for s in self.pending if s.stored in done]:
            self.pending.remove(share)
            try:
                ray.get(share.stored)
                self.finished.append(ray.get(share.stats))
            except ray.exceptions.RayError as e:
                _discard(share.stats)
                if not isinstance(e, ray.exceptions.RayActorError):
                    raise
                log.warning("rollout worker %d died during round %d (%s); its %d groups are lost "
                            "and will be generated again", share.worker, share.round,
                            type(e).__name__, len(share.prompts))
                self.lost_groups += len(share.prompts)
                self.lost.append(share)

    def take_stats(self) -> list[GenerationStats]:
        stats, self.finished = self.finished, []
        return stats

    def evaluate(self, prompts: list[Prompt]) -> float:
        """Mean reward on `prompts` with the engines' current weights (G samples each)."""
        if not prompts:
            return float("nan")
        refs = [self.cluster.workers[i].generate.remote(share, EVAL_ROUND)
                for i, share in enumerate(split(prompts, len(self.cluster.workers))) if share]
        rewards = [r for groups, _ in self._get(refs, "the evaluation") for g in groups for r in g.rewards]
        return sum(rewards) / len(rewards)

    # --- weights and recovery: only while the learner is idle --------------------------------

    def push_weights(self, version: int) -> None:
        """Bring every engine to policy `version`, reviving any worker that died."""
        if self.synced_version != version:
            self._sync(version, None)

    def recover(self, version: int) -> None:
        """Revive the workers whose shares were lost, then generate those shares again."""
        if not self.lost:
            return
        self._sync(version, sorted({s.worker for s in self.lost}))
        lost, self.lost = self.lost, []
        for share in lost:
            self._launch(share.round, share.worker, share.prompts)

    def _sync(self, version: int, dead: list[int] | None) -> None:
        """Push weights to all engines (dead is None) or revive `dead` ones and serve them."""
        targets = dead
        for _ in range(1 + self.cfg.cluster.max_worker_restarts * len(self.cluster.workers)):
            if targets:
                self._await_restart(targets)
                if self.sync.transport == "broadcast":
                    self.sync.connect()  # a group is re-formed by all members, never rejoined
                    targets = None
            try:
                targets = self.sync.push(version, targets)
            except ray.exceptions.RayTaskError:
                # A broadcast fails on every side when one member is gone or new: find who.
                targets = self._restarted() or None
                if targets is None:
                    raise
            if not targets:
                if dead is None or self.sync.transport == "broadcast":
                    self.synced_version = version  # every engine holds it now
                return
        raise RuntimeError(f"the rollout workers kept dying while receiving weights version {version}")

    def _await_restart(self, workers: list[int]) -> None:
        for i in workers:
            incarnation = self._ready(i)
            if incarnation != self.incarnations[i]:
                self.incarnations[i] = incarnation
                self.restarts += 1
                log.warning("rollout worker %d was restarted; bringing it up to date", i)

    def _ready(self, i: int) -> str:
        """The incarnation of worker `i` once it is up; while Ray restarts it, calls fail at
        once as unavailable, so ask again until it answers or the timeout passes."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self._get(self.cluster.workers[i].ready.remote(), f"rollout worker {i} to restart")[0]
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {self.timeout:.0f} s for rollout worker {i} to restart") from None
                time.sleep(1.0)
            except ray.exceptions.ActorDiedError:
                raise RuntimeError(
                    f"rollout worker {i} died and Ray could not restart it "
                    f"(cluster.max_worker_restarts={self.cfg.cluster.max_worker_restarts})") from None

    def _restarted(self) -> list[int]:
        return [i for i in range(len(self.cluster.workers)) if self._ready(i) != self.incarnations[i]]

    def _get(self, refs, what: str):
        return get(refs, self.timeout, what)
