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


def _timed_push(push) -> float:
    start = time.perf_counter()
    push.push(0)
    return time.perf_counter() - start


def _parts(push, running, repeats: int) -> dict:
    """Learner-side and engine-side seconds of one transfer, as each actor reports them."""
    import ray

    learner, worker = running.cluster.learner, running.cluster.workers[0]
    best: dict[str, float] = {}
    for _ in range(repeats):
        if push.name == "shm":  # the engine reads what the learner has written
            send = ray.get(learner.send_weights.remote())
            receive = ray.get(worker.receive_weights.remote(0))
        else:  # both sides of a broadcast run at once
            send, receive = ray.get([learner.send_weights.remote(), worker.receive_weights.remote(0)])
        best = {"learner_s": min(send, best.get("learner_s", send)),
                "engine_s": min(receive, best.get("engine_s", receive))}
    return best


# (variant, transport, bucket MB): 0 MB puts every tensor in a bucket of its own.
VARIANTS = (("shm", "shm", 256), ("broadcast", "broadcast", 256), ("per_tensor", "broadcast", 0))


def run(running, threads: int, repeats: int) -> dict:
    """Each variant from the learner to the cluster's first engine, best of `repeats` pushes
    each (after a warm-up push), through the training job's own transports."""
    from deploy.weight_push import BroadcastPush, weight_push
    from deploy.workers import RolloutWorkers

    one = running.first_worker()
    out: dict = {}
    for variant, transport, bucket_mb in VARIANTS:
        cfg = copy.deepcopy(running.cfg)
        cfg.cluster.weight_sync, cfg.cluster.sync_bucket_mb = transport, bucket_mb
        workers = RolloutWorkers(one.workers, one.buffer, cfg)
        workers.start()
        push = weight_push(cfg, one, workers, run_id=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            push.push(0)
            seconds = min(_timed_push(push) for _ in range(repeats))
            collectives = len(push.buckets) if isinstance(push, BroadcastPush) else 0
            out[variant] = {"seconds": seconds, "collectives": collectives,
                            **_parts(push, running, repeats)}
        finally:
            push.close()
        out["bytes"] = push.nbytes
        log.info("weight sync %s, %s: %.3f s for %.0f MB", running.cfg.model.name, variant,
                 seconds, push.nbytes / 1e6)
    out["memcpy_s"] = memcpy_seconds(out["bytes"], threads, repeats)
    out["memcpy_threads"] = threads
    for variant, _, _ in VARIANTS:
        out[variant]["vs_memcpy"] = out[variant]["seconds"] / out["memcpy_s"]
    return out
