"""The benchmark's outputs: `bench.json` (everything measured), `bench.md` (tables, with the
targets of the throughput issue) and `bench.png` (one chart per section), each labelled with the
machine, the model shape and the configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

from deploy.bench import machine

# Targets on the project's 2-core CPU machine (ratios from one run).
TARGETS = {
    "e2e_vs_trl": 10.0,          # completions/s of a GRPO step, ours over TRL's GRPOTrainer
    "e2e_fraction": 0.5,         # model FLOPs/s of a whole step over the matmul peak
    "generation_fraction": 0.5,  # at >= 128 completions per call
    "generation_batch": 128,
    "ttr_vs_trl": 0.2,           # wall time to reward 0.9, ours over TRL's
    "sync_vs_memcpy": 3.0,       # weight sync seconds over a plain copy of the same bytes
}


def write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "bench.md").write_text(markdown(results))
    plot(results, out / "bench.png")


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


def _config_line(section: dict) -> str:
    cfg = ", ".join(f"{k} {v}" for k, v in section.get("config", {}).items())
    model = machine.shape_label(section["model"]) if "model" in section else ""
    return f"*Model*: {model}. *Config*: {cfg}." if model else f"*Config*: {cfg}."


def markdown(results: dict) -> str:
    s = results["sections"]
    lines = ["# Throughput benchmark", "",
             f"*Machine*: {machine.summary(results['machine'])}. "
             f"*Run*: {results.get('started', '')}, "
             f"`{results.get('command', 'python -m deploy.bench')}`.", ""]
    if results.get("settings", {}).get("smoke"):
        lines += ["**Smoke run**: tiny shapes and a step or two, to check the harness; the numbers "
                  "mean nothing.", ""]
    peak = s.get("peak", {})
    if "gflops" in peak:
        sizes = ", ".join(f"n={n}: {g:.0f}" for n, g in peak["gflops_by_size"].items())
        lines += ["## Float32 matmul peak", "",
                  f"**{peak['gflops']:.0f} GFLOP/s** on {peak['threads']} thread(s): best of "
                  f"{peak['repeats']} `torch.mm` of n x n float32 matrices ({sizes} GFLOP/s).", ""]
    lines += _targets(s)
    for name, title, render in (
        ("generation", "Generation: rollout path vs Hugging Face `generate`", _generation),
        ("e2e", "End to end: a GRPO step, ours vs TRL's GRPOTrainer", _e2e),
        ("weight_sync", "Weight sync: learner to engine, reloaded, vs an in-memory copy",
         _weight_sync),
        ("scaling", "Scaling: 1 vs 2 rollout workers", _scaling),
        ("time_to_reward", "Time to reward", _time_to_reward),
    ):
        if name not in s:
            continue
        lines += [f"## {title}", ""]
        if "error" in s[name]:
            lines += [f"**Failed**: `{s[name]['error'][:500]}`", ""]
            continue
        lines += render(s[name])
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


def _targets(s: dict) -> list[str]:
    t, rows = TARGETS, []
    e2e = s.get("e2e", {})
    if "trl" in e2e:
        for name in _ours(e2e):
            ratio, fraction = e2e[f"{name}_vs_trl"], e2e[name]["fraction_of_peak"]
            rows.append([f"end to end {name[5:]}: completions/s vs TRL",
                         f">= {t['e2e_vs_trl']:.0f}x", f"{ratio:.1f}x",
                         _met(ratio >= t["e2e_vs_trl"])])
            rows.append([f"end to end {name[5:]}: model FLOPs/s vs peak",
                         f">= {_pct(t['e2e_fraction'])}", _pct(fraction),
                         _met(fraction >= t["e2e_fraction"])])
    gen = s.get("generation", {}).get("batches", {})
    big = [b for b in gen.values() if b["completions"] >= t["generation_batch"]]
    if big:
        b = max(big, key=lambda b: b["ours"]["fraction_of_peak"])
        rows.append([f"generation at {b['completions']} completions: model FLOPs/s vs peak",
                     f">= {_pct(t['generation_fraction'])}", _pct(b["ours"]["fraction_of_peak"]),
                     _met(b["ours"]["fraction_of_peak"] >= t["generation_fraction"])])
    ttr = s.get("time_to_reward", {})
    for key, value in ttr.items():
        if key.endswith("_vs_trl_incl_startup"):
            run = key[len("ours_"):].split("_vs_")[0]
            rows.append([f"time to reward {ttr['threshold']}: {run} vs TRL (incl. startup)",
                         f"<= {t['ttr_vs_trl']:.1f}x", f"{value:.2f}x",
                         _met(value <= t["ttr_vs_trl"])])
    for preset, ws in s.get("weight_sync", {}).get("presets", {}).items():
        if "shm" in ws:
            best = min(ws["shm"]["vs_memcpy"], ws["broadcast"]["vs_memcpy"])
            rows.append([f"weight sync {preset}: best transport vs memcpy",
                         f"<= {t['sync_vs_memcpy']:.0f}x", f"{best:.1f}x",
                         _met(best <= t["sync_vs_memcpy"])])
    if not rows:
        return []
    return ["## Targets", "", *_table(["what", "target", "measured", "met"], rows)]


def _ours(section: dict) -> list[str]:
    """Our runs in a section, in the order they ran (sync first)."""
    return [k for k, v in section.items() if k.startswith("ours") and isinstance(v, dict)]


def _label(name: str) -> str:
    if name == "trl":
        return "TRL GRPOTrainer"
    if name == "ours_sync":
        return "ours, synchronous"
    lag = 1 if name == "ours_async" else int(name.removeprefix("ours_lag"))
    return f"ours, {lag} step{'s' if lag > 1 else ''} async"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _generation(g: dict) -> list[str]:
    rows = []
    for b in g["batches"].values():
        o, h = b["ours"], b["hf_generate"]
        rows.append([b["completions"], "ours (rollout worker)", o["tokens_per_s"],
                     o["completions_per_s"], _pct(o["fraction_of_peak"]),
                     f"{b['ratio_tokens_per_s']:.1f}x"])
        rows.append([b["completions"], "ours, engine only", o["engine_tokens_per_s"], "",
                     _pct(o["engine_fraction_of_peak"]), ""])
        rows.append([b["completions"], "HF generate (TRL's path)", h["tokens_per_s"],
                     h["completions_per_s"], _pct(h["fraction_of_peak"]), "1.0x"])
    header = ["completions", "side", "tokens/s", "completions/s", "model FLOPs vs peak", "ratio"]
    return [_config_line(g), "", *_table(header, rows)]


def _e2e(e: dict) -> list[str]:
    rows = []
    for name in [*_ours(e), "trl"]:
        side, label = e[name], _label(name)
        ratio = e.get(f"{name}_vs_trl", 1.0 if name == "trl" else None)
        rows.append([label, side["seconds_per_step"], side["completions_per_s"],
                     side["tokens_per_s"], _pct(side["fraction_of_peak"]), side["startup_s"],
                     side["steps_measured"], "-" if ratio is None else f"{ratio:.1f}x"])
    floor = e["trl"]["floor_s_per_step"]
    header = ["run", "s/step", "completions/s", "tokens/s", "model FLOPs vs peak", "startup s",
              "steps measured", "vs TRL"]
    return [_config_line(e), "", *_table(header, rows),
            f"The step's arithmetic floor at the measured peak: {floor:.2f} s.", ""]


def _weight_sync(w: dict) -> list[str]:
    rows = []
    for preset, r in w["presets"].items():
        if "error" in r:
            rows.append([preset, "-", "-", "-", "-", f"failed: {r['error'][:80]}", "-"])
            continue
        shm, bc, one = r["shm"], r["broadcast"], r["per_tensor"]
        rows.append([preset, f"{r['bytes'] / 1e6:,.0f}", f"{r['memcpy_s']:.4f}",
                     f"{shm['seconds']:.3f} ({shm['learner_s']:.3f} + {shm['engine_s']:.3f})",
                     f"{shm['vs_memcpy']:.1f}x",
                     f"{bc['seconds']:.3f} in {bc['collectives']} ({bc['vs_memcpy']:.1f}x)",
                     f"{one['seconds']:.3f} in {one['collectives']} ({one['vs_memcpy']:.1f}x)"])
    header = ["preset", "MB", "memcpy s", "shm s (learner write + engine reload)",
              "shm vs memcpy", "broadcast, 256 MB buckets: s in collectives",
              "broadcast, one tensor each: s in collectives"]
    return [_config_line(w), "", *_table(header, rows)]


def _scaling(sc: dict) -> list[str]:
    rows = [[n, f"{sc['cpus_per_worker']} ({sc['threads_per_worker']})", sc[f"workers_{n}"]["tokens_per_s"],
             sc[f"workers_{n}"]["completions_per_s"],
             "1.00x" if n == 1 else f"{sc['speedup']:.2f}x ({_pct(sc['efficiency'])} of linear)"]
            for n in (1, 2)]
    over = sc.get("oversubscribed")
    if over:
        rows.append([2, f"{sc['cpus_per_worker']} ({over['threads_per_worker']} threads: every core)",
                     over["tokens_per_s"], over["completions_per_s"],
                     f"{over['tokens_per_s'] / sc['workers_1']['tokens_per_s']:.2f}x"])
    header = ["workers", "CPUs (threads) each", "tokens/s", "completions/s", "speedup"]
    return [_config_line(sc), "", *_table(header, rows)]


def _time_to_reward(t: dict) -> list[str]:
    rows = []
    for name, side in t.items():
        if not (isinstance(side, dict) and "reached" in side):
            continue
        ratio_in = t.get(f"{name}_vs_trl_incl_startup")
        ratio_ex = t.get(f"{name}_vs_trl_excl_startup")
        if side["reached"]:
            ratio = "-" if ratio_in is None else f"{ratio_in:.2f}x / {ratio_ex:.2f}x"
            rows.append([_label(name), side["step"], side["seconds_incl_startup"],
                         side["seconds_excl_startup"], side["startup_s"], ratio])
        else:
            missed = f"not in {side['steps_run']} steps (best {side['best_reward']:.3f})"
            rows.append([_label(name), missed,
                         "-", "-", side["startup_s"], "-"])
    return [_config_line(t), "",
            *_table(["run", f"step reaching {t['threshold']}", "s incl. startup", "s excl. startup",
                     "startup s", "vs TRL (incl. / excl.)"], rows)]


# --- plot --------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = {k: v for k, v in results["sections"].items() if isinstance(v, dict) and "error" not in v}
    charts = (("generation", _plot_generation), ("e2e", _plot_e2e),
              ("weight_sync", _plot_weight_sync), ("scaling", _plot_scaling),
              ("time_to_reward", _plot_ttr))
    panels = [(name, fn) for name, fn in charts if name in s]
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax, (name, fn) in zip(axes.flat, panels):
        fn(ax, s[name])
        label = machine.shape_label(s[name]["model"]) if "model" in s[name] else ""
        cfg = ", ".join(f"{k} {v}" for k, v in s[name].get("config", {}).items())
        ax.set_title(f"{ax.get_title()}\n{label}\n{_wrap(cfg)}", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    peak = s.get("peak", {}).get("gflops")
    title = machine.summary(results["machine"])
    if peak:
        title += f"; float32 matmul peak {peak:.0f} GFLOP/s"
    if results.get("settings", {}).get("smoke"):
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


def _plot_generation(ax, g: dict) -> None:
    labels, values, notes = [], [], []
    for b in g["batches"].values():
        for key, side in (("ours", "ours"), ("hf_generate", "HF generate")):
            labels.append(f"{side}\n{b['completions']} compl.")
            values.append(b[key]["tokens_per_s"])
            notes.append(f"{b[key]['tokens_per_s']:,.0f} ({_pct(b[key]['fraction_of_peak'])} peak)")
    _bars(ax, labels, values, notes)
    ax.set(ylabel="tokens/s", title="Generation")


def _plot_e2e(ax, e: dict) -> None:
    names = [*_ours(e), "trl"]
    values = [e[k]["completions_per_s"] for k in names]
    notes = [f"{v:.2f} ({e.get(f'{k}_vs_trl', 1.0):.1f}x)" for v, k in zip(values, names)]
    _bars(ax, [_label(k) for k in names], values, notes)
    ax.set(ylabel="completions/s", title="End to end GRPO step")


def _plot_weight_sync(ax, w: dict) -> None:
    import numpy as np

    presets = [p for p, r in w["presets"].items() if "error" not in r]
    x = np.arange(len(presets))
    series = {"memcpy": [w["presets"][p]["memcpy_s"] for p in presets],
              "shm": [w["presets"][p]["shm"]["seconds"] for p in presets],
              "broadcast": [w["presets"][p]["broadcast"]["seconds"] for p in presets],
              "per tensor": [w["presets"][p]["per_tensor"]["seconds"] for p in presets]}
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - 1.5) * 0.2, values, 0.2, label=label)
    ax.set_xticks(x, presets, fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set(ylabel="seconds (log)", title="Weight sync")


def _plot_scaling(ax, sc: dict) -> None:
    values = [sc["workers_1"]["tokens_per_s"], sc["workers_2"]["tokens_per_s"]]
    _bars(ax, ["1 worker", "2 workers"], values,
          [f"{values[0]:,.0f}", f"{values[1]:,.0f} ({sc['speedup']:.2f}x)"])
    ax.set(ylabel="tokens/s", title="Scaling")


def _plot_ttr(ax, t: dict) -> None:
    labels, values, notes = [], [], []
    for name, side in t.items():
        if isinstance(side, dict) and "reached" in side:
            labels.append(_label(name))
            values.append(side["seconds_incl_startup"] if side["reached"] else 0.0)
            notes.append(f"{side['seconds_incl_startup']:.0f} s (step {side['step']})"
                         if side["reached"] else "not reached")
    _bars(ax, labels, values, notes)
    ax.set(ylabel="seconds incl. startup", title=f"Time to mean reward {t['threshold']}")
