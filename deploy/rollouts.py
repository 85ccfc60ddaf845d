"""Driver side of the rollout workers: hands each round's prompts to them, routes their groups
straight into the buffer (never through the driver), keeps their weights current, and survives
a worker that dies: Ray restarts it, it gets the current weights, and the share it was
generating is counted lost and generated again."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from common.config import Config
from common.data import PromptSampler
from common.types import GenerationStats, Prompt
from deploy.launch import Cluster
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
            except ray.exceptions.RayActorError as e:
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
        refs = [self.cluster.workers[i].generate.options(num_returns=2).remote(share, EVAL_ROUND)[0]
                for i, share in enumerate(split(prompts, len(self.cluster.workers))) if share]
        rewards = [r for groups in self._get(refs, "the evaluation") for g in groups for r in g.rewards]
        return sum(rewards) / len(rewards)

    # --- weights and recovery: only while the learner is idle --------------------------------

    def push_weights(self, version: int) -> None:
        """Bring every engine to policy `version`, reviving any worker that died."""
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
                return
        raise RuntimeError(f"the rollout workers kept dying while receiving weights version {version}")

    def _await_restart(self, workers: list[int]) -> None:
        for i in workers:
            try:
                incarnation, _ = self._get([self.cluster.workers[i].ready.remote()],
                                           f"rollout worker {i} to restart")[0]
            except ray.exceptions.RayActorError:
                raise RuntimeError(
                    f"rollout worker {i} died and Ray could not restart it "
                    f"(cluster.max_worker_restarts={self.cfg.cluster.max_worker_restarts})") from None
            if incarnation != self.incarnations[i]:
                self.incarnations[i] = incarnation
                self.restarts += 1
                log.warning("rollout worker %d was restarted; bringing it up to date", i)

    def _restarted(self) -> list[int]:
        states = self._get([w.ready.remote() for w in self.cluster.workers], "the rollout workers")
        return [i for i, (inc, _) in enumerate(states) if inc != self.incarnations[i]]

    def _get(self, refs: list, what: str) -> list:
        try:
            return ray.get(refs, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"waited {self.timeout:.0f} s for {what}") from None
