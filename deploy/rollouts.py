"""Rounds of generation, and engines kept at the learner's version through worker deaths.

Each round's prompts are split over the rollout workers, whose groups go straight into the
buffer. When a worker dies Ray restarts it; its share of the round is counted lost and, once
the learner is idle (the restarted engine needs its weights), the worker is revived and the
share generated again with the same prompts and seeds. The Ray calls live in
`deploy/workers.py` and `deploy/clients.py`, the transports in `deploy/weight_push.py`; this
module only decides. Its counts (groups lost, workers restarted) go into the run's state."""

from __future__ import annotations

import logging
import time

from common.config import Config
from common.data import PromptSampler
from common.errors import RunError, WaitTimeout
from common.types import GenerationStats, Prompt, RunState
from deploy.clients import BufferClient
from deploy.remote import Call
from deploy.weight_push import WeightPush
from deploy.workers import RolloutWorkers, Share, TransferFailed

log = logging.getLogger(__name__)

EVAL_ROUND = -1  # every evaluation samples with the same seeds, so before/after compare fairly
POLL_S = 0.5


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
    def __init__(self, cfg: Config, workers: RolloutWorkers, buffer: BufferClient,
                 transport: WeightPush, sampler: PromptSampler, state: RunState):
        self.cfg, self.workers, self.buffer, self.transport = cfg, workers, buffer, transport
        self.sampler, self.state = sampler, state
        self.next_round = state.step
        self.round_starts: dict[int, int] = {}  # round -> the sampler's position at its start
        self.extra_rounds: dict[int, int] = {}  # dynamic sampling: step -> extra rounds, groups
        self.extra_groups: dict[int, int] = {}
        self.pending: list[Share] = []
        self.lost: list[Share] = []         # shares whose worker died, to generate again
        self.stats: list[GenerationStats] = []
        self.engines_version = -1           # the policy version every engine holds
        # Every worker may die max_worker_restarts times, each costing one more attempt.
        self.attempts = 1 + cfg.cluster.max_worker_restarts * len(workers)

    # --- generation ----------------------------------------------------------------------------

    def generate_ahead(self, step: int) -> None:
        """Start every round up to `buffer.max_policy_lag` ahead of training step `step`."""
        last = min(step + self.cfg.buffer.max_policy_lag, self.cfg.steps - 1)
        while self.next_round <= last:
            self.round_starts[self.next_round] = self.sampler.position
            self._launch(self.cfg.prompts_per_step, self.next_round)
            self.next_round += 1

    def prompts_taken(self, step: int) -> int:
        """Where the prompt stream stands for a run resumed at `step`: at the start of round
        `step` if it was already started, else where it is now."""
        return self.round_starts.get(step, self.sampler.position)

    def _launch(self, count: int, round_: int) -> None:
        prompts = self.sampler.take(count)
        for worker, share in enumerate(split(prompts, len(self.workers))):
            if share:
                self.pending.append(self.workers.stream(worker, share, round_))

    def refill(self, step: int) -> None:
        """Dynamic sampling: when nothing is being generated and the buffer is short of a batch
        (groups without signal were left out), generate one more round for step `step`, as DAPO
        generates whole batches (groups beyond the batch serve the next step, within the lag
        bound); after grpo.max_extra_rounds such rounds the run stops."""
        if not self.cfg.grpo.drop_zero_std_groups or self.pending or self.lost:
            return
        missing = self.buffer.short()
        if missing <= 0:
            return
        rounds = self.extra_rounds.get(step, 0)
        if rounds >= self.cfg.grpo.max_extra_rounds:
            raise RunError(f"dynamic sampling: after {rounds} extra rounds step {step + 1} still "
                           f"lacks {missing} of {self.cfg.prompts_per_step} groups whose rewards "
                           "differ (grpo.max_extra_rounds); the reward gives this policy no signal")
        self.extra_rounds[step] = rounds + 1
        self.extra_groups[step] = self.extra_groups.get(step, 0) + self.cfg.prompts_per_step
        self._launch(self.cfg.prompts_per_step, step)

    def poll(self, wait_s: float = 0.0) -> None:
        """Collect the shares that finished (waiting up to `wait_s` for all of them); those whose
        worker died are lost, for now."""
        stored, lost = self.workers.finished(self.pending, wait_s)
        for share, stats in stored:
            self.pending.remove(share)
            self.stats.append(stats)
        for share in lost:
            self.pending.remove(share)
            log.warning("rollout worker %d died during round %d; its %d groups are lost and will "
                        "be generated again", share.worker, share.round, len(share.prompts))
            self.state.lost_groups += len(share.prompts)
            self.lost.append(share)

    def wait(self, call: Call, idle_step: int | None = None):
        """The result of `call`, watching the workers meanwhile. With `idle_step` the learner is
        idle, waiting for that step's batch: a dead worker is revived at once (it needs the
        learner's weights), and a short batch refilled."""
        deadline = time.monotonic() + self.cfg.cluster.call_timeout_s
        while not call.done(POLL_S):
            self.poll()
            if idle_step is not None:
                self.recover()
                self.refill(idle_step)
            if time.monotonic() > deadline:
                raise WaitTimeout(f"waited {self.cfg.cluster.call_timeout_s:.0f} s for {call.what}")
        return call.result()

    def take_stats(self) -> list[GenerationStats]:
        stats, self.stats = self.stats, []
        return stats

    def take_extra_groups(self, step: int) -> int:
        """Groups dynamic sampling generated beyond step `step`'s round, counted once."""
        return self.extra_groups.pop(step, 0)

    def evaluate(self, prompts: list[Prompt]) -> float:
        """Mean reward on `prompts` with the engines' current weights (G samples each)."""
        if not prompts:
            return float("nan")
        groups = self.workers.generate(split(prompts, len(self.workers)), EVAL_ROUND)
        rewards = [r for g in groups for r in g.rewards]
        return sum(rewards) / len(rewards)

    # --- weights and recovery: only while the learner is idle ----------------------------------

    def push_weights(self, version: int) -> None:
        """Bring every engine to policy `version`, reviving workers that died."""
        if self.cfg.buffer.max_policy_lag == 0:
            self._drain()
        else:
            self.poll()
        self._bring_engines_to(version)
        self._relaunch_lost()

    def _drain(self) -> None:
        """Wait until every share in flight is stored (or lost). In a synchronous run they are
        only finishing a dynamic-sampling round beyond the batch, which the engines' reload waits
        for anyway; after it the buffer's counts at the step's end are the same in every run."""
        deadline = time.monotonic() + self.cfg.cluster.call_timeout_s
        while self.pending:
            if time.monotonic() > deadline:
                raise WaitTimeout(f"waited {self.cfg.cluster.call_timeout_s:.0f} s for rollout "
                                  f"worker {self.pending[0].worker} to store round {self.pending[0].round}")
            self.poll(wait_s=POLL_S)

    def recover(self) -> None:
        """Revive the workers whose shares were lost, then generate those shares again."""
        if self.lost:
            self._bring_engines_to(self.engines_version, dead=sorted({s.worker for s in self.lost}))
            self._relaunch_lost()

    def _bring_engines_to(self, version: int, dead: list[int] | None = None) -> None:
        """Push `version` to every engine, or revive `dead` ones; whoever dies on the way is
        waited for and revived in turn, and a transfer that broke with everyone alive is made
        again on a transport started afresh."""
        failure = None
        for _ in range(self.attempts):
            try:
                if dead is None:
                    self.transport.push(version)
                else:
                    self.state.worker_restarts += self.workers.await_restart(dead)
                    self.transport.revive(dead, version)
                self.engines_version = version
                return
            except TransferFailed as e:
                dead, failure = e.workers, e
        if failure.workers or failure.cause is None:
            raise RunError(f"the rollout workers kept dying while receiving weights version "
                           f"{version} ({self.attempts} attempts)")
        raise failure.cause  # the same failure every time: it is what to read

    def _relaunch_lost(self) -> None:
        lost, self.lost = self.lost, []
        for share in lost:
            self.pending.append(self.workers.stream(share.worker, share.prompts, share.round))
