"""Weight sync: seconds for the learner's weights to reach an engine and be reloaded there, by
shared memory and by broadcast (gloo on CPU) in flat buckets and, to show what the buckets buy,
one collective per tensor; against a plain in-memory copy of the same bytes. Each side's own
share is what the learner's and the engine's spans of those pushes say."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deploy.bench import render
from deploy.bench.machine import ModelShape
from deploy.bench.results import Failed

if TYPE_CHECKING:
    from common.config import Config
    from deploy.bench.cluster import Running
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)
TARGET_VS_MEMCPY = 3.0  # the best transport's seconds over a plain copy of the same bytes
# (variant, transport, bucket MB): 0 MB puts every tensor in a bucket of its own.
VARIANTS = (("shm", "shm", 256), ("broadcast", "broadcast", 256), ("per_tensor", "broadcast", 0))


@dataclass
class Settings:
    """Weight sync: learner to one engine, reloaded, vs an in-memory copy of the same bytes."""

    presets: tuple[str, ...] = ("tiny", "pythia-70m-shape", "pythia-410m-shape")
    """Models whose weights are sent."""
    repeats: int = 3
    """Timed pushes of each variant (after a warm-up): the best counts."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(presets=("tiny",), repeats=1)


@dataclass
class WeightSyncVariant:
    """One way of sending the weights: best of the timed pushes."""

    seconds: float
    """A whole push: the learner sends, the engine receives and reloads."""
    collectives: int
    """Buckets the weights travel in (one file for shared memory)."""
    learner_s: float
    """The learner's side alone (its `send weights` span)."""
    engine_s: float
    """The engine's side alone, receive and reload (its `reload` span)."""
    vs_memcpy: float
    """`seconds` over a plain in-memory copy of the same bytes."""


@dataclass
class WeightSyncPreset:
    model: ModelShape
    bytes: int
    """The weights' size."""
    memcpy_s: float
    """Best time to copy `bytes` in memory on `memcpy_threads` threads: the yardstick."""
    memcpy_threads: int
    shm: WeightSyncVariant
    """Through a file in /dev/shm."""
    broadcast: WeightSyncVariant
    """By broadcast (gloo on CPU) in 256 MB buckets."""
    per_tensor: WeightSyncVariant
    """By broadcast, one collective per tensor: what the buckets buy."""


@dataclass
class WeightSyncResult:
    config: dict[str, object]
    """What the numbers were measured with, as the report labels them."""
    presets: dict[str, WeightSyncPreset | Failed]
    """By preset name, in the order asked for; a preset that failed keeps its place."""


def run(harness: Harness, s: Settings) -> WeightSyncResult:
    """Each preset in turn, the running cluster's model first (its engines are already up)."""
    current = harness.pool.current.cfg.model.name if harness.pool.current else None
    measured = {}
    for preset in sorted(s.presets, key=lambda p: p != current):
        try:
            running = harness.pool.get(preset, 1)
            measured[preset] = measure(running, harness.shape(preset), harness.options.threads,
                                       s.repeats)
        except Exception as e:
            log.exception("weight sync of %s failed", preset)
            measured[preset] = Failed(f"{type(e).__name__}: {e}")
            harness.failures.append(f"weight_sync {preset}")
    return WeightSyncResult(presets={p: measured[p] for p in s.presets}, config={
        "transports": "shm, broadcast (gloo)", "engines": 1,
        "memcpy threads": harness.options.threads, "best of": s.repeats})


def measure(running: Running, model: ModelShape, threads: int, repeats: int) -> WeightSyncPreset:
    """Each variant from the learner to the cluster's first engine through the training job's own
    transports, best of `repeats` pushes each after a warm-up push."""
    variants = {}
    for variant, transport, bucket_mb in VARIANTS:
        cfg = copy.deepcopy(running.cfg)
        cfg.cluster.weight_sync, cfg.cluster.sync_bucket_mb = transport, bucket_mb
        variants[variant], nbytes = _pushes(running, cfg, repeats)
        log.info("weight sync %s, %s: %.3f s for %.0f MB", cfg.model.name, variant,
                 variants[variant].seconds, nbytes / 1e6)
    memcpy_s = memcpy_seconds(nbytes, threads, repeats)
    return WeightSyncPreset(model=model, bytes=nbytes, memcpy_s=memcpy_s, memcpy_threads=threads,
                            **{name: dataclasses.replace(v, vs_memcpy=v.seconds / memcpy_s)
                               for name, v in variants.items()})


def _pushes(running: Running, cfg: Config, repeats: int) -> tuple[WeightSyncVariant, int]:
    """The best of `repeats` pushes through `cfg`'s transport (against memcpy: not yet), with
    each side's best span; and the bytes pushed."""
    from deploy.clients import LearnerClient
    from deploy.weight_push import BroadcastPush, SharedMemoryPush, weight_push
    from deploy.workers import RolloutWorkers

    one = running.first_worker()
    learner = LearnerClient(one.learner, cfg.cluster.call_timeout_s)
    workers = RolloutWorkers(one.workers, cfg)
    workers.start()
    push = weight_push(cfg, one, learner, workers, run_id=f"bench-{uuid.uuid4().hex[:8]}")

    def push_afresh() -> None:
        if isinstance(push, SharedMemoryPush):
            push.written = -1  # the learner writes the file again, as for a new version
        push.push(0)

    try:
        push_afresh()
        learner.take_spans()  # the warm-up's
        workers.take_spans()
        seconds = min(_timed(push_afresh) for _ in range(repeats))
        sent = [span.seconds for span in learner.take_spans() if span.name == "send weights"]
        loaded = [span.seconds for span in workers.take_spans() if span.name == "reload"]
        buckets = len(push.buckets) if isinstance(push, BroadcastPush) else 1
        return WeightSyncVariant(seconds=seconds, collectives=buckets, learner_s=min(sent),
                                 engine_s=min(loaded), vs_memcpy=math.nan), push.nbytes
    finally:
        push.close()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memcpy_seconds(nbytes: int, threads: int, repeats: int) -> float:
    """Best time to copy one flat tensor of `nbytes` into a preallocated one."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)  # warm-up: touches every page of the destination once
        return min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    finally:
        torch.set_num_threads(before)


def markdown(w: WeightSyncResult) -> list[str]:
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
    return render.labelled(w.config, None, header, rows)


def targets(w: WeightSyncResult) -> list[list[str]]:
    rows = []
    for preset, ws in w.presets.items():
        if not isinstance(ws, Failed):
            best = min(ws.shm.vs_memcpy, ws.broadcast.vs_memcpy)
            rows.append([f"weight sync {preset}: best transport vs memcpy",
                         f"<= {TARGET_VS_MEMCPY:.0f}x", f"{best:.1f}x",
                         render.met(best <= TARGET_VS_MEMCPY)])
    return rows


def chart(ax, w: WeightSyncResult) -> None:
    import numpy as np

    presets = [r for r in w.presets.values() if not isinstance(r, Failed)]
    x = np.arange(len(presets))
    series = {"memcpy": [r.memcpy_s for r in presets], "shm": [r.shm.seconds for r in presets],
              "broadcast": [r.broadcast.seconds for r in presets],
              "per tensor": [r.per_tensor.seconds for r in presets]}
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - 1.5) * 0.2, values, 0.2, label=label)
    ax.set_xticks(x, [r.model.name for r in presets], fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    render.titled(ax, "Weight sync", "seconds (log)", w.config)
