"""The learner's side of every weight transfer: the weights as the engines take them, the
transport they go through (shared memory or a broadcast group, common/weight_sync.py), and how
many of them an update changed as the engines see them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from common.held import remove_unheld
from common.spans import Spans
from common.weight_sync import (
    SHARED_WEIGHTS,
    BroadcastChannel,
    SharedMemoryChannel,
    TensorSpec,
    WeightChannel,
    listen_socket,
    specs_of,
)
from learner import sharding

log = logging.getLogger(__name__)
# Engine changes are measured on every SAMPLE_STRIDE-th element of each parameter. A prime
# walks across a matrix's columns, and samples 1 KB apart read a 16th of the parameters' memory:
# every 16th element read all of it (a 64-byte cache line each), 32 ms a step on pythia-70m's
# shape, 4 ms now, with the share counted within 1% of the whole's on the tiny preset.
SAMPLE_STRIDE = 257


class WeightSender:
    """Sends one learner rank's model; on a sharded learner every rank goes through the weights
    (each gathers its shards with the others) and rank 0 alone sends them."""

    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype, device: str,
                 rank: int, sharded: bool, spans: Spans, adapter_only: bool = False):
        self.model, self.compute_dtype, self.device = model, compute_dtype, device
        self.adapter_only = adapter_only
        """A peft model whose LoRA adapter alone trains: only the adapter is sent."""
        self.rank, self.sharded, self.spans = rank, sharded, spans
        self.channel: WeightChannel | None = None
        """The open transport, or None."""
        self._socket = None  # the broadcast group's port, bound before the group forms

    # --- what is sent ---------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights as the engines take them, one at a time: whole (a sharded one gathered
        from every rank, so every rank must go through them all), in the dtype they are sent in."""
        for name, t in self._state().items():
            yield name, sharding.full(t).to(self.sent_dtype(t))

    def _state(self) -> dict[str, torch.Tensor]:
        """What the engines take: the model's state dict, or its LoRA adapter's under the names
        of peft's adapter file (`base_model.model.<module>.lora_A.weight`), which vLLM's LoRA
        loader reads (vllm/lora/utils.py, parse_fine_tuned_lora_name)."""
        if not self.adapter_only:
            return self.model.state_dict()
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def sent_dtype(self, t: torch.Tensor) -> torch.dtype:
        """Floating-point weights go in the compute dtype (bfloat16: half the bytes of float32)."""
        return self.compute_dtype if t.is_floating_point() else t.dtype

    def specs(self) -> list[TensorSpec]:
        return specs_of((name, torch.empty(t.shape, dtype=self.sent_dtype(t), device="meta"))
                        for name, t in self._state().items())

    # --- the transport --------------------------------------------------------------------------

    def open_shared(self, path: str) -> None:
        """Send weights through a file in shared memory at `path` (engines on this node)."""
        self.close()  # first: closing a channel at the same path removes its file
        for orphan in remove_unheld(SHARED_WEIGHTS.format("*")):
            log.info("removed %s, left by a learner that is gone", orphan)
        self.channel = SharedMemoryChannel(path, self.specs(), owner=True)

    def open_group(self, host: str, port: int) -> int:
        """Bind the broadcast group's rendezvous port (0: any free one) on `host`, this node's
        address, and return it; `connect_group` then forms the group."""
        self.close()
        self._socket = listen_socket(host, port)
        return self._socket.getsockname()[1]

    def connect_group(self, world_size: int, buckets: list[list[int]], timeout_s: float,
                      secret: str) -> None:
        """Rank 0 of the weight group; returns once every engine has joined."""
        host, port = self._socket.getsockname()[:2]
        sock, self._socket = self._socket, None  # the group's store owns it now
        self.channel = BroadcastChannel(host, port, 0, world_size, self.specs(), buckets,
                                        device=self.device, timeout_s=timeout_s, secret=secret,
                                        sock=sock)

    def send(self, version: int) -> float:
        """Send the current weights as policy `version`; returns the seconds it took. The other
        ranks only help gather the shards."""
        start = time.perf_counter()
        if self.rank != 0:
            for _ in self.named_weights():
                pass
            return time.perf_counter() - start
        weights = self.named_weights()
        try:
            with torch.no_grad(), self.spans.span("send weights"):
                self.channel.send(weights, version)
        except BaseException:
            # A member is gone: leave the group at once, so the engines still in the broadcast
            # fail now rather than at cluster.weight_sync_timeout_s; the driver forms it again.
            self.close()
            if self.sharded:  # the other ranks gather every tensor with this one: finish with them
                with torch.no_grad():
                    for _ in weights:
                        pass
            raise
        return time.perf_counter() - start

    def close(self) -> None:
        """Leave the weight transport (removing the shared-memory file, if any, and aborting a
        broadcast group's communicator)."""
        if self.channel is not None:
            self.channel.close()
        if self._socket is not None:
            self._socket.close()
        self.channel = self._socket = None

    # --- what an update changed -----------------------------------------------------------------

    def sample(self) -> list[torch.Tensor]:
        """Every SAMPLE_STRIDE-th element of this rank's trained parameters (its shards) as the
        engines hold them, in the compute dtype: a whole copy would cost half the model's memory
        again on a GPU, every step."""
        return [_sampled(p).to(self.compute_dtype, copy=True)
                for p in self.model.parameters() if p.requires_grad]

    def changed_since(self, before: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """How many of the sampled parameters changed since `before` as the engines see them (on
        the device, unread): a learning rate too small for their dtype shows as none, while the
        loss looks normal."""
        after = self.sample()
        changed = torch.stack([(a != b).sum() for a, b in zip(after, before)]).sum()
        return {"changed": changed.to(torch.float64),
                "parameters": torch.tensor(float(sum(b.numel() for b in before)),
                                           dtype=torch.float64, device=changed.device)}


def _sampled(parameter: torch.Tensor) -> torch.Tensor:
    """Every SAMPLE_STRIDE-th element of `parameter`, counted from its first: of an FSDP shard,
    the elements of the whole that fall in it, so that ranks together sample what one rank
    does. FSDP2 shards a parameter's rows (dim 0: torch/distributed/fsdp/_fully_shard/
    _fsdp_param.py, FSDPParam._init_sharded_param), so a shard is one run of the flat whole,
    beginning where its first row does (torch/distributed/tensor/_utils.py,
    compute_local_shape_and_global_offset, as DCP uses it)."""
    flat, first = _local(parameter).reshape(-1), 0
    if hasattr(parameter, "device_mesh") and parameter.numel():
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(parameter.shape, parameter.device_mesh,
                                                          parameter.placements)
        first = -offset[0] * (parameter.numel() // parameter.shape[0]) % SAMPLE_STRIDE
    return flat[first::SAMPLE_STRIDE]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (its FSDP shard), detached."""
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach()
