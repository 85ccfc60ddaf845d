"""Everything one benchmark run measured, as `bench.json` holds it (`dataclasses.asdict`): each
section's result type lives beside the section that makes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deploy.bench.end_to_end import EndToEndResult
    from deploy.bench.generation import GenerationResult
    from deploy.bench.machine import Machine
    from deploy.bench.modes import ModesResult
    from deploy.bench.peak import PeakResult
    from deploy.bench.ranks import RanksResult
    from deploy.bench.scaling import ScalingResult
    from deploy.bench.time_to_reward import TimeToRewardResult
    from deploy.bench.weight_sync import WeightSyncResult


@dataclass
class Failed:
    """A section, or one weight-sync preset, that raised; the others' numbers still count."""

    error: str
    """The exception's type and message."""


@dataclass
class Sections:
    """Each section's result: Failed if it raised, None if it was not run."""

    peak: PeakResult | Failed | None = None
    scaling: ScalingResult | Failed | None = None
    generation: GenerationResult | Failed | None = None
    weight_sync: WeightSyncResult | Failed | None = None
    e2e: EndToEndResult | Failed | None = None
    time_to_reward: TimeToRewardResult | Failed | None = None
    modes: ModesResult | Failed | None = None
    ranks: RanksResult | Failed | None = None


@dataclass
class BenchResults:
    machine: Machine
    command: str
    """The command line that ran the benchmark."""
    started: str
    """Local date and time of the start."""
    settings: dict[str, object]
    """Every setting of the run (deploy.bench's `Bench`, as a dict)."""
    sections: Sections = field(default_factory=Sections)
    section_s: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds of each section run, by name."""
