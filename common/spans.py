"""Where every second goes: each actor records named spans of its work (with the step it served),
the driver collects them every step, computes the engines' and the learner's busy fractions, and
writes the run's timeline as a Chrome trace (`trace.json`, opens in ui.perfetto.dev or
chrome://tracing), one row per actor."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Span:
    name: str
    actor: str
    start: float
    """Seconds since the epoch (time.time), so spans of every process on a node line up."""
    seconds: float
    step: int | None = None


class Spans:
    """An actor's record of its spans, taken by the driver (`take`) as it goes."""

    def __init__(self, actor: str):
        self.actor = actor
        self.step: int | None = None
        """The step the actor is working for, as far as it knows; stamped on new spans."""
        self._spans: list[Span] = []
        self._lock = threading.Lock()  # the engine's thread records beside the actor's

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.add(name, start, time.time() - start)

    def since_process_start(self, name: str) -> None:
        """A span from this process's start to now: the interpreter and the imports an actor's
        construction waited for (Ray may have started the process before it was asked for)."""
        import psutil

        start = psutil.Process().create_time()
        self.add(name, start, time.time() - start)

    def add(self, name: str, start: float, seconds: float) -> None:
        with self._lock:
            self._spans.append(Span(name, self.actor, start, seconds, self.step))

    def take(self) -> list[Span]:
        with self._lock:
            spans, self._spans = self._spans, []
        return spans


def busy_fraction(spans: list[Span], names: set[str], start: float, end: float, actors: int) -> float:
    """The share of `actors` x [start, end] that spans named `names` cover (clipped to the window)."""
    covered = sum(max(0.0, min(s.start + s.seconds, end) - max(s.start, start))
                  for s in spans if s.name in names)
    return covered / max(end - start, 1e-9) / max(actors, 1)


class Trace:
    """The run's spans as Chrome trace events, written whole at each `write`."""

    def __init__(self, path: Path):
        self.path, self.events = path, []
        self._rows: dict[str, int] = {}

    def add(self, spans: list[Span]) -> None:
        for s in spans:
            row = self._rows.setdefault(s.actor, len(self._rows))
            self.events.append({"name": s.name, "ph": "X", "ts": s.start * 1e6, "dur": s.seconds * 1e6,
                                "pid": 1, "tid": row, "args": {"step": s.step}})

    def write(self) -> None:
        names = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": row, "args": {"name": actor}}
                 for actor, row in self._rows.items()]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"traceEvents": names + self.events, "displayTimeUnit": "ms"}))
        os.replace(tmp, self.path)
