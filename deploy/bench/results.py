"""Everything one benchmark run measured, as `bench.json` holds it (`dataclasses.asdict`). Each
section's result type lives beside the section that makes it; this module knows none of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from deploy.bench.machine import Machine


@dataclass
class Failed:
    """A section, or one weight-sync preset, that raised; the others' numbers still count."""

    error: str
    """The exception's type and message."""


@dataclass
class BenchResults:
    machine: Machine
    command: str
    """The command line that ran the benchmark."""
    started: str
    """Local date and time of the start."""
    settings: dict[str, object]
    """Every setting of the run, as a dict (each section's under its name)."""
    sections: dict[str, object] = field(default_factory=dict)
    """Each section's result by name: its result type, Failed if it raised, None if not run."""
    section_s: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds of each section run, by name."""
