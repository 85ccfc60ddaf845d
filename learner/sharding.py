"""A learner on several devices: `learner.num_ranks` processes (Ray actors) in one
torch.distributed group, the model sharded over them with PyTorch's FSDP2 (`fully_shard`). Rank 0
is the learner the driver talks to; it hands each call that touches the model to the other ranks
too, since every rank takes part in FSDP's collectives.

The update is the same for any number of ranks: each rank trains on its share of the batch's
sequences with the whole batch's normalisers, and FSDP sums the ranks' gradients (instead of its
default mean), so the summed gradient is the one-rank gradient up to the order of additions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from common.errors import RunError


def deal(lengths: list[int], ranks: int) -> list[list[int]]:
    """Sequence indices for each rank: the same number each (so every rank runs as many micro-
    batches, and FSDP's collectives pair up), dealt longest first in snake order (0, 1, ..., 1,
    0, ...) so the ranks' token counts stay close."""
    if len(lengths) % ranks:
        raise ValueError(f"{len(lengths)} sequences cannot be dealt evenly to {ranks} ranks")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for turn, i in enumerate(order):
        lap, seat = divmod(turn, ranks)
        shares[seat if lap % 2 == 0 else ranks - 1 - seat].append(i)
    return [sorted(share) for share in shares]


def init_group(host: str, port: int, rank: int, world_size: int, device: str, timeout_s: float) -> None:
    """Join the learner ranks' process group (gloo on CPUs, NCCL on GPUs)."""
    # On GPUs, CUDA tensors (FSDP's collectives) go over NCCL and CPU tensors (the metrics'
    # sums, the checkpoint's RNG states, barriers) over gloo: a group of "nccl" alone has no
    # backend for CPU tensors (torch/distributed/distributed_c10d.py, BackendConfig; object
    # collectives and barriers then take the CPU one: _get_object_coll_device).
    backend = "gloo" if device == "cpu" else "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


def shard(model: torch.nn.Module, compute_dtype: torch.dtype, device: str) -> None:
    """FSDP2 over every transformer layer and the root: parameters stay float32 shards (the
    optimizer's), gathered in the compute dtype for forward and backward; gradients are reduced
    in float32 and summed over the ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.gpt_neox.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # A plain sum, as each rank's loss carries the whole batch's normaliser: a factor of
            # 1 with sum-only reductions divides by nothing and needs no PREMUL_SUM, which gloo
            # lacks (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py,
            # _get_gradient_divide_factors).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters after a forward with no backward: FSDP keeps the root's
    gathered then, expecting the backward to need them (torch/distributed/fsdp/_fully_shard/
    _fsdp_state.py, FSDPState._lazy_init), and `parameters()` would give whole tensors."""
    if hasattr(model, "reshard"):
        model.reshard()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (every rank takes part), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def reduce_sums(values: dict[str, float], maxima: dict[str, float]) -> tuple[dict, dict]:
    """The ranks' `values` summed and `maxima` maxed, on every rank."""
    sums = torch.tensor(list(values.values()), dtype=torch.float64)
    tops = torch.tensor(list(maxima.values()), dtype=torch.float64)
    dist.all_reduce(sums)
    dist.all_reduce(tops, op=dist.ReduceOp.MAX)
    return dict(zip(values, sums.tolist())), dict(zip(maxima, tops.tolist()))


@contextmanager
def on_every_rank(peer_calls: list) -> Iterator[None]:
    """Rank 0's side of a learner call that touches the sharded model, made on every rank:
    `peer_calls` are the same call already started on the other ranks (each joins the
    collectives), and the block is rank 0's. Waits for them when the block ends, however it
    ends; a rank that died is named in one line."""
    try:
        yield
    finally:
        if peer_calls:  # none: one rank, or not rank 0, and no Ray needed (nor imported)
            import ray

            for rank, ref in enumerate(peer_calls, start=1):
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    raise RunError(f"learner rank {rank} died") from None
