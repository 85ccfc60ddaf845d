"""LoRA: what training an adapter saves, side by side with training every weight, per model
shape: the bytes each weight sync sends and the seconds shared memory takes to move them (the
learner writes its file, a reader copies every tensor out, as an engine's receive does; the
engine's load comes on top, the weight_sync section's subject), the learner's step time and
its peak memory. Each variant runs in a process of its own, so that its peak is its own; full
training is left out where its state (16 bytes per parameter) would not fit in half the
machine's memory. No engines, no Ray."""

from __future__ import annotations

import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from deploy.bench import render
from deploy.bench.machine import ModelShape
from deploy.bench.results import Failed

if TYPE_CHECKING:
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
TARGET_BYTES_RATIO = 50.0  # full weights over the adapter, per sync, at 410m-shape and rank 16


@dataclass
class Settings:
    """LoRA: bytes and seconds per sync, learner step time and peak memory, against full weights."""

    presets: tuple[str, ...] = ("pythia-410m-shape", "pythia-1.4b-shape")
    """Models trained."""
    rank: int = 16
    """The adapter's rank (learner.lora_rank), on every linear layer of a block."""
    batch: int = 8
    """Completions per learner step."""
    prompt_tokens: int = 32
    """Prompt length."""
    tokens: int = 64
    """Completion length."""
    steps: int = 2
    """Timed learner steps per variant (after one warm-up step)."""
    repeats: int = 3
    """Timed syncs per variant: the best counts."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(presets=("tiny",), rank=8, batch=4, prompt_tokens=8, tokens=8, steps=1, repeats=1)


@dataclass
class Variant:
    lora_rank: int
    """0: every weight trains."""
    trained_parameters: int
    sync_bytes: int
    """What one weight sync sends (the engines' dtype)."""
    sync_s: float | None
    """Shared memory: the learner writes, a reader copies every tensor out; best of the repeats."""
    seconds_per_step: float | None
    """The learner's step, median over the timed steps."""
    peak_rss_gib: float | None
    """The variant's process at its peak: weights, gradients, AdamW state and activations."""
    skipped: str = ""
    """Why it did not train, if it did not."""


@dataclass
class LoraPreset:
    model: ModelShape
    full: Variant
    lora: Variant
    bytes_ratio: float
    """Full weights' bytes over the adapter's, per sync."""


@dataclass
class LoraResult:
    config: dict[str, object]
    """What the numbers were measured with, as the report labels them."""
    presets: dict[str, LoraPreset | Failed]


def run(harness: Harness, s: Settings) -> LoraResult:
    presets = {}
    for preset in s.presets:
        try:
            shape = harness.shape(preset)
            fits = 16 * shape.params < psutil.virtual_memory().total / 2
            full = _variant(harness, s, preset, 0, train=fits)
            lora = _variant(harness, s, preset, s.rank, train=True)
            presets[preset] = LoraPreset(model=shape, full=full, lora=lora,
                                         bytes_ratio=full.sync_bytes / lora.sync_bytes)
            log.info("lora %s: %.1f MB against %.1f MB per sync (%.0fx)", preset,
                     lora.sync_bytes / 1e6, full.sync_bytes / 1e6, presets[preset].bytes_ratio)
        except Exception as e:
            log.exception("lora section, %s, failed", preset)
            presets[preset] = Failed(f"{type(e).__name__}: {e}")
            harness.failures.append(f"lora {preset}")
    return LoraResult(presets=presets, config={
        "rank": s.rank, "completions": s.batch, "prompt tokens": s.prompt_tokens,
        "completion tokens": s.tokens, "threads": harness.options.threads,
        "timed steps": s.steps, "syncs, best of": s.repeats})


def _variant(harness: Harness, s: Settings, preset: str, rank: int, train: bool) -> Variant:
    """One variant in a process of its own (`measure`), its result read back."""
    cfg = harness.config(model=preset, batch=s.batch, tokens=s.tokens,
                         extra=("--learner.lora-rank", str(rank),
                                "--learner.threads", str(harness.options.threads)))
    from common import config as config_lib

    job = {"config": config_lib.to_dict(cfg), "settings": asdict(s), "train": train}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "deploy.bench.lora", tmp], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the {preset} variant of rank {rank} exited {proc.returncode}: "
                               f"{proc.stderr[-2000:]}")
        return Variant(**json.loads((Path(tmp) / "result.json").read_text()))


def measure(cfg, s: Settings, train: bool) -> Variant:
    """In this process: sync the learner's weights `s.repeats` times through shared memory, then
    (if `train`) time its steps on a batch of random tokens."""
    from common.weight_sync import SharedMemoryChannel
    from deploy.bench.padding import spread_batch
    from learner.learner import Learner

    learner = Learner(cfg)
    trained = sum(p.numel() for p in learner.trainable())
    specs = learner.weight_specs()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        path = str(Path(shm) / "weights")
        learner.open_shared_weights(path)
        reader = SharedMemoryChannel(path, specs)
        syncs = []
        for version in range(s.repeats):
            start = time.perf_counter()
            learner.version = version
            learner.send_weights()
            copies = [t.clone() for _, t in reader.receive(version)]
            syncs.append(time.perf_counter() - start)
            del copies
        reader.close()
        learner.close_weight_sync()
    if not train:
        return Variant(lora_rank=cfg.learner.lora_rank, trained_parameters=trained,
                       sync_bytes=sum(x.nbytes for x in specs), sync_s=min(syncs),
                       seconds_per_step=None, peak_rss_gib=None,
                       skipped="its state (16 bytes per parameter) exceeds half the machine's memory")
    groups = spread_batch(cfg.grpo.group_size, s.batch // cfg.grpo.group_size, s.prompt_tokens,
                          s.tokens, s.tokens)
    learner.train(groups)  # warm-up: AdamW's state is made here
    seconds = statistics.median(learner.train(groups)["train_s"] for _ in range(s.steps))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB
    return Variant(lora_rank=cfg.learner.lora_rank, trained_parameters=trained,
                   sync_bytes=sum(x.nbytes for x in specs), sync_s=min(syncs),
                   seconds_per_step=seconds, peak_rss_gib=peak)


def markdown(r: LoraResult) -> list[str]:
    rows = []
    for preset, p in r.presets.items():
        if isinstance(p, Failed):
            rows.append([preset, f"failed: {p.error[:80]}", "-", "-", "-", "-", "-"])
            continue
        for name, v in (("full weights", p.full), (f"LoRA rank {p.lora.lora_rank}", p.lora)):
            rows.append([preset, name, f"{v.trained_parameters:,}",
                         f"{v.sync_bytes / 1e6:,.2f}", _num(v.sync_s, "{:.4f}"),
                         _num(v.seconds_per_step, "{:.2f}", v.skipped),
                         _num(v.peak_rss_gib, "{:.2f}", v.skipped)])
    header = ["model", "trains", "trained parameters", "MB per sync", "sync s (shm)",
              "learner s/step", "peak memory GiB"]
    ratios = [f"{preset}: {p.bytes_ratio:.0f}x fewer bytes per sync" for preset, p in r.presets.items()
              if not isinstance(p, Failed)]
    return [*render.labelled(r.config, None, header, rows), "; ".join(ratios) + ".", ""]


def _num(value: float | None, fmt: str, why: str = "") -> str:
    return fmt.format(value) if value is not None else ("not run" if why else "-")


def targets(r: LoraResult) -> list[list[str]]:
    p = r.presets.get("pythia-410m-shape")
    if p is None or isinstance(p, Failed):
        return []
    return [[f"LoRA rank {p.lora.lora_rank} at 410m-shape: fewer bytes per sync than full weights",
             f">= {TARGET_BYTES_RATIO:.0f}x", f"{p.bytes_ratio:.0f}x",
             render.met(p.bytes_ratio >= TARGET_BYTES_RATIO)]]


def main(directory: str) -> int:
    """A variant's process: job.json in `directory` in, result.json out."""
    from common import config_loading

    job = json.loads((Path(directory) / "job.json").read_text())
    cfg = config_loading.from_dict(job["config"])
    result = measure(cfg, Settings(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in job["settings"].items()}), job["train"])
    (Path(directory) / "result.json").write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
