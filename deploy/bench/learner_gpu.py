"""The learner alone on one GPU, without Ray or vLLM: what a session lent a GPU for a few minutes
can measure of the GPU path. In order: the GPU's bfloat16 matmul peak; mixed-precision GRPO steps
(float32 master weights and AdamW state, bfloat16 autocast) on pythia-410m-shape and
pythia-1.4b-shape, with seconds per step, model FLOP/s against that peak (MFU) and peak memory,
each also with a rank-16 LoRA adapter (learner.lora_rank);
a float16 step with loss scaling; a checkpoint saved and restored bit for bit; one NCCL
broadcast polled to its deadline, and the abort path a failure elsewhere takes. Writes
learner_gpu.json into --out.

    python -m deploy.bench.learner_gpu --out /tmp/bench      # a GPU: about 3 minutes
    python -m deploy.bench.learner_gpu --smoke                 # the CPU: the harness only

Needs torch, transformers, safetensors and pyyaml, and TRL (its `entropy_from_logits`) with what
it imports, and peft with accelerate (the LoRA steps): on the lent machine, carry the wheels of
trl, datasets, dill, multiprocess, peft and accelerate
(`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`, as the device tool's
README says) and install them into a --target on PYTHONPATH.

Not covered here: vLLM's PyNcclCommunicator (the engines' end, which needs vLLM's CUDA build)
and a sharded learner's DCP checkpoint (two ranks need two GPUs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import models
from common.config import Config, ModelConfig
from common.types import RunState
from deploy.bench import flops
from deploy.bench.machine import model_shape
from deploy.bench.ranks import batch

SHAPES = ("pythia-410m-shape", "pythia-1.4b-shape")


@dataclass
class StepResult:
    model: str
    dtype: str
    seconds_per_step: float
    """Median over the timed steps, after a warm-up step."""
    tflops: float
    """Model FLOPs of a step (forward and backward, deploy/bench/flops.py) per second."""
    mfu: float
    """tflops over the measured bfloat16 matmul peak."""
    peak_memory_gib: float
    loss_scale: float | None = None
    """float16 only: the GradScaler's scale after the step (finite, the step taken)."""
    lora_rank: int = 0
    """0: every weight trains; else the rank of the LoRA adapter that alone trains."""


def matmul_peak_tflops(device: str, n: int = 8192, repeats: int = 10) -> float:
    """Best bfloat16 TFLOP/s of an n x n matmul."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def steps(name: str, dtype: str, device: str, peak: float, prompts: int, group_size: int,
          prompt_tokens: int, completion_tokens: int, timed: int,
          lora_rank: int = 0) -> tuple[StepResult, object]:
    """GRPO steps of the learner on a synthetic batch; the result and the learner."""
    from learner.learner import Learner

    cfg = Config(model=ModelConfig(name=name, dtype=dtype))  # the model's own learning rate
    cfg.cluster.device = device
    cfg.grpo.group_size, cfg.grpo.batch_size = group_size, prompts * group_size
    cfg.rollout.max_tokens, cfg.learner.micro_batch_size = completion_tokens, 16
    cfg.model.max_model_len = prompt_tokens + completion_tokens
    cfg.learner.lora_rank = lora_rank
    groups = batch(group_size, prompts, prompt_tokens, completion_tokens)
    learner = Learner(cfg)
    if device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    learner.train(groups)  # warm-up
    times = []
    for _ in range(timed):
        _sync(device)
        start = time.perf_counter()
        learner.train(groups)
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    shape = model_shape(name, models.resolve(name))
    work = prompts * group_size * flops.training(shape, prompt_tokens, completion_tokens)
    if lora_rank:  # no weight gradients for the frozen model: forward and input gradients, 2 of 3
        work = work * 2 / 3
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "gpu" else 0.0
    scale = learner.scaler.get_scale() if dtype == "float16" else None
    return StepResult(model=name, dtype=dtype, seconds_per_step=seconds, tflops=work / seconds / 1e12,
                      mfu=work / seconds / 1e12 / peak, peak_memory_gib=memory, loss_scale=scale,
                      lora_rank=lora_rank), learner


def checkpoint_round_trip(learner) -> bool:
    """Save the learner's checkpoint, perturb the weights, load it: bit for bit as saved."""
    with tempfile.TemporaryDirectory() as run_dir:
        learner.save_checkpoint(run_dir, RunState(step=learner.version))
        saved = {k: v.clone() for k, v in learner.model.state_dict().items()}
        with torch.no_grad():
            for p in learner.model.parameters():
                p.add_(1.0)
        learner.load_checkpoint(run_dir)
        return all(torch.equal(saved[k], v) for k, v in learner.model.state_dict().items())


def broadcast_and_abort(device: str) -> dict[str, float | bool]:
    """One broadcast on a one-member NCCL group (gloo on a CPU), awaited as the weight channel
    awaits its collectives (common/weight_sync.py, wait_or_abort polling completion), then the
    abort path: a failure set in the group's store ends a wait within a poll."""
    import torch.distributed as dist

    from common.weight_sync import FAILED_KEY, WeightSyncError, listen_socket, rendezvous, wait_or_abort

    with listen_socket("127.0.0.1") as sock:
        port = sock.getsockname()[1]
    store = rendezvous("127.0.0.1", port, 0, 1, 30.0, "bench")
    backend = "nccl" if device == "gpu" else "gloo"
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        tensor = torch.ones(64 << 20, dtype=torch.uint8, device="cuda" if device == "gpu" else "cpu")
        start = time.perf_counter()
        work = dist.broadcast(tensor, src=0, async_op=True)
        wait_or_abort(work.is_completed, lambda: None, 30.0, lambda: store.check([FAILED_KEY]))
        work.wait()
        broadcast_s = time.perf_counter() - start
        store.set(FAILED_KEY, "bench")
        aborted, start = [], time.perf_counter()
        try:
            wait_or_abort(lambda: False, lambda: aborted.append(True), 30.0, lambda: store.check([FAILED_KEY]))
        except WeightSyncError:
            pass
        return {"broadcast_64mib_s": broadcast_s, "abort_s": time.perf_counter() - start,
                "aborted": aborted == [True]}
    finally:
        dist.destroy_process_group()


def run(device: str, smoke: bool) -> dict:
    shapes = ("tiny",) if smoke else SHAPES
    sizes = dict(prompts=2, group_size=2, prompt_tokens=8, completion_tokens=8, timed=1) if smoke \
        else dict(prompts=8, group_size=8, prompt_tokens=128, completion_tokens=256, timed=3)
    peak = matmul_peak_tflops("cuda" if device == "gpu" else "cpu", n=512 if smoke else 8192)
    out: dict = {"device": torch.cuda.get_device_name() if device == "gpu" else "cpu",
                 "bf16_peak_tflops": peak, "batch": sizes, "steps": []}
    learner = None
    for name in shapes:
        for rank in (16, 0):  # full training last: its learner's checkpoint is checked below
            del learner
            result, learner = steps(name, "bfloat16", device, peak, **sizes, lora_rank=rank)
            out["steps"].append(asdict(result))
            what = f"LoRA rank {rank}" if rank else "full"
            print(f"{name} bfloat16 {what}: {result.seconds_per_step:.3f} s/step, "
                  f"{result.tflops:.1f} TFLOP/s, MFU {100 * result.mfu:.1f}%, "
                  f"peak memory {result.peak_memory_gib:.1f} GiB", flush=True)
    out["checkpoint_bit_for_bit"] = checkpoint_round_trip(learner)
    del learner
    result, _ = steps(shapes[0], "float16", device, peak, **sizes)
    out["steps"].append(asdict(result))
    print(f"{shapes[0]} float16: {result.seconds_per_step:.3f} s/step, loss scale {result.loss_scale}",
          flush=True)
    out["broadcast"] = broadcast_and_abort(device)
    print(f"checkpoint bit for bit: {out['checkpoint_bit_for_bit']}; broadcast {out['broadcast']}", flush=True)
    return out


def _sync(device: str) -> None:
    if device in ("gpu", "cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out", help="directory for learner_gpu.json")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset on this machine's CPU")
    args = parser.parse_args(argv)
    device = "gpu" if torch.cuda.is_available() and not args.smoke else "cpu"
    results = run(device, args.smoke)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "learner_gpu.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
