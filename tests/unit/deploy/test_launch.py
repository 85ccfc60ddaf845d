"""Resource plan: what the learner and each rollout worker ask Ray for, as a pure function."""

from __future__ import annotations

from common.config import Config
from deploy.launch import LEARNER_BUNDLE, plan


def gpu_config() -> Config:
    cfg = Config()
    cfg.cluster.device = "gpu"
    cfg.cluster.placement_strategy = "SPREAD"
    cfg.rollout.num_workers = 4
    cfg.rollout.tensor_parallel_size = 2
    cfg.rollout.num_gpus = 2
    cfg.rollout.num_cpus = 4
    cfg.learner.num_gpus = 1
    cfg.learner.num_cpus = 8
    return cfg


def test_plan_cpu_default():
    p = plan(Config())
    assert LEARNER_BUNDLE == 0
    assert p.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]  # learner, then one per worker
    assert p.strategy == "PACK"
    assert p.learner == {"num_cpus": 1, "num_gpus": 0}
    assert p.worker == {"num_cpus": 1, "num_gpus": 0}
    assert p.total_cpus == 2.0


def test_plan_cpu_one_bundle_per_worker():
    cfg = Config()
    cfg.rollout.num_workers = 3
    cfg.rollout.num_cpus = 2
    p = plan(cfg)
    assert p.bundles == [{"CPU": 1.0}] + [{"CPU": 2.0}] * 3
    assert p.total_cpus == 7.0


def test_plan_gpu_cluster():
    p = plan(gpu_config())
    assert p.bundles == [{"CPU": 8.0, "GPU": 1.0}] + [{"CPU": 4.0, "GPU": 2.0}] * 4
    assert p.strategy == "SPREAD"
    assert p.learner == {"num_cpus": 8, "num_gpus": 1}
    assert p.worker == {"num_cpus": 4, "num_gpus": 2}
    assert p.total_cpus == 24.0


def test_plan_rollout_resource_pins_workers_not_learner():
    cfg = gpu_config()
    cfg.cluster.rollout_resource = "rollout"
    p = plan(cfg)
    assert p.bundles[0] == {"CPU": 8.0, "GPU": 1.0}
    assert p.bundles[1:] == [{"CPU": 4.0, "rollout": 1.0, "GPU": 2.0}] * 4
    assert p.worker == {"num_cpus": 4, "num_gpus": 2, "resources": {"rollout": 1.0}}
    assert "resources" not in p.learner
