"""What the report's tables and charts are made of: number formats, a markdown table, the line
that labels a section with its model and configuration, and a bar chart."""

from __future__ import annotations

import math
import textwrap

from deploy.bench.machine import ModelShape


def number(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else number(c) for c in row) + " |"
              for row in rows]
    return lines + [""]


def labelled(config: dict[str, object], model: ModelShape | None, header: list[str],
             rows: list[list]) -> list[str]:
    """A section's table under the line naming its model and configuration."""
    cfg = ", ".join(f"{k} {v}" for k, v in config.items())
    line = f"*Model*: {model.label}. *Config*: {cfg}." if model else f"*Config*: {cfg}."
    return [line, "", *table(header, rows)]


def wrap(text: str, width: int = 90) -> str:
    return "\n".join(textwrap.wrap(text, width))


def bars(ax, labels: list[str], values: list[float], notes: list[str] | None = None) -> None:
    bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(values))])
    for bar, note in zip(bars, notes or [f"{v:,.1f}" for v in values]):
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def titled(ax, title: str, ylabel: str, config: dict[str, object],
           model: ModelShape | None = None) -> None:
    """A chart's title with its model and configuration under it."""
    cfg = ", ".join(f"{k} {v}" for k, v in config.items())
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{model.label if model else ''}\n{wrap(cfg)}", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
