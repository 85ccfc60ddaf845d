"""Rollout worker configuration: vLLM engine arguments per device, request seeds, threads."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from actors import rollout_worker
from actors.rollout_worker import (
    ENGINE_MAX_SEQS,
    EXTENSION,
    engine_args,
    kv_bytes_per_token,
    kv_cache_bytes,
    request_seed,
    token_versions,
)
from common.config import Config


@pytest.fixture(autouse=True)
def an_ampere_gpu_and_a_cpu_without_bf16(monkeypatch):
    """What `dtype auto` asks of the hardware where the engine runs: the GPU's compute
    capability (none here), the CPU's flags (whatever this machine has)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 6))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_f": True})


@pytest.fixture(autouse=True)
def a_model_of_12_kib_of_kv_per_token(monkeypatch):
    """The engine arguments' model paths are names only: its KV bytes per token are pythia-70m's
    in bfloat16 (6 layers x 512 x key and value x 2 bytes)."""
    monkeypatch.setattr(rollout_worker, "kv_bytes_per_token", lambda path, dtype: 12288)


def gpu_config(tp: int) -> Config:
    cfg = Config()
    cfg.cluster.device = "gpu"
    cfg.rollout.tensor_parallel_size = cfg.rollout.num_gpus = tp
    cfg.rollout.gpu_memory_utilization = 0.7
    cfg.learner.num_gpus = 1
    return cfg


def test_engine_args_cpu():
    cfg = Config()
    cfg.seed = 5
    cfg.rollout.kv_cache_gib = 1.5
    args = engine_args(cfg, "/models/tiny", index=2)
    assert args == dict(
        model="/models/tiny", dtype="float32", seed=7, max_model_len=512,
        worker_extension_cls=EXTENSION, logprobs_mode="processed_logprobs",
        enforce_eager=True, max_num_seqs=256,
        kv_cache_memory_bytes=1_610_612_736,  # 1.5 * 2**30: less than 256 x 512 x 12 KiB
        enable_chunked_prefill=False, max_num_batched_tokens=4096,
    )


def test_rollout_compile_compiles_a_cpu_engine():
    cfg = Config()
    cfg.rollout.compile = True
    assert engine_args(cfg, "/models/tiny", index=0)["enforce_eager"] is False


def test_kv_bytes_per_token_are_a_key_and_a_value_per_layer_and_kv_head(tmp_path):
    """From the model's own config: GPT-NeoX has a key-value head per attention head; a model
    with grouped queries has fewer, and may name its head size."""
    from transformers import GPTNeoXConfig, LlamaConfig

    GPTNeoXConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2).save_pretrained(tmp_path / "neox")
    LlamaConfig(num_hidden_layers=3, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                head_dim=48).save_pretrained(tmp_path / "gqa")
    assert kv_bytes_per_token(str(tmp_path / "neox"), "bfloat16") == 2 * 2 * 128 * 2
    assert kv_bytes_per_token(str(tmp_path / "neox"), "float32") == 2 * 2 * 128 * 4
    assert kv_bytes_per_token(str(tmp_path / "gqa"), "bfloat16") == 2 * 3 * 2 * 48 * 2


@pytest.mark.parametrize("max_model_len, per_token, cache", [
    (512, 1024, 256 * 512 * 1024),       # the tiny default, bfloat16: 128 MiB of the 1 GiB allowed
    (600, 1024, 256 * 768 * 1024),       # a sequence's blocks are whole: rounded up to 768 tokens
    (512, 98304, 2**30),                 # pythia-410m (96 KiB a token): the cap, as before
])
def test_a_cpu_engine_caches_what_it_can_run_at_once_and_no_more_than_allowed(max_model_len, per_token,
                                                                                 cache):
    cfg = Config()
    cfg.model.max_model_len = max_model_len
    assert cfg.rollout.kv_cache_gib == 1.0
    assert kv_cache_bytes(cfg, per_token) == cache
    assert ENGINE_MAX_SEQS == 256


def test_engine_args_cpu_with_bf16_units_run_in_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "amx_bf16": True})
    assert engine_args(Config(), "m", 0)["dtype"] == "bfloat16"


def test_engine_args_cpu_batched_tokens_cover_a_long_model():
    cfg = Config()
    cfg.model.max_model_len = 8192
    assert engine_args(cfg, "m", 0)["max_num_batched_tokens"] == 8192


@pytest.mark.parametrize("rank, slot", [(1, 1), (8, 8), (12, 16), (16, 16), (300, 320)])
def test_a_lora_run_enables_one_adapter_slot_of_a_rank_vllm_accepts(rank, slot):
    import typing

    from vllm.config.lora import MaxLoRARanks

    cfg = Config()
    cfg.learner.lora_rank = rank
    args = engine_args(cfg, "m", 0)
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 1, slot)
    assert slot in typing.get_args(MaxLoRARanks)  # vLLM's own list (vllm/config/lora.py)
    assert "enable_lora" not in engine_args(Config(), "m", 0)


def test_the_engine_runs_the_extension_methods_the_worker_names():
    """vLLM loads the extension by its dotted name and runs each call on it by method name."""
    from actors.rollout_worker import RolloutWorker
    from actors.vllm_extension import WeightSyncExtension

    module, _, name = EXTENSION.rpartition(".")
    assert getattr(importlib.import_module(module), name) is WeightSyncExtension
    calls = []
    worker = object.__new__(RolloutWorker)  # only the RPC, no engine
    worker.llm = SimpleNamespace(collective_rpc=lambda method, args: calls.append((method, args)))
    worker._on_every_rank(WeightSyncExtension.receive_weights, 3)
    assert calls == [("receive_weights", (3,))]
    assert getattr(WeightSyncExtension, calls[0][0]) is WeightSyncExtension.receive_weights


def test_engine_args_gpu_single_device():
    args = engine_args(gpu_config(tp=1), "m", 0)
    assert args["dtype"] == "bfloat16"  # dtype auto on GPU
    assert args["tensor_parallel_size"] == 1
    assert args["gpu_memory_utilization"] == 0.7
    assert "distributed_executor_backend" not in args
    assert "kv_cache_memory_bytes" not in args
    assert "enforce_eager" not in args


def test_engine_args_gpu_tensor_parallel():
    args = engine_args(gpu_config(tp=2), "m", 0)
    assert args["tensor_parallel_size"] == 2
    assert args["distributed_executor_backend"] == "mp"
    assert "kv_cache_memory_bytes" not in args


def test_engine_args_explicit_dtype_wins():
    cfg = gpu_config(tp=1)
    cfg.model.dtype = "float16"
    assert engine_args(cfg, "m", 0)["dtype"] == "float16"


def test_request_seed_is_deterministic_distinct_and_in_range():
    seeds = {request_seed(0, r, i) for r in range(5) for i in range(20)}
    assert len(seeds) == 100
    assert all(0 <= s < 2**31 for s in seeds)
    assert request_seed(3, 1, 2) == request_seed(3, 1, 2)
    assert request_seed(0, 1, 2) != request_seed(0, 2, 1)
    assert request_seed(0, 1, 2) != request_seed(1, 1, 2)


def test_request_seed_value_is_pinned():
    # crc32(b"0:1:2") & 0x7FFFFFFF; a change here would make resumed runs sample differently
    assert request_seed(0, 1, 2) == 809654016


def test_each_token_gets_the_version_vllm_labelled_its_span_with():
    from vllm.outputs import WeightVersionSpan

    completion = SimpleNamespace(token_ids=[5, 6, 7, 8, 9], weight_versions=[
        WeightVersionSpan("3", 0, 2), WeightVersionSpan("4", 2, 5)])  # an update after 2 tokens
    assert token_versions(completion) == [3, 3, 4, 4, 4]
    completion.weight_versions = [WeightVersionSpan("3", 0, 4)]
    with pytest.raises(RuntimeError, match="labelled 4 of 5 tokens"):
        token_versions(completion)


def test_in_flight_updates_turn_off_async_scheduling_on_gpus():
    cfg = gpu_config(tp=1)
    assert "async_scheduling" not in engine_args(cfg, "m", 0)
    cfg.rollout.weight_update = "in_flight"
    assert engine_args(cfg, "m", 0)["async_scheduling"] is False


def test_the_compilers_per_process_lookups_are_made_ahead_and_kept():
    """`prefetch_compiler_lookups` only helps while torch keeps each lookup for the process: in a
    fresh one, after it, the vector ISAs are known and the source hashes refuse a second value."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import threading
        from torch._inductor import codecache, cpu_vec_isa
        assert cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 0  # the precondition
        from actors.rollout_worker import prefetch_compiler_lookups
        prefetch_compiler_lookups()
        [t.join() for t in threading.enumerate() if t.name == "compiler-lookups"]
        assert cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 1
        for key in (codecache.torch_key, codecache.triton_key):
            try:
                key.set(b"")
            except RuntimeError:
                continue  # "already set": computed once, kept
            raise AssertionError(f"{key.__name__} was not computed ahead")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
