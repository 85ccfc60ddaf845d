"""Starting Ray and placing the actors: resources per role, one placement group, and the node
addresses Ray assigned (used by the weight-sync group, never a hard-coded loopback)."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.config import Config, ConfigError
from common.errors import WaitTimeout
from common.rewards import model_rewards

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

log = logging.getLogger(__name__)
LEARNER_BUNDLE = 0  # bundles 0.. are the learner ranks' (the buffer shares rank 0's); then the
# rollout workers', then the reward models' actors
WORKER_CALLS = 16  # a rollout worker's calls in progress at once


@dataclass
class ResourcePlan:
    """What each role asks Ray for; a pure function of the config so it can be tested anywhere."""

    bundles: list[dict[str, float]]
    strategy: str
    learner: dict
    worker: dict
    reward_model: dict

    @property
    def total_cpus(self) -> float:
        return sum(b.get("CPU", 0) for b in self.bundles)


def plan(cfg: Config) -> ResourcePlan:
    rollout, cluster = cfg.rollout, cfg.cluster
    learner = {"num_cpus": cfg.learner.num_cpus, "num_gpus": cfg.gpus("learner")}
    worker = {"num_cpus": rollout.num_cpus, "num_gpus": cfg.gpus("rollout")}
    reward_model = {"num_cpus": cfg.reward_model.num_cpus, "num_gpus": cfg.gpus("reward_model")}
    custom = {cluster.rollout_resource: 1.0} if cluster.rollout_resource else {}
    if custom:
        worker["resources"] = custom

    def bundle(opts: dict, extra: dict) -> dict[str, float]:
        b = {"CPU": float(opts["num_cpus"]), **extra}
        if opts["num_gpus"]:
            b["GPU"] = float(opts["num_gpus"])
        return b

    scorers = len(model_rewards(rollout.rewards)) * cfg.reward_model.num_workers
    bundles = [bundle(learner, {}) for _ in range(cfg.learner.num_ranks)] \
        + [bundle(worker, custom) for _ in range(rollout.num_workers)] \
        + [bundle(reward_model, {}) for _ in range(scorers)]
    return ResourcePlan(bundles=bundles, strategy=cluster.placement_strategy, learner=learner,
                        worker=worker, reward_model=reward_model)


PLACEMENT_QUIET_S = 5.0  # a placement still pending after this is said in the log


def asked(bundles: list[dict[str, float]]) -> str:
    """Resources summed over `bundles`, as `CPU 65, GPU 0` (Ray's own keys, memory left out)."""
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            if "memory" not in key and not key.startswith("node:"):
                total[key] = total.get(key, 0.0) + value
    return ", ".join(f"{key} {value:g}" for key, value in sorted(total.items()))


def init_ray(cfg: Config) -> None:
    """Join the configured cluster (or the one `ray job submit` runs us in), else start a local
    instance bound to loopback, with as many logical CPUs as the run's bundles need."""
    import ray

    # The actors write their own logs into the run directory (common/logs.py): nothing of theirs
    # is forwarded to the driver's console, and Ray itself speaks up only for errors.
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    address = cluster_address(cfg)
    if address:
        ray.init(address=address, **quiet)
        return
    cpus = cfg.cluster.num_cpus or max(int(plan(cfg).total_cpus + 0.999), os.cpu_count() or 1)
    actors_at_driver_priority()
    # address="local": without it, ray.init() joins any cluster `ray start` left on this machine.
    ray.init(address="local", num_cpus=cpus, num_gpus=None if cfg.cluster.device == "gpu" else 0,
             include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)


def cluster_address(cfg: Config) -> str:
    """The Ray cluster the run joins (the configured one, or the job's under `ray job
    submit`); empty when it starts a local instance of its own."""
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")


def check_machine(cfg: Config) -> None:
    """On a Ray instance the run starts itself, refuse at once a plan this machine cannot hold:
    Ray would start what fits and leave the rest pending, with no word and no end. Each engine
    needs its Ray CPUs of the machine's cores (the learner may share them), and on a CPU the
    engines' KV caches need the machine's memory."""
    import psutil

    rollout, cores = cfg.rollout, os.cpu_count() or 1
    engines = rollout.num_workers * rollout.num_cpus
    problems = []
    if engines > cores and not cfg.cluster.num_cpus:
        problems.append(f"rollout.num_workers ({rollout.num_workers}) x rollout.num_cpus "
                        f"({rollout.num_cpus:g}) asks {engines:g} CPUs for the engines; this machine "
                        f"has {cores}")
    if cfg.cluster.device == "cpu":
        memory = psutil.virtual_memory().total / 2**30
        caches = rollout.num_workers * rollout.kv_cache_gib
        if caches > memory:
            problems.append(f"rollout.num_workers ({rollout.num_workers}) x rollout.kv_cache_gib "
                            f"({rollout.kv_cache_gib:g}) asks {caches:g} GiB for the engines' KV caches; "
                            f"this machine has {memory:.0f} GiB")
    if problems:
        raise ConfigError(problems)


LEARNER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
"""A CPU learner's process: glibc's malloc keeps freed memory for the next step instead of handing
it back. A learner step allocates and frees tensors of 50 to 200 MB (a vocabulary-sized gradient
of the embeddings, the output layer's, the bfloat16 copies of the weights); above 32 MB glibc maps
each afresh (mmap, its threshold's ceiling: mallopt(3), M_MMAP_THRESHOLD), and every 4 KB page of
it faults in when first written: 0.12 s a step in the embeddings' gradient alone. With no mmap
(M_MMAP_MAX 0) and no trimming (M_TRIM_THRESHOLD) they come from the heap, already mapped. On
pythia-70m-shape (16 x 80 tokens, AMX Xeon) the step went from 0.99-1.06 s to 0.78-0.80 s (means of
8 steps, three runs each); the process keeps its peak memory."""


def learner_env() -> dict[str, str]:
    """`LEARNER_ENV`, where the user has not set its variables otherwise."""
    return {key: os.environ.get(key, value) for key, value in LEARNER_ENV.items()}


def actors_at_driver_priority() -> None:
    """Before a local Ray starts: its workers run at the driver's priority. Ray's raylet starts
    them at niceness 15 (its `worker_niceness` setting, read from RAY_worker_niceness), below
    anything else on the machine: beside one busy process per core, the actors, which do all of
    the run's work, got 4% of the CPU. Ray's job manager does the same for its supervisors
    (dashboard/modules/job/job_manager.py); a value the user set still wins."""
    os.environ.setdefault("RAY_worker_niceness", "0")


@dataclass
class RunActors:
    """The run's actors and where Ray put them."""

    run_id: str                                    # names what the run keeps outside its run directory
    buffer: ActorHandle                            # a RolloutBuffer
    learner: ActorHandle                           # a Learner (rank 0)
    workers: list[ActorHandle]                     # RolloutWorkers
    placement_group: PlacementGroup
    learner_node: tuple[str, str]                  # (node id, node ip)
    worker_nodes: list[tuple[str, str]] = field(default_factory=list)
    learner_ranks: list[ActorHandle] = field(default_factory=list)  # the learner's other ranks
    reward_models: list[ActorHandle] = field(default_factory=list)  # every reward model's actors

    @property
    def single_node(self) -> bool:
        return all(node == self.learner_node[0] for node, _ in self.worker_nodes)

    @property
    def sync_host(self) -> str:
        """Where the weight-sync group listens: loopback when every actor is on the learner's
        Ray node (Ray reports a routable address even for a local instance), else the
        learner's node address from Ray."""
        return "127.0.0.1" if self.single_node else self.learner_node[1]


def shutdown(actors: RunActors, wait_s: float = 10.0) -> None:
    """Kill the run's actors and give their resources back; then remove the temporary
    directories of the rollout workers on this node, once their processes are gone (a few
    seconds at most: a kill is not instant). Other nodes' go at their next run's start."""
    import glob
    import time

    import ray

    from actors.rollout_worker import engine_scratch
    from common.held import remove_unheld

    for actor in [*actors.workers, actors.learner, *actors.learner_ranks, *actors.reward_models,
                  actors.buffer]:
        ray.kill(actor)
    ray.util.remove_placement_group(actors.placement_group)
    left = [engine_scratch(actors.run_id, i) + "*" for i in range(len(actors.workers))]
    deadline = time.monotonic() + wait_s
    while left and time.monotonic() < deadline:
        for pattern in left:
            remove_unheld(pattern)
        left = [pattern for pattern in left if glob.glob(pattern)]
        if left:
            time.sleep(0.2)


def launch(cfg: Config, timeout_s: float) -> RunActors:
    import ray
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.reward_model import RewardModel, actor_name
    from actors.rollout_worker import RolloutWorker
    from common.buffer import RolloutBuffer, buffer_name
    from learner.learner import Learner

    p = plan(cfg)
    pg = placement_group(p.bundles, strategy=p.strategy, name="grpo-ray")
    if not pg.wait(timeout_seconds=min(PLACEMENT_QUIET_S, timeout_s)):
        log.info("waiting up to %.0f s for the cluster to place the run's actors (%s); it has %s",
                 timeout_s, asked(p.bundles), asked([ray.cluster_resources()]))
        if not pg.wait(timeout_seconds=max(0.0, timeout_s - PLACEMENT_QUIET_S)):
            ray.util.remove_placement_group(pg)
            raise WaitTimeout(f"waited {timeout_s:.0f} s for the cluster to place the run's actors: "
                              f"they ask {asked(p.bundles)} ({len(p.bundles)} bundles, {p.strategy}), "
                              f"the cluster has {asked([ray.cluster_resources()])}")

    def at(index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)

    capacity = cfg.buffer.capacity or (cfg.buffer.max_policy_lag + 1) * cfg.prompts_per_step
    run_id = uuid.uuid4().hex[:12]
    buffer = ray.remote(RolloutBuffer).options(
        name=buffer_name(run_id), num_cpus=0, scheduling_strategy=at(LEARNER_BUNDLE),
    ).remote(capacity, cfg.buffer.max_policy_lag, cfg.grpo.drop_zero_std_groups)
    ranks = cfg.learner.num_ranks
    # On a GPU the learner's large tensors live on the device: the setting would only keep host
    # memory (a checkpoint's or a model's load) from being returned.
    env = {"runtime_env": {"env_vars": learner_env()}} if cfg.cluster.device == "cpu" else {}
    learners = [ray.remote(Learner).options(**p.learner, scheduling_strategy=at(LEARNER_BUNDLE + rank),
                                            **env)
                .remote(cfg, rank) for rank in range(ranks)]
    workers = [
        ray.remote(RolloutWorker).options(
            **p.worker, scheduling_strategy=at(LEARNER_BUNDLE + ranks + i),
            max_restarts=cfg.cluster.max_worker_restarts, max_task_retries=0,
            # Calls run side by side (rounds generating, a weight load arriving, `ready`);
            # the engine itself is only ever touched by its own loop (actors/engine_loop.py).
            max_concurrency=WORKER_CALLS,
        ).remote(cfg, i, run_id)
        for i in range(cfg.rollout.num_workers)
    ]
    first, each = LEARNER_BUNDLE + ranks + cfg.rollout.num_workers, cfg.reward_model.num_workers
    reward_models = [
        ray.remote(RewardModel).options(
            **p.reward_model, scheduling_strategy=at(first + k * each + i), name=actor_name(run_id, k, i),
            max_restarts=cfg.cluster.max_worker_restarts, max_task_retries=0,
        ).remote(cfg, name, i)
        for k, name in enumerate(model_rewards(cfg.rollout.rewards)) for i in range(each)
    ]
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    placed = placement_group_table(pg)["bundles_to_node_id"]
    where = [(placed[i], nodes[placed[i]]) for i in range(len(p.bundles))]
    actors = RunActors(run_id=run_id, buffer=buffer, learner=learners[0], workers=workers, placement_group=pg,
                       learner_node=where[LEARNER_BUNDLE],
                       worker_nodes=where[LEARNER_BUNDLE + ranks : LEARNER_BUNDLE + ranks + len(workers)],
                       learner_ranks=learners[1:], reward_models=reward_models)
    if ranks > 1:
        _join_learner_ranks(learners, where[LEARNER_BUNDLE : LEARNER_BUNDLE + ranks], timeout_s)
    return actors


def _join_learner_ranks(learners: list[ActorHandle], nodes: list[tuple[str, str]], timeout_s: float) -> None:
    """The learner ranks form their group (learner/sharding.py) at rank 0's node: loopback when
    they all share it."""
    from deploy.remote import get

    host = "127.0.0.1" if len({node for node, _ in nodes}) == 1 else nodes[0][1]
    port = get(learners[0].open_ranks.remote(host), timeout_s, "the learner to start", actor="the learner")
    joined = [learner.join_ranks.remote(host, port, learners[1:] if rank == 0 else [])
              for rank, learner in enumerate(learners)]
    for rank, ref in enumerate(joined):
        get(ref, timeout_s, f"learner rank {rank} to join the others", actor=f"learner rank {rank}")
