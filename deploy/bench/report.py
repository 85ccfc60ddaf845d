"""The benchmark's outputs: `bench.json` (everything measured), `bench.md` (tables, with the
targets of the throughput issue) and `bench.png` (one chart per section), each labelled with the
machine, the model shape and the configuration."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from deploy.bench.results import BenchResults, Failed, Sections

if TYPE_CHECKING:
    from deploy.bench.end_to_end import EndToEndResult
    from deploy.bench.generation import GenerationResult
    from deploy.bench.machine import ModelShape
    from deploy.bench.modes import ModesResult
    from deploy.bench.ranks import RanksResult
    from deploy.bench.scaling import ScalingResult
    from deploy.bench.time_to_reward import TimeToRewardResult
    from deploy.bench.weight_sync import WeightSyncResult

R = TypeVar("R")


@dataclass(frozen=True)
class Targets:
    """Targets on the project's 2-core CPU machine (ratios from one run)."""

    e2e_vs_trl: float = 10.0
    """Completions/s of a GRPO step, ours over TRL's GRPOTrainer."""
    e2e_fraction: float = 0.5
    """Model FLOPs/s of a whole step over the matmul peak."""
    generation_fraction: float = 0.5
    """Model FLOPs/s of generation over the peak, at `generation_batch` completions or more."""
    generation_batch: int = 128
    """The fewest completions per call the generation target applies to."""
    ttr_vs_trl: float = 0.2
    """Wall time to reward 0.9, ours over TRL's."""
    sync_vs_memcpy: float = 3.0
    """Weight sync seconds over a plain copy of the same bytes."""


TARGETS = Targets()


def write(out: Path, results: BenchResults) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(dataclasses.asdict(results), indent=1,
                                               default=str))
    (out / "bench.md").write_text(markdown(results))
    plot(results, out / "bench.png")


def _measured(result: R | Failed | None) -> R | None:
    """A section's result, or None if it failed or was not run."""
    return None if isinstance(result, Failed) else result


# --- markdown ----------------------------------------------------------------------------------


def _f(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _f(c) for c in row) + " |"
              for row in rows]
    return lines + [""]


def _config_line(config: dict[str, object], model: ModelShape | None = None) -> str:
    cfg = ", ".join(f"{k} {v}" for k, v in config.items())
    return f"*Model*: {model.label}. *Config*: {cfg}." if model else f"*Config*: {cfg}."


def markdown(results: BenchResults) -> str:
    s = results.sections
    lines = ["# Throughput benchmark", "",
             f"*Machine*: {results.machine.summary}. "
             f"*Run*: {results.started}, `{results.command}`.", ""]
    if results.settings.get("smoke"):
        lines += ["**Smoke run**: tiny shapes and a step or two, to check the harness; the numbers "
                  "mean nothing.", ""]
    peak = _measured(s.peak)
    if peak:
        sizes = ", ".join(f"n={n}: {g:.0f}" for n, g in peak.gflops_by_size.items())
        lines += ["## Float32 matmul peak", "",
                  f"**{peak.gflops:.0f} GFLOP/s** on {peak.threads} thread(s): best of "
                  f"{peak.repeats} `torch.mm` of n x n float32 matrices ({sizes} GFLOP/s).", ""]
    lines += _targets(s)
    for title, result, render in (
        ("Generation: rollout path vs Hugging Face `generate`", s.generation, _generation),
        ("End to end: a GRPO step, ours vs TRL's GRPOTrainer", s.e2e, _e2e),
        ("Weight sync: learner to engine, reloaded, vs an in-memory copy", s.weight_sync,
         _weight_sync),
        ("Scaling: 1 vs 2 rollout workers", s.scaling, _scaling),
        ("Time to reward", s.time_to_reward, _time_to_reward),
        ("Weight-update modes: synchronous, rounds ahead, in flight", s.modes, _modes),
        ("The learner on 1 and 2 ranks (FSDP2)", s.ranks, _ranks),
    ):
        if result is None:
            continue
        lines += [f"## {title}", ""]
        if isinstance(result, Failed):
            lines += [f"**Failed**: `{result.error[:500]}`", ""]
            continue
        lines += render(result)
    lines += ["## How the numbers are made", "", *NOTES, ""]
    return "\n".join(lines)


NOTES = [
    "- Every throughput is best of a few repeats after a warm-up (generation, scaling, weight "
    "sync), or the steady state of a run after its first steps (end to end).",
    "- Model FLOPs (`deploy/bench/flops.py`): per token 2 L (4 h^2 + 2 h ffn) + 4 L h ctx, plus "
    "2 h V where logits are needed; prompts are prefilled once per prompt; training is 3x the "
    "forward over prompt and completion. Padding and recomputation do not count.",
    "- Ours (end to end) runs `deploy.train.run` with the project's resources (by default one "
    "CPU for the learner and one per rollout worker); TRL runs `GRPOTrainer` (HF `generate`, no "
    "vLLM) in its own process with the same number of threads in total.",
]


def _targets(s: Sections) -> list[str]:
    t, rows = TARGETS, []
    e2e = _measured(s.e2e)
    for run in e2e.ours if e2e else []:
        rows.append([f"end to end {run.mode}: completions/s vs TRL", f">= {t.e2e_vs_trl:.0f}x",
                     f"{run.vs_trl:.1f}x", _met(run.vs_trl >= t.e2e_vs_trl)])
        rows.append([f"end to end {run.mode}: model FLOPs/s vs peak",
                     f">= {_pct(t.e2e_fraction)}", _pct(run.fraction_of_peak),
                     _met(run.fraction_of_peak >= t.e2e_fraction)])
    gen = _measured(s.generation)
    big = [b for b in gen.batches if b.completions >= t.generation_batch] if gen else []
    if big:
        b = max(big, key=lambda b: b.ours.fraction_of_peak)
        rows.append([f"generation at {b.completions} completions: model FLOPs/s vs peak",
                     f">= {_pct(t.generation_fraction)}", _pct(b.ours.fraction_of_peak),
                     _met(b.ours.fraction_of_peak >= t.generation_fraction)])
    ttr = _measured(s.time_to_reward)
    for side in ttr.ours if ttr else []:
        if side.vs_trl_incl_startup is not None:
            rows.append([f"time to reward {ttr.threshold}: {side.mode} vs TRL (incl. startup)",
                         f"<= {t.ttr_vs_trl:.1f}x", f"{side.vs_trl_incl_startup:.2f}x",
                         _met(side.vs_trl_incl_startup <= t.ttr_vs_trl)])
    sync = _measured(s.weight_sync)
    for preset, ws in sync.presets.items() if sync else []:
        if not isinstance(ws, Failed):
            best = min(ws.shm.vs_memcpy, ws.broadcast.vs_memcpy)
            rows.append([f"weight sync {preset}: best transport vs memcpy",
                         f"<= {t.sync_vs_memcpy:.0f}x", f"{best:.1f}x",
                         _met(best <= t.sync_vs_memcpy)])
    if not rows:
        return []
    return ["## Targets", "", *_table(["what", "target", "measured", "met"], rows)]


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _generation(g: GenerationResult) -> list[str]:
    rows = []
    for b in g.batches:
        o, e, h = b.ours, b.ours_engine, b.hf_generate
        rows.append([b.completions, "ours (rollout worker)", o.tokens_per_s, o.completions_per_s,
                     _pct(o.fraction_of_peak), f"{b.ratio_tokens_per_s:.1f}x"])
        rows.append([b.completions, "ours, engine only", e.tokens_per_s, "",
                     _pct(e.fraction_of_peak), ""])
        rows.append([b.completions, "HF generate (TRL's path)", h.tokens_per_s,
                     h.completions_per_s, _pct(h.fraction_of_peak), "1.0x"])
    header = ["completions", "side", "tokens/s", "completions/s", "model FLOPs vs peak", "ratio"]
    return [_config_line(g.config, g.model), "", *_table(header, rows)]


def _e2e(e: EndToEndResult) -> list[str]:
    rows = [[run.label, run.seconds_per_step, run.completions_per_s, run.tokens_per_s,
             _pct(run.fraction_of_peak), run.startup_s, run.steps_measured, f"{run.vs_trl:.1f}x"]
            for run in [*e.ours, e.trl]]
    header = ["run", "s/step", "completions/s", "tokens/s", "model FLOPs vs peak", "startup s",
              "steps measured", "vs TRL"]
    return [_config_line(e.config, e.model), "", *_table(header, rows),
            f"The step's arithmetic floor at the measured peak: {e.trl.floor_s_per_step:.2f} s.",
            ""]


def _weight_sync(w: WeightSyncResult) -> list[str]:
    rows = []
    for preset, r in w.presets.items():
        if isinstance(r, Failed):
            rows.append([preset, "-", "-", "-", "-", f"failed: {r.error[:80]}", "-"])
            continue
        shm, bc, one = r.shm, r.broadcast, r.per_tensor
        rows.append([preset, f"{r.bytes / 1e6:,.0f}", f"{r.memcpy_s:.4f}",
                     f"{shm.seconds:.3f} ({shm.learner_s:.3f} + {shm.engine_s:.3f})",
                     f"{shm.vs_memcpy:.1f}x",
                     f"{bc.seconds:.3f} in {bc.collectives} ({bc.vs_memcpy:.1f}x)",
                     f"{one.seconds:.3f} in {one.collectives} ({one.vs_memcpy:.1f}x)"])
    header = ["preset", "MB", "memcpy s", "shm s (learner write + engine reload)",
              "shm vs memcpy", "broadcast, 256 MB buckets: s in collectives",
              "broadcast, one tensor each: s in collectives"]
    return [_config_line(w.config), "", *_table(header, rows)]


def _scaling(sc: ScalingResult) -> list[str]:
    one, two, over = sc.one, sc.two, sc.oversubscribed
    rows = [[1, f"{one.cpus_each} ({one.threads_each})", one.tokens_per_s, one.completions_per_s,
             "1.00x"],
            [2, f"{two.cpus_each} ({two.threads_each})", two.tokens_per_s, two.completions_per_s,
             f"{sc.speedup:.2f}x ({_pct(sc.efficiency)} of linear)"]]
    if over:
        rows.append([2, f"{over.cpus_each} ({over.threads_each} threads: every core)",
                     over.tokens_per_s, over.completions_per_s,
                     f"{over.tokens_per_s / one.tokens_per_s:.2f}x"])
    header = ["workers", "CPUs (threads) each", "tokens/s", "completions/s", "speedup"]
    return [_config_line(sc.config, sc.model), "", *_table(header, rows)]


def _time_to_reward(t: TimeToRewardResult) -> list[str]:
    rows = []
    for side in [*t.ours, t.trl]:
        if side.reached:
            ratio = ("-" if side.vs_trl_incl_startup is None else
                     f"{side.vs_trl_incl_startup:.2f}x / {side.vs_trl_excl_startup:.2f}x")
            rows.append([side.label, side.step, side.seconds_incl_startup,
                         side.seconds_excl_startup, side.startup_s, ratio])
        else:
            missed = f"not in {side.steps_run} steps (best {side.best_reward:.3f})"
            rows.append([side.label, missed, "-", "-", side.startup_s, "-"])
    return [_config_line(t.config, t.model), "",
            *_table(["run", f"step reaching {t.threshold}", "s incl. startup", "s excl. startup",
                     "startup s", "vs TRL (incl. / excl.)"], rows)]


def _modes(m: ModesResult) -> list[str]:
    rows = [[r.mode, r.seconds_per_step, r.completions_per_s, r.mean_completion_tokens,
             _pct(r.engine_busy), _pct(r.learner_busy),
             f"{r.generate_s:.2f} / {r.train_s:.2f} / {r.sync_s:.2f}", f"{r.token_lag_mean:.2f}",
             _pct(r.mixed_version_frac)] for r in m.modes]
    header = ["mode", "s/step", "completions/s", "tokens per completion", "engines busy",
              "learner busy", "generate / train / sync s per step", "token lag",
              "completions from 2 versions"]
    return [_config_line(m.config, m.model), "", *_table(header, rows)]


def _ranks(r: RanksResult) -> list[str]:
    rows = [[x.ranks, x.threads_per_rank, x.seconds_per_step, x.communication_s,
             _pct(x.communication_share)] for x in r.ranks]
    header = ["ranks", "threads each", "s/step", "s in collectives (one step)", "share of the step"]
    return [_config_line(r.config, r.model), "", *_table(header, rows)]


# --- plot --------------------------------------------------------------------------------------


def plot(results: BenchResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results.sections
    charts = ((_plot_generation, s.generation), (_plot_e2e, s.e2e),
              (_plot_weight_sync, s.weight_sync), (_plot_scaling, s.scaling),
              (_plot_ttr, s.time_to_reward), (_plot_modes, s.modes))
    panels = [(fn, result) for fn, result in charts if _measured(result)]
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax, (fn, result) in zip(axes.flat, panels):
        fn(ax, result)
        model = getattr(result, "model", None)  # weight sync has one per preset
        cfg = ", ".join(f"{k} {v}" for k, v in result.config.items())
        ax.set_title(f"{ax.get_title()}\n{model.label if model else ''}\n{_wrap(cfg)}",
                     fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    peak = _measured(s.peak)
    title = results.machine.summary
    if peak:
        title += f"; float32 matmul peak {peak.gflops:.0f} GFLOP/s"
    if results.settings.get("smoke"):
        title = "SMOKE RUN (numbers mean nothing) - " + title
    fig.suptitle(_wrap(title, 140), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int = 90) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _bars(ax, labels: list[str], values: list[float], notes: list[str] | None = None) -> None:
    bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(values))])
    for bar, note in zip(bars, notes or [f"{v:,.1f}" for v in values]):
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def _plot_generation(ax, g: GenerationResult) -> None:
    labels, values, notes = [], [], []
    for b in g.batches:
        for side, name in ((b.ours, "ours"), (b.hf_generate, "HF generate")):
            labels.append(f"{name}\n{b.completions} compl.")
            values.append(side.tokens_per_s)
            notes.append(f"{side.tokens_per_s:,.0f} ({_pct(side.fraction_of_peak)} peak)")
    _bars(ax, labels, values, notes)
    ax.set(ylabel="tokens/s", title="Generation")


def _plot_e2e(ax, e: EndToEndResult) -> None:
    runs = [*e.ours, e.trl]
    _bars(ax, [run.label for run in runs], [run.completions_per_s for run in runs],
          [f"{run.completions_per_s:.2f} ({run.vs_trl:.1f}x)" for run in runs])
    ax.set(ylabel="completions/s", title="End to end GRPO step")


def _plot_weight_sync(ax, w: WeightSyncResult) -> None:
    import numpy as np

    presets = {name: r for name, r in w.presets.items() if not isinstance(r, Failed)}
    x = np.arange(len(presets))
    series = {"memcpy": [r.memcpy_s for r in presets.values()],
              "shm": [r.shm.seconds for r in presets.values()],
              "broadcast": [r.broadcast.seconds for r in presets.values()],
              "per tensor": [r.per_tensor.seconds for r in presets.values()]}
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - 1.5) * 0.2, values, 0.2, label=label)
    ax.set_xticks(x, list(presets), fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set(ylabel="seconds (log)", title="Weight sync")


def _plot_scaling(ax, sc: ScalingResult) -> None:
    values = [sc.one.tokens_per_s, sc.two.tokens_per_s]
    _bars(ax, ["1 worker", "2 workers"], values,
          [f"{values[0]:,.0f}", f"{values[1]:,.0f} ({sc.speedup:.2f}x)"])
    ax.set(ylabel="tokens/s", title="Scaling")


def _plot_ttr(ax, t: TimeToRewardResult) -> None:
    sides = [*t.ours, t.trl]
    _bars(ax, [side.label for side in sides],
          [side.seconds_incl_startup if side.reached else 0.0 for side in sides],
          [f"{side.seconds_incl_startup:.0f} s (step {side.step})" if side.reached
           else "not reached" for side in sides])
    ax.set(ylabel="seconds incl. startup", title=f"Time to mean reward {t.threshold}")


def _plot_modes(ax, m: ModesResult) -> None:
    _bars(ax, [r.mode for r in m.modes], [r.completions_per_s for r in m.modes],
          [f"{r.completions_per_s:.2f} (engines {_pct(r.engine_busy)}, learner {_pct(r.learner_busy)})"
           for r in m.modes])
    ax.set(ylabel="completions/s", title="Weight-update modes")
