"""Throughput benchmark of this project's GRPO loop, side by side with TRL's GRPOTrainer.

    make bench                                              # everything, into bench-out/
    python -m deploy.bench --only generation,weight_sync    # some sections
    python -m deploy.bench --smoke --out /tmp/bench         # tiny shapes, a minute or two
    python -m deploy.bench --help                           # every setting

Sections (`--only`): `peak` (float32 matmul peak, measured first: every fraction of peak is
against it), `generation` (rollout path vs HF `generate`), `scaling` (1 vs 2 rollout workers),
`weight_sync` (shm and broadcast vs an in-memory copy), `e2e` (a GRPO step, sync and async, vs
TRL's GRPOTrainer), `time_to_reward` (seconds to mean reward 0.9 on `tiny`, vs TRL), `modes`
(synchronous, rounds ahead and in-flight weight updates side by side), `ranks` (the learner's
step on 1 and 2 FSDP2 ranks, with its share in collectives). Writes
bench.md, bench.json and bench.png into `--out`, after every section. Needs nothing else running
on the machine: it measures the whole of it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deploy.bench.end_to_end import EndToEndResult
    from deploy.bench.generation import GenerationResult
    from deploy.bench.machine import ModelShape
    from deploy.bench.modes import ModesResult
    from deploy.bench.peak import PeakResult
    from deploy.bench.ranks import RanksResult
    from deploy.bench.scaling import ScalingResult
    from deploy.bench.time_to_reward import TimeToRewardResult
    from deploy.bench.weight_sync import WeightSyncResult

# Run in this order: scaling before generation lets the smoke run share one cluster.
SECTIONS = ("peak", "scaling", "generation", "weight_sync", "e2e", "time_to_reward", "modes", "ranks")
log = logging.getLogger("grpo-ray.bench")


@dataclass
class Bench:
    only: str = ""
    """Comma-separated sections to run, of peak, generation, scaling, weight_sync, e2e,
    time_to_reward, modes, ranks; empty runs them all."""
    out: str = "bench-out"
    """Directory for bench.md, bench.json, bench.png and the runs' directories."""
    smoke: bool = False
    """Tiny shapes, one or two steps, short completions: checks the harness in a minute or two;
    the numbers mean nothing. Replaces the sizes below."""
    preset: str = "pythia-70m-shape"
    """Model of the generation, scaling and end-to-end sections."""
    threads: int = 2
    """Threads of each side of the generation comparison, of the matmul peak and of the memory
    copy (the machine's cores). End to end, TRL gets as many threads as our run uses in all."""
    repeats: int = 3
    """Timed repeats (after a warm-up) of each generation, scaling and weight-sync measurement."""
    group_size: int = 8
    """Completions per prompt (G) everywhere."""
    gen_batches: tuple[int, ...] = (16, 128)
    """Completions per generate call in the generation section (multiples of group_size); the
    largest is also the scaling section's batch."""
    gen_tokens: int = 64
    """Completion length of the generation and scaling sections."""
    e2e_batch: int = 16
    """Completions per GRPO step, end to end."""
    e2e_tokens: int = 64
    """Completion length, end to end."""
    e2e_lr: float | None = None
    """Learning rate, end to end; None is the preset's default."""
    e2e_lags: tuple[int, ...] = (0, 1)
    """Our end-to-end runs: buffer.max_policy_lag of each (0 synchronous, 1 asynchronous)."""
    e2e_steps: int = 6
    """Steps of each of our end-to-end runs."""
    e2e_warmup: int = 2
    """First steps left out of the steady-state throughput (ours and TRL's)."""
    trl_steps: int = 4
    """Steps of TRL's end-to-end run (8 to 12 s each on pythia-70m-shape on a 2-core CPU); the
    first e2e_warmup are left out as ours are."""
    sync_presets: tuple[str, ...] = ("tiny", "pythia-70m-shape", "pythia-410m-shape")
    """Models of the weight-sync section."""
    ttr_preset: str = "tiny"
    """Model of the time-to-reward section."""
    ttr_batch: int = 32
    """Completions per step of the time-to-reward runs (the issue's probe: 32 of 24 tokens)."""
    ttr_tokens: int = 24
    """Completion length of the time-to-reward runs."""
    ttr_lr: float = 3e-2
    """Learning rate of the time-to-reward runs (the random-init `tiny` needs a large one)."""
    ttr_threshold: float = 0.9
    """Mean reward of one step that counts as reached."""
    ttr_steps: int = 30
    """Steps of our time-to-reward runs (they run them all; the first step reaching counts)."""
    ttr_trl_steps: int = 30
    """Most steps of TRL's time-to-reward run (it stops at the first step reaching)."""
    ttr_lags: tuple[int, ...] = (0, 1)
    """Our time-to-reward runs: buffer.max_policy_lag of each (0 synchronous)."""
    ttr_in_flight: bool = True
    """Also a time-to-reward run one step ahead with weights updated in flight."""
    modes_preset: str = "pythia-70m-shape"
    """Model of the modes section."""
    modes_batch: int = 16
    """Completions per step of the modes section."""
    modes_tokens: int = 128
    """Most tokens per completion in the modes section (end of text allowed: lengths vary)."""
    modes_workers: int = 2
    """Rollout workers of the modes section (one CPU each)."""
    modes_steps: int = 12
    """Steps of each mode's run."""
    modes_lr: float | None = None
    """Learning rate of the modes section's runs; None is the preset's."""
    ranks_preset: str = "pythia-70m-shape"
    """Model of the ranks section (the learner alone, on 1 and 2 ranks)."""
    ranks_batch: int = 16
    """Completions per learner step in the ranks section."""
    ranks_tokens: int = 64
    """Prompt and completion tokens each, in the ranks section."""
    ranks_steps: int = 3
    """Timed learner steps per rank count (after one warm-up step, before one profiled)."""
    train_args: str = ""
    """Overrides for our runs and engines, as on deploy.train's command line, e.g.
    --train-args="--learner.threads 2 --rollout.threads 2"."""


# The smoke's end-to-end and time-to-reward runs are the same configuration, so each is run once.
SMOKE = dict(preset="tiny", threads=1, repeats=1, group_size=4, gen_batches=(16,), gen_tokens=8,
             e2e_batch=8, e2e_tokens=8, e2e_lr=3e-2, e2e_lags=(0,), e2e_steps=2, e2e_warmup=1,
             trl_steps=2, sync_presets=("tiny",), ttr_preset="tiny", ttr_batch=8, ttr_tokens=8,
             ttr_lr=3e-2, ttr_steps=2, ttr_trl_steps=2, ttr_lags=(0,), ttr_in_flight=False, modes_preset="tiny",
             modes_batch=8, modes_tokens=16, modes_steps=3, modes_lr=3e-2, ranks_preset="tiny",
             ranks_batch=8, ranks_tokens=8, ranks_steps=1)


def parse(argv: list[str]) -> tuple[Bench, list[str]]:
    import tyro

    args = tyro.cli(Bench, args=argv, description=__doc__)
    if args.smoke:
        args = dataclasses.replace(args, **SMOKE)
    sections = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}: "
                         f"choose from {', '.join(SECTIONS)}")
    if ("generation" in sections or "e2e" in sections) and "peak" not in sections:
        sections.insert(0, "peak")  # every fraction of peak needs this run's peak
    return args, [s for s in SECTIONS if s in sections]


class Benchmark:
    def __init__(self, args: Bench, sections: list[str], command: str):
        from common.config import Config
        from deploy.bench import machine
        from deploy.bench.cluster import ClusterPool
        from deploy.bench.end_to_end import Runner, our_config
        from deploy.bench.results import BenchResults

        self.args, self.sections = args, sections
        self.out = Path(args.out).resolve()
        self.extra = shlex.split(args.train_args)
        base: Config = our_config(args.preset, args.group_size, max(args.gen_batches),
                                  args.gen_tokens, None, 1, 0, self.extra)
        self.pool = ClusterPool(base)
        self.runner = Runner(self.out)
        self.results = BenchResults(machine=machine.info(), command=command,
                                    started=time.strftime("%Y-%m-%d %H:%M:%S"),
                                    settings=dataclasses.asdict(args))
        self.failed: list[str] = []

    def run(self) -> int:
        try:
            for name in self.sections:
                if name in ("e2e", "time_to_reward"):
                    self.pool.shutdown()  # a training run starts its own Ray
                self._section(name, getattr(self, name))
        finally:
            self.pool.shutdown()
        log.info("wrote %s/bench.md, bench.json, bench.png", self.out)
        if self.failed:
            log.error("failed sections: %s", ", ".join(self.failed))
        return 1 if self.failed else 0

    def _section(self, name: str, fn) -> None:
        from deploy.bench import report
        from deploy.bench.results import Failed

        log.info("=== %s", name)
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # one broken section must not cost the others' numbers
            log.exception("section %s failed", name)
            result = Failed(f"{type(e).__name__}: {e}")
            self.failed.append(name)
        setattr(self.results.sections, name, result)  # each section has its field in Sections
        self.results.section_s[name] = time.perf_counter() - start
        report.write(self.out, self.results)

    # --- sections ------------------------------------------------------------------------------

    @property
    def peak_gflops(self) -> float:
        from deploy.bench.peak import PeakResult

        peak = self.results.sections.peak
        if not isinstance(peak, PeakResult):
            raise RuntimeError("no matmul peak to measure against: the peak section failed")
        return peak.gflops

    def _shape(self, name: str) -> ModelShape:
        from common import models
        from deploy.bench import machine

        return machine.model_shape(name, models.resolve(name, self.pool.base.model.cache_dir))

    def peak(self) -> PeakResult:
        from deploy.bench import peak

        sizes = (1024, 2048) if self.args.smoke else (2048, 4096)
        return peak.measure(self.args.threads, sizes)

    def generation(self) -> GenerationResult:
        import ray

        from common import models
        from deploy.bench import generation, prompts

        a = self.args
        running = self.pool.get(a.preset, 1, a.threads)
        shape = self._shape(a.preset)
        model_dir = str(models.resolve(a.preset, running.cfg.model.cache_dir))
        hf = ray.remote(num_cpus=a.threads)(generation.HFGenerator).remote(model_dir, a.threads)
        try:
            batches = [generation.run(running, hf, prompts.first(running.cfg, b // a.group_size),
                                      a.group_size, shape, self.peak_gflops, a.repeats)
                       for b in a.gen_batches]
        finally:
            ray.kill(hf)
        r = running.cfg.rollout
        return generation.GenerationResult(model=shape, batches=batches, config={
            "G": a.group_size, "completion tokens": r.max_tokens, "temperature": r.temperature,
            "top_p": r.top_p, "threads each side": a.threads, "best of": a.repeats})

    def scaling(self) -> ScalingResult:
        from deploy.bench import prompts, scaling

        a = self.args
        running = self.pool.get(a.preset, 2, 1)
        batch = max(a.gen_batches)
        chosen = prompts.first(running.cfg, batch // a.group_size)
        one, two = scaling.run(running, chosen, a.group_size, a.repeats)
        config = {"completions": batch, "G": a.group_size,
                  "completion tokens": running.cfg.rollout.max_tokens,
                  "CPUs per worker": running.cfg.rollout.num_cpus, "best of": a.repeats}
        over = None
        if not a.smoke:  # a third cluster: worth it only for the real numbers
            crowded = self.pool.get(a.preset, 2, 1, threads=os.cpu_count() or 1)
            over = scaling.oversubscribed(crowded, chosen, a.group_size, a.repeats)
        return scaling.ScalingResult(model=self._shape(a.preset), config=config,
                                     completions=batch, one=one, two=two, oversubscribed=over)

    def weight_sync(self) -> WeightSyncResult:
        from deploy.bench import weight_sync
        from deploy.bench.results import Failed

        a = self.args
        # The running cluster's model first: its engines are already up.
        current = self.pool.current.cfg.model.name if self.pool.current else None
        order = sorted(a.sync_presets, key=lambda p: p != current)
        presets = {}
        for preset in order:
            try:
                running = self.pool.get(preset, 1)
                presets[preset] = weight_sync.run(running, self._shape(preset), a.threads,
                                                  a.repeats)
            except Exception as e:
                log.exception("weight sync of %s failed", preset)
                presets[preset] = Failed(f"{type(e).__name__}: {e}")
                self.failed.append(f"weight_sync {preset}")
        return weight_sync.WeightSyncResult(
            presets={p: presets[p] for p in a.sync_presets},
            config={"transports": "shm, broadcast (gloo)", "engines": 1,
                    "memcpy threads": a.threads, "best of": a.repeats})

    def e2e(self) -> EndToEndResult:
        from deploy.bench import end_to_end

        a = self.args
        cfg = end_to_end.our_config(a.preset, a.group_size, a.e2e_batch, a.e2e_tokens, a.e2e_lr,
                                    a.e2e_steps, 0, self.extra)
        return end_to_end.run(self.runner, cfg, self._shape(a.preset), self.peak_gflops,
                              a.e2e_lags, a.e2e_warmup, a.trl_steps)

    def time_to_reward(self) -> TimeToRewardResult:
        from deploy.bench import time_to_reward
        from deploy.bench.end_to_end import our_config

        a = self.args
        cfg = our_config(a.ttr_preset, a.group_size, a.ttr_batch, a.ttr_tokens, a.ttr_lr,
                         a.ttr_steps, 0, self.extra)
        return time_to_reward.run(self.runner, cfg, self._shape(a.ttr_preset), a.ttr_threshold,
                                  a.ttr_lags, a.ttr_trl_steps, a.ttr_in_flight)

    def modes(self) -> ModesResult:
        from deploy.bench import modes
        from deploy.bench.end_to_end import our_config

        a = self.args
        cfg = our_config(a.modes_preset, a.group_size, a.modes_batch, a.modes_tokens, a.modes_lr,
                         a.modes_steps, 0, ["--rollout.num-workers", str(a.modes_workers), *self.extra])
        return modes.run(self.runner, cfg, self._shape(a.modes_preset), a.e2e_warmup)

    def ranks(self) -> RanksResult:
        from deploy.bench import ranks
        from deploy.bench.end_to_end import our_config

        a = self.args
        cfg = our_config(a.ranks_preset, a.group_size, a.ranks_batch, a.ranks_tokens, None, 1, 0, self.extra)
        return ranks.run(cfg, self._shape(a.ranks_preset), a.threads, a.ranks_steps, a.ranks_tokens)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    args, sections = parse(argv)
    # Inherited by Ray's workers, which start with the first cluster.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = " ".join(["python -m deploy.bench", *map(shlex.quote, argv)])
    return Benchmark(args, sections, command).run()


if __name__ == "__main__":
    sys.exit(main())
