"""Waiting on the actors' calls: a timeout names what was waited for, a death names who died."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from common.errors import RunError, WaitTimeout


class ActorDied(RunError):
    """An actor the run cannot go on without died, or could not start (`at_start`)."""

    def __init__(self, message: str, at_start: bool):
        super().__init__(message)
        self.at_start = at_start


def get(refs, timeout_s: float, what: str, actor: str = ""):
    """`ray.get` with a timeout whose message names what was waited for; if `actor` names the
    actor behind `refs`, its death is an `ActorDied` that says which it was."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise WaitTimeout(f"waited {timeout_s:.0f} s for {what}") from None
    except ray.exceptions.RayActorError as e:
        if not actor:
            raise
        if e.actor_init_failed:  # its constructor raised: the cause is the message, not a crash
            raise ActorDied(f"{actor} could not start: {_last_line(str(e))}", at_start=True) from None
        raise ActorDied(f"{actor} died ({type(e).__name__})", at_start=False) from None


def ready(ref: ray.ObjectRef, wait_s: float) -> bool:
    """Whether the call behind `ref` has finished, waiting up to `wait_s`."""
    return bool(ray.wait([ref], timeout=wait_s)[0])


def _last_line(text: str) -> str:
    """The exception line at the end of a remote traceback."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


@dataclass
class Call:
    """A call in progress on one actor, and the words to wait for it with."""

    ref: ray.ObjectRef
    what: str
    """What its result is, as a timeout says it: "learner step 3"."""
    actor: str
    """Who answers it, as a death says it: "the learner"."""
    timeout_s: float

    def result(self) -> Any:
        return get(self.ref, self.timeout_s, self.what, self.actor)

    def done(self, wait_s: float) -> bool:
        return ready(self.ref, wait_s)
