"""The rollout workers as the driver sees them: their Ray actors, the calls made to them, and who
each one is. Ray restarts a worker that dies; this module is the one place that tells a death
from an error, and a restarted worker from the one before. What to do about it is decided in
`deploy/rollouts.py` from what this module reports, so that logic is tested without Ray."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray

from common.config import Config
from common.errors import RunError, WaitTimeout
from common.spans import Span
from common.types import GenerationStats, Prompt, RolloutGroup
from common.weight_sync import TensorSpec
from deploy.remote import Call, get

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)

RESTART_POLL_S = 1.0  # how often a restarting worker is asked again


class TransferFailed(Exception):
    """A weight transfer that failed; `workers` names those that died in it (Ray restarts
    them), and is empty when every member is alive (the transfer itself broke)."""

    def __init__(self, workers: Iterable[int] = (), cause: BaseException | None = None):
        self.workers, self.cause = sorted(set(workers)), cause
        super().__init__(f"rollout worker(s) {self.workers} died" if self.workers else str(cause))


@dataclass
class Share:
    """One worker's part of one round, in flight: done when every group is in the buffer."""

    round: int
    worker: int
    prompts: list[Prompt]
    done: ray.ObjectRef  # the worker's GenerationStats


@dataclass
class Settled:
    """How calls to several workers ended."""

    ok: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


class RolloutWorkers:
    """The driver's side of the `actors.rollout_worker.RolloutWorker` actors: one method per
    remote call, made on every worker (or on `only` some) at once."""

    def __init__(self, handles: list[ActorHandle], cfg: Config):
        self.handles = handles
        self.timeout = cfg.cluster.call_timeout_s
        self.max_restarts = cfg.cluster.max_worker_restarts
        self.tensor_parallel_size = cfg.rollout.tensor_parallel_size
        self.incarnations: list[str] = []
        """Who each worker is: a new value means Ray restarted it."""

    def __len__(self) -> int:
        return len(self.handles)

    def start(self) -> None:
        """Wait until every engine has started, and remember who each worker is."""
        refs = [w.ready.remote() for w in self.handles]
        what = "the rollout workers' engines to start"
        if len(ray.wait(refs, num_returns=len(refs), timeout=self.timeout)[0]) < len(refs):
            raise WaitTimeout(f"waited {self.timeout:.0f} s for {what}")
        self.incarnations = [get(ref, self.timeout, what, actor=f"rollout worker {i}")[0]
                             for i, ref in enumerate(refs)]

    # --- generation ----------------------------------------------------------------------------

    def stream(self, worker: int, prompts: list[Prompt], round_: int) -> Share:
        """Start `worker` on `prompts` for `round_`; it puts each group into the buffer."""
        return Share(round_, worker, prompts, self.handles[worker].stream.remote(prompts, round_))

    def finished(self, shares: list[Share], wait_s: float = 0.0) -> tuple[list[tuple[Share, GenerationStats]], list[Share]]:
        """Of `shares`, those stored in the buffer (with their stats) and those lost because their
        worker died, waiting up to `wait_s` for all; any other failure raises."""
        if not shares:
            return [], []
        ready, _ = ray.wait([s.done for s in shares], num_returns=len(shares), timeout=wait_s)
        stored, lost = [], []
        for share in [s for s in shares if s.done in ready]:
            try:
                stored.append((share, ray.get(share.done)))
            except ray.exceptions.RayActorError:
                lost.append(share)
        return stored, lost

    def take_spans(self) -> list[Span]:
        """Every live worker's spans since the last take (a dead one's are gone with it)."""
        spans = []
        for handle in self.handles:
            try:
                spans += ray.get(handle.take_spans.remote(), timeout=self.timeout)
            except ray.exceptions.RayActorError:
                pass
        return spans

    def generate(self, shares: list[list[Prompt]], round_: int) -> list[RolloutGroup]:
        """Worker i generates shares[i] (empty shares skipped) and returns the groups; waits for
        every one."""
        refs = [self.handles[i].generate.remote(share, round_) for i, share in enumerate(shares) if share]
        return [g for groups, _ in get(refs, self.timeout, "the evaluation", actor="a rollout worker")
                for g in groups]

    def probe_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[list[float]]]:
        """Each worker's log-probs of `sequences` from `starts` on (see `RolloutWorker.probe_logprobs`)."""
        refs = [handle.probe_logprobs.remote(sequences, starts) for handle in self.handles]
        return [get(ref, self.timeout, f"rollout worker {i} to score the probe set", f"rollout worker {i}")
                for i, ref in enumerate(refs)]

    # --- weights: each call returns every worker's result ref, for `settle` ---------------------

    def receive_weights(self, version: int, only: Iterable[int] | None = None) -> dict[int, ray.ObjectRef]:
        return {i: self.handles[i].receive_weights.remote(version) for i in self._chosen(only)}

    def open_shared_weights(self, path: str, specs: list[TensorSpec],
                            only: Iterable[int] | None = None) -> dict[int, ray.ObjectRef]:
        return {i: self.handles[i].open_shared_weights.remote(path, specs) for i in self._chosen(only)}

    def join_weight_group(self, host: str, port: int, world_size: int, specs: list[TensorSpec],
                          buckets: list[list[int]], timeout_s: float, secret: str) -> dict[int, ray.ObjectRef]:
        """Every engine's ranks join the learner's group: worker i's first rank is 1 + i x its
        tensor-parallel size (the learner is rank 0)."""
        tp = self.tensor_parallel_size
        return {i: handle.join_weight_group.remote(host, port, 1 + i * tp, world_size, specs, buckets,
                                                   timeout_s, secret)
                for i, handle in enumerate(self.handles)}

    def _chosen(self, only: Iterable[int] | None) -> Iterable[int]:
        return range(len(self)) if only is None else only

    def settle(self, calls: dict[int, ray.ObjectRef], what: str, others: Iterable[Call] = ()) -> Settled:
        """Wait for `calls` and `others` (other actors' sides of the same transfer); sort the
        workers into done, dead and failed."""
        others = list(others)
        refs = [*calls.values(), *(call.ref for call in others)]
        if len(ray.wait(refs, num_returns=len(refs), timeout=self.timeout)[0]) < len(refs):
            raise WaitTimeout(f"waited {self.timeout:.0f} s for {what}")
        out = Settled()
        for i, ref in calls.items():
            try:
                ray.get(ref)
                out.ok.append(i)
            except ray.exceptions.RayActorError:
                out.dead.append(i)
            except ray.exceptions.RayTaskError as e:
                out.errors.append(e)
        for call in others:
            try:
                call.result()
            except ray.exceptions.RayTaskError as e:
                out.errors.append(e)
        return out

    # --- who is alive --------------------------------------------------------------------------

    def restarted(self) -> list[int]:
        """The workers Ray restarted since they were last seen (a restarting one is waited for)."""
        return [i for i in range(len(self)) if self._incarnation(i) != self.incarnations[i]]

    def await_restart(self, workers: Iterable[int]) -> int:
        """Wait until each of `workers` runs again; returns how many were restarted."""
        restarted = 0
        for i in workers:
            incarnation = self._incarnation(i)
            if incarnation != self.incarnations[i]:
                self.incarnations[i] = incarnation
                restarted += 1
                log.warning("rollout worker %d was restarted; bringing it up to date", i)
        return restarted

    def _incarnation(self, i: int) -> str:
        """Worker `i`'s incarnation once it is up: while Ray restarts it, calls fail at once as
        unavailable, so ask again until it answers or the timeout passes."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return get(self.handles[i].ready.remote(), self.timeout, f"rollout worker {i} to restart")[0]
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"waited {self.timeout:.0f} s for rollout worker {i} to restart") from None
                time.sleep(RESTART_POLL_S)
            except ray.exceptions.ActorDiedError:
                raise RunError(f"rollout worker {i} died and Ray could not restart it "
                               f"(cluster.max_worker_restarts={self.max_restarts})") from None
