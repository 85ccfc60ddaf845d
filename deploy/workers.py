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
from deploy.launch import get

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
    def __init__(self, handles: list[ActorHandle], buffer: ActorHandle, cfg: Config):
        self.handles, self.buffer = handles, buffer
        self.timeout = cfg.cluster.call_timeout_s
        self.max_restarts = cfg.cluster.max_worker_restarts
        self.incarnations: list[str] = []
        """Who each worker is: a new value means Ray restarted it."""
        self.restarts = 0

    def __len__(self) -> int:
        return len(self.handles)

    def start(self) -> None:
        """Wait until every engine has started, and remember who each worker is."""
        refs = [w.ready.remote() for w in self.handles]
        what = "the rollout workers' engines to start"
        if len(ray.wait(refs, num_returns=len(refs), timeout=self.timeout)[0]) < len(refs):
            raise WaitTimeout(f"waited {self.timeout:.0f} s for {what}")
        self.incarnations = [self.get(ref, what, actor=f"rollout worker {i}")[0]
                             for i, ref in enumerate(refs)]

    # --- any call ------------------------------------------------------------------------------

    def is_done(self, ref: ray.ObjectRef, timeout_s: float) -> bool:
        return bool(ray.wait([ref], timeout=timeout_s)[0])

    def get(self, refs, what: str, actor: str = ""):
        return get(refs, self.timeout, what, actor)

    # --- generation ----------------------------------------------------------------------------

    def generate(self, worker: int, prompts: list[Prompt], round_: int) -> Share:
        """Start `worker` on `prompts` for `round_`; it puts each group into the buffer."""
        return Share(round_, worker, prompts, self.handles[worker].stream.remote(prompts, round_))

    def finished(self, shares: list[Share]) -> tuple[list[tuple[Share, GenerationStats]], list[Share]]:
        """Of `shares`, those stored in the buffer (with their stats) and those lost because their
        worker died; any other failure raises."""
        if not shares:
            return [], []
        ready, _ = ray.wait([s.done for s in shares], num_returns=len(shares), timeout=0)
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

    def short(self) -> int:
        """Groups the batch being waited for still lacks."""
        return self.get(self.buffer.short.remote(), "the buffer's counts", actor="the rollout buffer")

    def generate_now(self, shares: list[list[Prompt]], round_: int) -> list[RolloutGroup]:
        """Worker i generates shares[i] (empty shares skipped); waits for every group."""
        refs = [self.handles[i].generate.remote(share, round_) for i, share in enumerate(shares) if share]
        return [g for groups, _ in self.get(refs, "the evaluation", actor="a rollout worker")
                for g in groups]

    # --- weights -------------------------------------------------------------------------------

    def call(self, method: str, *args, workers: Iterable[int] | None = None) -> dict[int, ray.ObjectRef]:
        """Call `method(*args)` on `workers` (default: all); returns each worker's result ref."""
        chosen = range(len(self)) if workers is None else workers
        return {i: getattr(self.handles[i], method).remote(*args) for i in chosen}

    def settle(self, calls: dict[int, ray.ObjectRef], what: str,
               others: dict[str, ray.ObjectRef] | None = None) -> Settled:
        """Wait for `calls` and `others` (other actors' sides of the same transfer, by actor
        name); sort the workers into done, dead and failed."""
        others = others or {}
        refs = [*calls.values(), *others.values()]
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
        for actor, ref in others.items():
            try:
                self.get(ref, what, actor)
            except ray.exceptions.RayTaskError as e:
                out.errors.append(e)
        return out

    # --- who is alive --------------------------------------------------------------------------

    def restarted(self) -> list[int]:
        """The workers Ray restarted since they were last seen (a restarting one is waited for)."""
        return [i for i in range(len(self)) if self._incarnation(i) != self.incarnations[i]]

    def await_restart(self, workers: Iterable[int]) -> None:
        """Wait until each of `workers` runs again, and count the restarts."""
        for i in workers:
            incarnation = self._incarnation(i)
            if incarnation != self.incarnations[i]:
                self.incarnations[i] = incarnation
                self.restarts += 1
                log.warning("rollout worker %d was restarted; bringing it up to date", i)

    def _incarnation(self, i: int) -> str:
        """Worker `i`'s incarnation once it is up: while Ray restarts it, calls fail at once as
        unavailable, so ask again until it answers or the timeout passes."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.get(self.handles[i].ready.remote(), f"rollout worker {i} to restart")[0]
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"waited {self.timeout:.0f} s for rollout worker {i} to restart") from None
                time.sleep(RESTART_POLL_S)
            except ray.exceptions.ActorDiedError:
                raise RunError(f"rollout worker {i} died and Ray could not restart it "
                               f"(cluster.max_worker_restarts={self.max_restarts})") from None
