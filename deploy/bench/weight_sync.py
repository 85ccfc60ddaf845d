"""Weight sync: seconds for the learner's weights to reach an engine and be reloaded there, by
shared memory and by broadcast (gloo on CPU) in flat buckets and, to show what the buckets buy,
one collective per tensor; against a plain in-memory copy of the same bytes."""

from __future__ import annotations

import copy
import logging
import time
import uuid

import torch

log = logging.getLogger(__name__)


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


def _timed_push(sync) -> float:
    start = time.perf_counter()
    dead = sync.push(0)
    if dead:
        raise RuntimeError(f"rollout worker(s) {dead} died during a weight push")
    return time.perf_counter() - start


def _parts(sync, running, transport: str, repeats: int) -> dict:
    """Learner-side and engine-side seconds of one transfer, as each actor reports them."""
    import ray

    learner, worker = running.cluster.learner, running.cluster.workers[0]
    best: dict[str, float] = {}
    for _ in range(repeats):
        if transport == "shm":
            send = ray.get(learner.write_shared.remote(sync.path))
            receive = ray.get(worker.receive_shared.remote(sync.path, sync.specs, 0))
        else:
            send, receive = ray.get([learner.broadcast_weights.remote(sync.buckets),
                                     worker.receive_broadcast.remote(sync.specs, sync.buckets, 0)])
        best = {"learner_s": min(send, best.get("learner_s", send)),
                "engine_s": min(receive, best.get("engine_s", receive))}
    return best


# (variant, transport, bucket MB): 0 MB puts every tensor in a bucket of its own.
VARIANTS = (("shm", "shm", 256), ("broadcast", "broadcast", 256), ("per_tensor", "broadcast", 0))


def run(running, threads: int, repeats: int) -> dict:
    """Each variant from the learner to the cluster's first engine, best of `repeats` pushes
    each (after a warm-up push), through the training job's own `WeightSync`."""
    from deploy.sync import WeightSync

    one = running.first_worker()
    out: dict = {}
    for variant, transport, bucket_mb in VARIANTS:
        cfg = copy.deepcopy(running.cfg)
        cfg.cluster.weight_sync, cfg.cluster.sync_bucket_mb = transport, bucket_mb
        sync = WeightSync(cfg, one, run_id=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            sync.push(0)
            seconds = min(_timed_push(sync) for _ in range(repeats))
            out[variant] = {"seconds": seconds, "collectives": len(sync.buckets),
                            **_parts(sync, running, transport, repeats)}
        finally:
            sync.close()
        out["bytes"] = sync.nbytes
        log.info("weight sync %s, %s: %.3f s for %.0f MB", running.cfg.model.name, variant,
                 seconds, sync.nbytes / 1e6)
    out["memcpy_s"] = memcpy_seconds(out["bytes"], threads, repeats)
    out["memcpy_threads"] = threads
    for variant, _, _ in VARIANTS:
        out[variant]["vs_memcpy"] = out[variant]["seconds"] / out["memcpy_s"]
    return out
