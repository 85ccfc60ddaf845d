"""Driver side of generation: hands each round's prompts to the workers, routes their groups
straight into the buffer (never through the driver), and notices a worker that died: its share
is counted lost and generated again once Ray has restarted it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from common.config import Config
from common.data import PromptSampler
from common.types import GenerationStats, Prompt
from deploy.launch import Cluster

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
    def __init__(self, cfg: Config, cluster: Cluster, sampler: PromptSampler):
        self.cfg, self.cluster, self.sampler = cfg, cluster, sampler
        self.pending: list[Share] = []
        self.lost: list[Share] = []        # shares whose worker died, to generate again
        self.finished: list[GenerationStats] = []
        self.lost_groups = 0
        self.restarts = 0

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

    def recover(self, bring_up_to_date) -> None:
        """Wait for the dead workers to come back, bring them to the current weights with
        `bring_up_to_date(worker_indices)`, then generate their lost shares again."""
        if not self.lost:
            return
        dead = sorted({s.worker for s in self.lost})
        for i in dead:
            try:
                ray.get(self.cluster.workers[i].ready.remote(), timeout=self.cfg.cluster.call_timeout_s)
            except ray.exceptions.RayActorError:
                raise RuntimeError(
                    f"rollout worker {i} died and Ray could not restart it "
                    f"(cluster.max_worker_restarts={self.cfg.cluster.max_worker_restarts})") from None
        self.restarts += len(dead)
        bring_up_to_date(dead)
        lost, self.lost = self.lost, []
        for share in lost:
            self._launch(share.round, share.worker, share.prompts)

    def take_stats(self) -> list[GenerationStats]:
        stats, self.finished = self.finished, []
        return stats

    def evaluate(self, prompts: list[Prompt]) -> float:
        """Mean reward on `prompts` with the engines' current weights (G samples each)."""
        if not prompts:
            return float("nan")
        refs = [self.cluster.workers[i].generate.options(num_returns=2).remote(share, EVAL_ROUND)[0]
                for i, share in enumerate(split(prompts, len(self.cluster.workers))) if share]
        rewards = [r for groups in ray.get(refs, timeout=self.cfg.cluster.call_timeout_s)
                   for g in groups for r in g.rewards]
        return sum(rewards) / len(rewards)
