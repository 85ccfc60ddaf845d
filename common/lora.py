"""The LoRA adapter as both sides name it: peft's configuration for the learner, the same in the
form vLLM's LoRA loader reads (its PEFTHelper takes peft's adapter_config.json fields), and the
one request every engine generates under once the adapter has arrived."""

from __future__ import annotations

from common.config import LearnerConfig

ADAPTER_ID = 1
"""vLLM's id of the adapter. One adapter, replaced in place at every sync: vLLM keeps an adapter
by this id and loads it from `lora_path` only when the id is not held
(vllm/lora/worker_manager.py, LRUCacheWorkerLoRAManager.add_adapter), so the path is a name."""
ADAPTER_DIR = "adapter"
"""Where peft's `save_pretrained` puts the adapter alone: in a checkpoint, and in the final model
beside the merged weights."""
# vLLM sizes its LoRA buffers for a max_lora_rank among these (vllm/config/lora.py, MaxLoRARanks).
ENGINE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def enabled(learner: LearnerConfig) -> bool:
    return learner.lora_rank > 0


def peft_config(learner: LearnerConfig) -> dict:
    """peft's LoraConfig fields (as its adapter_config.json holds them)."""
    return {"r": learner.lora_rank, "lora_alpha": learner.lora_alpha,
            "lora_dropout": learner.lora_dropout,
            "target_modules": list(learner.lora_target_modules), "bias": "none"}


def engine_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of `rank`."""
    return next(r for r in ENGINE_RANKS if r >= rank)


def request(version: int):
    """The vllm.LoRARequest of the adapter, named by the policy version it serves (for logs)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest("policy", ADAPTER_ID, f"memory://policy/{version}")
