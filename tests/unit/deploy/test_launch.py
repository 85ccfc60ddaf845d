"""Resource plan: what the learner and each rollout worker ask Ray for, as a pure function."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("cfg, bundles, strategy, learner, worker", [
    # The learner's bundle first, then one per worker.
    (Config(), [{"CPU": 1.0}, {"CPU": 1.0}], "PACK", (1, 0), (1, 0)),
    (gpu_config(), [{"CPU": 8.0, "GPU": 1.0}] + [{"CPU": 4.0, "GPU": 2.0}] * 4, "SPREAD", (8, 1), (4, 2)),
])
def test_plan_asks_for_one_bundle_per_actor(cfg, bundles, strategy, learner, worker):
    p = plan(cfg)
    assert LEARNER_BUNDLE == 0
    assert (p.bundles, p.strategy) == (bundles, strategy)
    assert (p.learner, p.worker) == ({"num_cpus": learner[0], "num_gpus": learner[1]},
                                     {"num_cpus": worker[0], "num_gpus": worker[1]})
    assert p.total_cpus == sum(b["CPU"] for b in bundles)


def test_plan_cpu_one_bundle_per_worker():
    cfg = Config()
    cfg.rollout.num_workers = 3
    cfg.rollout.num_cpus = 2
    p = plan(cfg)
    assert p.bundles == [{"CPU": 1.0}] + [{"CPU": 2.0}] * 3
    assert p.total_cpus == 7.0


def test_plan_one_bundle_per_learner_rank_before_the_workers():
    cfg = gpu_config()
    cfg.learner.num_ranks = 4
    p = plan(cfg)
    assert p.bundles == [{"CPU": 8.0, "GPU": 1.0}] * 4 + [{"CPU": 4.0, "GPU": 2.0}] * 4


def test_plan_rollout_resource_pins_workers_not_learner():
    cfg = gpu_config()
    cfg.cluster.rollout_resource = "rollout"
    p = plan(cfg)
    assert p.bundles[0] == {"CPU": 8.0, "GPU": 1.0}
    assert p.bundles[1:] == [{"CPU": 4.0, "rollout": 1.0, "GPU": 2.0}] * 4
    assert p.worker == {"num_cpus": 4, "num_gpus": 2, "resources": {"rollout": 1.0}}
    assert "resources" not in p.learner


def test_what_the_actors_ask_is_summed_in_one_line():
    from deploy.launch import asked

    assert asked([{"CPU": 1.0, "GPU": 1.0}, {"CPU": 2.0, "rollout": 1.0},
                  {"CPU": 4.0, "memory": 1e9, "node:10.0.0.1": 1.0}]) == "CPU 7, GPU 1, rollout 1"


def test_a_local_plan_is_checked_against_the_machine(monkeypatch):
    import psutil

    from common.config import ConfigError
    from deploy.launch import check_machine

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"total": 16 * 2**30})())
    cfg = Config()
    cfg.rollout.num_workers, cfg.rollout.kv_cache_gib = 4, 4.0
    check_machine(cfg)  # 4 engines of 1 CPU and 4 GiB each: it fits exactly
    cfg.rollout.num_workers = 5
    with pytest.raises(ConfigError) as refused:
        check_machine(cfg)
    assert [line.split(";")[0] for line in refused.value.problems] == [
        "rollout.num_workers (5) x rollout.num_cpus (1) asks 5 CPUs for the engines",
        "rollout.num_workers (5) x rollout.kv_cache_gib (4) asks 20 GiB for the engines' KV caches"]
    cfg.cluster.num_cpus = 8  # Ray's CPUs said outright: the user's to size
    with pytest.raises(ConfigError) as refused:
        check_machine(cfg)
    assert len(refused.value.problems) == 1
