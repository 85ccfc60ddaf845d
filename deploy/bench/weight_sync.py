"""Weight sync: seconds for the learner's weights to reach an engine and be reloaded there, by
shared memory and by broadcast (gloo on CPU) in flat buckets and, to show what the buckets buy,
one collective per tensor; against a plain in-memory copy of the same bytes."""

from __future__ import annotations

import copy
import logging
import time
import uuid
from dataclasses import dataclass

import torch

from deploy.bench.machine import ModelShape
from deploy.bench.results import Failed

log = logging.getLogger(__name__)


@dataclass
class WeightSyncVariant:
    """One way of sending the weights: best of the timed pushes."""

    seconds: float
    """A whole push: the learner sends, the engine receives and reloads."""
    collectives: int
    """Buckets the weights travel in (one file for shared memory)."""
    learner_s: float
    """The learner's side alone, as it reports it."""
    engine_s: float
    """The engine's side alone (receive and reload), as it reports it."""
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


def memcpy_seconds(nbytes: int, threads: int, repeats: int) -> float:
    """Best time to copy one flat tensor of `nbytes` into a preallocated one."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)  # warm-up: touches every page of the destination once
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return best


def _timed_push(push) -> float:
    start = time.perf_counter()
    push.push(0)
    return time.perf_counter() - start


def _parts(push, running, repeats: int) -> tuple[float, float]:
    """Learner-side and engine-side seconds of one transfer, as each actor reports them."""
    import ray

    learner, worker = running.cluster.learner, running.cluster.workers[0]
    best_send = best_receive = float("inf")
    for _ in range(repeats):
        if push.name == "shm":  # the engine reads what the learner has written
            send = ray.get(learner.send_weights.remote())
            receive = ray.get(worker.receive_weights.remote(0))
        else:  # both sides of a broadcast run at once
            send, receive = ray.get([learner.send_weights.remote(), worker.receive_weights.remote(0)])
        best_send, best_receive = min(send, best_send), min(receive, best_receive)
    return best_send, best_receive


# (variant, transport, bucket MB): 0 MB puts every tensor in a bucket of its own.
VARIANTS = (("shm", "shm", 256), ("broadcast", "broadcast", 256), ("per_tensor", "broadcast", 0))


def run(running, model: ModelShape, threads: int, repeats: int) -> WeightSyncPreset:
    """Each variant from the learner to the cluster's first engine, best of `repeats` pushes
    each (after a warm-up push), through the training job's own transports."""
    from deploy.weight_push import BroadcastPush, weight_push
    from deploy.workers import RolloutWorkers

    one = running.first_worker()
    timed = []  # (seconds, collectives, learner_s, engine_s) of each variant, as in VARIANTS
    for variant, transport, bucket_mb in VARIANTS:
        cfg = copy.deepcopy(running.cfg)
        cfg.cluster.weight_sync, cfg.cluster.sync_bucket_mb = transport, bucket_mb
        workers = RolloutWorkers(one.workers, one.buffer, cfg)
        workers.start()
        push = weight_push(cfg, one, workers, run_id=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            push.push(0)
            seconds = min(_timed_push(push) for _ in range(repeats))
            collectives = len(push.buckets) if isinstance(push, BroadcastPush) else 1
            timed.append((seconds, collectives, *_parts(push, running, repeats)))
        finally:
            push.close()
        log.info("weight sync %s, %s: %.3f s for %.0f MB", running.cfg.model.name, variant,
                 seconds, push.nbytes / 1e6)
    memcpy_s = memcpy_seconds(push.nbytes, threads, repeats)
    shm, broadcast, per_tensor = (
        WeightSyncVariant(seconds=seconds, collectives=collectives, learner_s=learner_s,
                          engine_s=engine_s, vs_memcpy=seconds / memcpy_s)
        for seconds, collectives, learner_s, engine_s in timed)
    return WeightSyncPreset(model=model, bytes=push.nbytes, memcpy_s=memcpy_s,
                            memcpy_threads=threads, shm=shm, broadcast=broadcast,
                            per_tensor=per_tensor)
