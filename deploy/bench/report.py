"""The benchmark's outputs: `bench.json` (everything measured), `bench.md` (a table per section,
and the targets each section's numbers are held to) and `bench.png` (a chart per section), each
labelled with the machine, the model shape and the configuration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from deploy.bench import render
from deploy.bench.peak import PeakResult
from deploy.bench.results import BenchResults, Failed
from deploy.bench.sections import SECTIONS

NOTES = [
    "- Every throughput is best of a few repeats after a warm-up (generation, scaling, weight "
    "sync), or the steady state of a run after its first steps (end to end).",
    "- Model FLOPs (`deploy/bench/flops.py`): per token 2 L (4 h^2 + 2 h ffn) + 4 L h ctx, plus "
    "2 h V where logits are needed; prompts are prefilled once per prompt; training is 3x the "
    "forward over prompt and completion. Padding and recomputation do not count.",
    "- Roofline floors (`deploy/bench/roofline.py`): a phase takes at least its FLOPs at the "
    "matmul peak of the dtype it computes in and at least the bytes it must move (weights, keys "
    "and values, AdamW state) at the measured copy bandwidth; its floor is the larger.",
    "- Ours (end to end) runs as users run it, `python -m deploy.train`, with the project's "
    "resources (by default one CPU for the learner and one per rollout worker); TRL runs "
    "`GRPOTrainer` (HF `generate`, no vLLM) with the same number of threads in total. Each runs "
    "in a process of its own, its start-up counted from that process's start.",
]


def write(out: Path, results: BenchResults) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(dataclasses.asdict(results), indent=1,
                                               default=str))
    (out / "bench.md").write_text(markdown(results))
    plot(results, out / "bench.png")


def _measured(results: BenchResults) -> dict[str, object]:
    """The sections that ran and did not fail, by name, in the table's order."""
    return {name: r for name in SECTIONS
            if (r := results.sections.get(name)) is not None and not isinstance(r, Failed)}


def markdown(results: BenchResults) -> str:
    lines = ["# Throughput benchmark", "",
             f"*Machine*: {results.machine.summary}. "
             f"*Run*: {results.started}, `{results.command}`.", ""]
    if results.settings.get("smoke"):
        lines += ["**Smoke run**: tiny shapes and a step or two, to check the harness; the numbers "
                  "mean nothing.", ""]
    measured = _measured(results)
    targets = [row for name, r in measured.items() if SECTIONS[name].targets
               for row in SECTIONS[name].targets(r)]
    if targets:
        lines += ["## Targets", "", *render.table(["what", "target", "measured", "met"], targets)]
    for name, section in SECTIONS.items():
        result = results.sections.get(name)
        if result is None:
            continue
        lines += [f"## {section.title}", ""]
        lines += ([f"**Failed**: `{result.error[:500]}`", ""] if isinstance(result, Failed)
                  else section.markdown(result))
    return "\n".join([*lines, "## How the numbers are made", "", *NOTES, ""])


def plot(results: BenchResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(SECTIONS[name].chart, r) for name, r in _measured(results).items()
              if SECTIONS[name].chart]
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax, (chart, result) in zip(axes.flat, panels):
        chart(ax, result)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    title = results.machine.summary
    peak = results.sections.get("peak")
    if isinstance(peak, PeakResult):
        title += (f"; matmul peak {peak.gflops('float32'):.0f} GFLOP/s float32, "
                  f"{peak.gflops('bfloat16'):.0f} bfloat16; {peak.bandwidth_gb_s:.0f} GB/s")
    if results.settings.get("smoke"):
        title = "SMOKE RUN (numbers mean nothing) - " + title
    fig.suptitle(render.wrap(title, 140), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
