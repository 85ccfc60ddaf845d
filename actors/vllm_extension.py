"""Methods mixed into vLLM's worker (`worker_extension_cls`) so new weights can be loaded in place.

They run where the model lives (the engine's worker process, one per tensor-parallel rank) and
are reached with `llm.collective_rpc(name, args=...)`; arguments are plain data.
"""

from __future__ import annotations

from common.weight_sync import BroadcastGroup, SharedWeights, TensorSpec


class WeightSyncExtension:
    """Receives weights by broadcast, from shared memory or from a safetensors file, and reloads
    them in place (vLLM re-packs them for its kernels)."""

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                          timeout_s: float, secret: str) -> None:
        self.leave_weight_group()
        # One group member per tensor-parallel rank: every rank loads the full tensors and
        # keeps its own shard.
        self._weight_group = BroadcastGroup(host, port, rank_offset + self.rank, world_size,
                                            device="cpu" if self.device.type == "cpu" else "cuda",
                                            timeout_s=timeout_s, secret=secret)

    def leave_weight_group(self) -> None:
        group = getattr(self, "_weight_group", None)
        if group is not None:
            group.close()
        self._weight_group = None

    def receive_broadcast(self, specs: list[tuple], buckets: list[list[int]]) -> None:
        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("receive_broadcast before join_weight_group")
        self.reload_weights(weights_iterator=group.receive(_specs(specs), buckets))

    def receive_shared(self, path: str, specs: list[tuple], version: int) -> None:
        shared = SharedWeights(path, _specs(specs))
        self.reload_weights(weights_iterator=shared.read(version))

    def load_file(self, path: str) -> None:
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=iter(load_file(path).items()))


def _specs(specs: list[tuple]) -> list[TensorSpec]:
    # collective_rpc carries plain tuples; rebuild the typed specs on arrival.
    return [TensorSpec(name, dtype, tuple(shape)) for name, dtype, shape in specs]
