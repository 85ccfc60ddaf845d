"""What every section runs with: the settings they share, the Ray cluster and the training runs
they reuse, the shapes of models, and the machine's limits that every floor is against."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from common import config_loading
from common.config import Config
from deploy.bench.cluster import ClusterPool
from deploy.bench.machine import ModelShape
from deploy.bench.peak import PeakResult
from deploy.bench.results import BenchResults
from deploy.bench.runs import Runner


@dataclass
class Options:
    only: str = ""
    """Comma-separated sections to run (see the section groups below); empty runs them all."""
    out: str = "bench-out"
    """Directory for bench.md, bench.json, bench.png and the runs' directories."""
    smoke: bool = False
    """Tiny shapes, one or two steps, short completions: checks the harness in a minute or two;
    the numbers mean nothing. Replaces every size below with its section's smoke variant."""
    threads: int = 2
    """Threads of the matmul peak, of each side of the generation comparison and of the memory
    copy (the machine's cores). End to end, TRL gets as many threads as our run uses in all."""
    group_size: int = 8
    """Completions per prompt (G) everywhere."""
    train_args: str = ""
    """Overrides for our runs and engines, as on deploy.train's command line, e.g.
    --train-args="--learner.threads 2 --rollout.threads 2"."""


class Harness:
    def __init__(self, options: Options, results: BenchResults):
        self.options, self.results = options, results
        self.extra = shlex.split(options.train_args)
        self.pool = ClusterPool(self.config(model="tiny", batch=options.group_size, tokens=64))
        self.runner = Runner(Path(options.out).resolve() / "runs", self.pool)
        self.failures: list[str] = []
        """Sections, and weight-sync presets, that raised."""

    def config(self, *, model: str, batch: int, tokens: int, lr: float | None = None,
               steps: int = 1, extra: tuple[str, ...] = ()) -> Config:
        """A training run of `model` (no eval split, one checkpoint at the end), with the
        section's `extra` and then `--train-args` on top, as on deploy.train's command line."""
        argv = ["--model.name", model, "--grpo.group-size", str(self.options.group_size),
                "--grpo.batch-size", str(batch), "--rollout.max-tokens", str(tokens),
                "--steps", str(steps), "--data.eval-split", "", "--learner.checkpoint-every", "0",
                "--logging.progress", "lines", *extra, *self.extra]
        if lr is not None:
            argv += ["--learner.learning-rate", str(lr)]
        return config_loading.from_args(argv)

    def shape(self, name: str) -> ModelShape:
        from common import models
        from deploy.bench import machine

        return machine.model_shape(name, models.resolve(name, self.pool.base.model.cache_dir))

    @property
    def peak(self) -> PeakResult:
        """The machine's limits (the peak section's), that every floor is against."""
        peak = self.results.sections.get("peak")
        if not isinstance(peak, PeakResult):
            raise RuntimeError("no matmul peak to measure against: the peak section failed")
        return peak

    @staticmethod
    def dtype(cfg: Config) -> str:
        """What a run of `cfg` computes in on this machine (`model.dtype auto` decided here)."""
        from common import models

        return str(models.torch_dtype(cfg.model.dtype, cfg.cluster.device)).removeprefix("torch.")
