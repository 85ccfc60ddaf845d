"""Throughput benchmark of this project's GRPO loop, side by side with TRL's GRPOTrainer.

    make bench                                              # everything, into bench-out/
    python -m deploy.bench --only generation,weight_sync    # some sections
    python -m deploy.bench --smoke --out /tmp/bench         # tiny shapes, a minute or two
    python -m deploy.bench --e2e.steps 10 --weight-sync.repeats 5   # a section's settings
    python -m deploy.bench --help                           # every setting, by section

Sections (`--only`), in the order they run: peak, scaling, generation, weight_sync, e2e,
learner, time_to_reward, modes, ranks, padding, lora, environments (`deploy/bench/sections.py`;
`--help` says what each measures).
Writes bench.md, bench.json and bench.png into `--out` after every section. Needs nothing else
running on the machine: it measures the whole of it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from deploy.bench.harness import Harness, Options
from deploy.bench.sections import SECTIONS

log = logging.getLogger("grpo-ray.bench")

# The shared options, then one group of options per section, named after it.
Bench = dataclasses.make_dataclass(
    "Bench", [(name, s.settings, dataclasses.field(default_factory=s.settings))
              for name, s in SECTIONS.items()], bases=(Options,))


def parse(argv: list[str]) -> tuple[Options, list[str]]:
    """The settings (each section's smoke variant with --smoke) and the sections to run."""
    import tyro

    args = tyro.cli(Bench, args=argv, description=__doc__)
    if args.smoke:
        args = dataclasses.replace(args, threads=1, group_size=4,
                                   **{name: s.settings.smoke() for name, s in SECTIONS.items()})
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}: "
                         f"choose from {', '.join(SECTIONS)}")
    if any(SECTIONS[s].uses_peak for s in chosen):
        chosen.append("peak")
    return args, [name for name in SECTIONS if name in chosen]


def run(args: Options, chosen: list[str], command: str) -> int:
    """Each chosen section in turn; the report is written again after each."""
    from deploy.bench import machine, report
    from deploy.bench.results import BenchResults, Failed

    out = Path(args.out).resolve()
    settings = dataclasses.asdict(args)
    results = BenchResults(machine=machine.info(), command=command, settings=settings,
                           started=time.strftime("%Y-%m-%d %H:%M:%S"),
                           sections=dict.fromkeys(SECTIONS))
    harness = Harness(args, results)
    try:
        for name in chosen:
            log.info("=== %s", name)
            start = time.perf_counter()
            try:
                results.sections[name] = SECTIONS[name].run(harness, vars(args)[name])
            except Exception as e:  # one broken section must not cost the others' numbers
                log.exception("section %s failed", name)
                results.sections[name] = Failed(f"{type(e).__name__}: {e}")
                harness.failures.append(name)
            results.section_s[name] = time.perf_counter() - start
            report.write(out, results)
    finally:
        harness.pool.shutdown()
    log.info("wrote %s/bench.md, bench.json, bench.png", out)
    if harness.failures:
        log.error("failed: %s", ", ".join(harness.failures))
    return 1 if harness.failures else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    args, chosen = parse(argv)
    # Inherited by Ray's workers, which start with the first cluster.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = " ".join(["python -m deploy.bench", *map(shlex.quote, argv)])
    return run(args, chosen, command)


if __name__ == "__main__":
    sys.exit(main())
