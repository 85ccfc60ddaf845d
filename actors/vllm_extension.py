"""Methods mixed into vLLM's worker (`worker_extension_cls`) so new weights can be loaded in place.

They run where the model lives (the engine's worker, one per tensor-parallel rank) and are
reached with `llm.collective_rpc(name, args=...)`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn

import torch

from common.weight_sync import (
    BroadcastChannel,
    SharedMemoryChannel,
    TensorSpec,
    WeightChannel,
    WeightSyncError,
)

log = logging.getLogger(__name__)
EXIT_FOR_RESTART = 70  # EX_SOFTWARE: the process ended itself

if TYPE_CHECKING:
    # The class this one is mixed into (vLLM's CPUWorker subclasses it): its `rank`, `device`,
    # `get_model` and `reload_weights` are what the methods below use.
    from vllm.v1.worker.gpu_worker import Worker as _VllmWorker
else:
    _VllmWorker = object


class WeightSyncExtension(_VllmWorker):
    """Receives weights on one channel (a broadcast group or a shared-memory file) and loads them
    into the running engine, in place."""

    _channel: WeightChannel | None = None

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                          specs: list[TensorSpec], buckets: list[list[int]], timeout_s: float,
                          secret: str) -> None:
        # One group member per tensor-parallel rank: every rank loads the full tensors and
        # keeps its own shard. A group is never rejoined: the old one goes first.
        self.close_weight_sync()
        self._channel = BroadcastChannel(host, port, rank_offset + self.rank, world_size, specs,
                                         buckets, device="cpu" if self.device.type == "cpu" else "cuda",
                                         timeout_s=timeout_s, secret=secret)

    def open_shared_weights(self, path: str, specs: list[TensorSpec]) -> None:
        self.close_weight_sync()
        self._channel = SharedMemoryChannel(path, specs)

    def close_weight_sync(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None

    def receive_weights(self, version: int, adapter: dict | None = None) -> None:
        """Load policy `version` from the channel: the model's weights, or with `adapter` (peft's
        LoRA configuration) the LoRA adapter that replaces the engine's."""
        if self._channel is None:
            raise WeightSyncError("weights were sent before this engine joined a weight transport")
        try:
            weights = self._channel.receive(version)  # every tensor here: nothing loaded yet
        except BaseException:
            # Leave at once: the learner and the other engines are in a broadcast with this one,
            # and fail now instead of at cluster.weight_sync_timeout_s; the driver then forms
            # the group again and resends, to an engine whose weights are as they were.
            self.close_weight_sync()
            raise
        if adapter is not None:
            self._install_adapter(adapter, weights)  # whole or not at all: no restart needed
            return
        try:
            self._load(self._channel.specs, weights)
        except BaseException:
            # Part of the weights loaded (on a GPU, layers left on the meta device: vllm's
            # model_loader/reload/layerwise.py): this engine cannot be trusted, and is gone.
            # Ray restarts the worker and the driver brings the new one up to date.
            exit_for_restart(f"loading weights version {version} failed part-way")

    def _load(self, specs: list[TensorSpec], weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy into the engine's own parameters where each one is known, then let vLLM re-pack
        just the layers whose kernels hold packed copies. vLLM's general `reload_weights`
        re-allocates every tensor first, which costs more than the copy itself on a CPU; it
        remains the path for anything this one does not recognise, and for GPUs."""
        targets = self._targets(specs) if self.device.type == "cpu" else None
        if targets is None:
            self.reload_weights(weights_iterator=weights)
            return
        repack = {}
        for (module, attr), (_, tensor) in zip(targets, weights, strict=True):
            current = getattr(module, attr)
            if current.shape == tensor.shape:
                current.data.copy_(tensor)
            else:  # its weight lives only in the packed kernel: hand it the new one to pack
                setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
            if _has_packed_kernel(module):
                repack[id(module)] = module
        for module in repack.values():
            module.quant_method.process_weights_after_loading(module)

    def _install_adapter(self, config: dict, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Build a LoRA adapter from `weights` (peft's names) in memory and put it in place of
        the engine's, as vLLM's own loader does from a directory
        (vllm/lora/worker_manager.py, WorkerLoRAManager._load_adapter, then
        LRUCacheWorkerLoRAManager.add_adapter's remove, add and activate). Activating copies it
        into the adapter's slot in every LoRA layer (vllm/lora/model_manager.py,
        LoRAModelManager.activate_adapter), which the next step reads."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        from common.lora import ADAPTER_ID

        worker = self.model_runner.lora_manager  # vllm/v1/worker/lora_model_runner_mixin.py
        manager = worker._adapter_manager
        helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": worker.max_position_embeddings})
        helper.validate_legal(worker.lora_config)
        model = manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        # Copies: LoRAModel.optimize scales lora_B in place (vllm/lora/lora_weights.py), and a
        # shared-memory tensor is every engine's.
        tensors = {name: tensor.clone() for name, tensor in weights}
        loaded = LoRAModel.from_lora_tensors(
            ADAPTER_ID, tensors, helper, device="cpu", dtype=worker.lora_config.lora_dtype,
            model_vocab_size=worker.vocab_size,
            weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            skip_prefixes=getattr(model, "lora_skip_prefixes", None))
        unplaced = sorted(set(loaded.loras) - set(manager.modules))
        if unplaced:  # vLLM would leave them out without a word
            raise WeightSyncError(f"the engine has no LoRA layer for {', '.join(unplaced[:3])}")
        manager.remove_adapter(ADAPTER_ID)
        manager.add_adapter(loaded)
        manager.activate_adapter(ADAPTER_ID)

    def _targets(self, specs: list[TensorSpec]) -> list[tuple[torch.nn.Module, str]] | None:
        """Where each sent tensor goes: (module, parameter name), in the order they arrive; None
        unless every sent tensor has a place and every parameter of the model gets one."""
        names = tuple(s.name for s in specs)
        if getattr(self, "_targets_for", (None,))[0] == names:
            return self._targets_for[1]
        model = self.get_model()
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        targets, covered = [], set()
        for spec in specs:
            name = mapper.map_name(spec.name) if mapper is not None else spec.name
            module_name, _, attr = (name or "").rpartition(".")
            try:
                module = model.get_submodule(module_name)
                current = getattr(module, attr)
            except AttributeError:
                targets = None
                break
            packed = current.numel() == 0 and hasattr(module, "quant_method")
            if not isinstance(current, torch.nn.Parameter) or not (tuple(current.shape) == spec.shape or packed):
                targets = None
                break
            targets.append((module, attr))
            covered.add(name)
        if targets is not None and covered != {n for n, _ in model.named_parameters()}:
            targets = None
        self._targets_for = (names, targets)
        return targets


def exit_for_restart(why: str) -> NoReturn:
    """End this process at once, after saying why in its log: Ray restarts a worker that died
    (and its engine with it), where one that raised would live on with a broken engine."""
    log.critical("%s; this process exits so that Ray restarts it whole", why, exc_info=True)
    logging.shutdown()  # flush the log file first
    os._exit(EXIT_FOR_RESTART)


def _has_packed_kernel(module: torch.nn.Module) -> bool:
    """Whether vLLM keeps a packed copy of this layer's weight for its CPU GEMM. An input
    embedding has one too, used only when it doubles as the output head; an untied model
    (Pythia) has its head as a layer of its own, re-packed on its own."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    return getattr(module, "quant_method", None) is not None and type(module) is not VocabParallelEmbedding
