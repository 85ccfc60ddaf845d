"""The learner alone over 1 and 2 ranks (`learner.num_ranks`: FSDP2 over gloo), on the same
synthetic batch and the machine's cores split between the ranks: seconds per step, and the share
of a step spent in FSDP's collectives (the weights' all-gathers before forward and backward, the
gradients' reduce-scatters after), as torch's profiler times FSDP's own ranges. No engines and no
Ray: each rank is a process, as a Ray actor would be. On one machine's cores a second rank can
only add communication; what it buys is memory (a model whose float32 state outgrows a device)."""

from __future__ import annotations

import logging
import random
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.config import Config
from common.types import Prompt, RolloutGroup
from common.weight_sync import listen_socket
from deploy.bench import render
from deploy.bench.machine import ModelShape

if TYPE_CHECKING:
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)

# FSDP2's record_function ranges around its collectives and the waits on them
# (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, FSDPParamGroup.unshard,
# wait_for_unshard and post_backward; names carry the module's path after the prefix).
COLLECTIVES = ("FSDP::all_gather", "FSDP::all_gather_copy_out", "FSDP::post_backward_reduce",
               "FSDP::post_backward_rs_wait")


@dataclass
class Settings:
    """Ranks: the learner's step alone on 1 and 2 FSDP2 ranks, with its share in collectives."""

    preset: str = "pythia-70m-shape"
    """Model trained."""
    batch: int = 16
    """Completions per learner step."""
    tokens: int = 64
    """Prompt and completion tokens each."""
    steps: int = 3
    """Timed learner steps per rank count (after one warm-up step, before one profiled)."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(preset="tiny", batch=8, tokens=8, steps=1)


@dataclass
class RankResult:
    ranks: int
    threads_per_rank: int
    seconds_per_step: float
    """Median over the timed steps (after a warm-up step)."""
    communication_s: float
    """Seconds in FSDP's collectives during one profiled step (rank 0); 0 for one rank."""
    communication_share: float
    """communication_s over that profiled step's seconds."""


@dataclass
class RanksResult:
    model: ModelShape
    config: dict[str, object]
    ranks: list[RankResult]


def batch(group_size: int, prompts: int, prompt_tokens: int, completion_tokens: int,
          seed: int = 0) -> list[RolloutGroup]:
    """Groups of random token ids with random rewards and behaviour log-probs: the learner's work
    depends on the shapes, not the text."""
    rng = random.Random(seed)
    groups = []
    for p in range(prompts):
        prompt = Prompt(p, "", [rng.randrange(50, 50000) for _ in range(prompt_tokens)])
        ids = [[rng.randrange(50, 50000) for _ in range(completion_tokens)] for _ in range(group_size)]
        groups.append(RolloutGroup(
            prompt=prompt, completions=[""] * group_size, completion_ids=ids,
            logprobs=[[-rng.uniform(5, 12) for _ in c] for c in ids],
            token_versions=[[0] * len(c) for c in ids], finish_reasons=["length"] * group_size,
            rewards=[rng.random() for _ in ids], reward_parts={}, policy_version=0))
    return groups


def _collective_seconds(prof) -> float:
    return sum(e.cpu_time_total for e in prof.events()
               if e.name.split(" (")[0] in COLLECTIVES) / 1e6


def _rank(rank: int, cfg: Config, port: int, groups: list[RolloutGroup], steps: int, out: Path) -> None:
    """One rank's process: a warm-up step, `steps` timed steps, one profiled step, each timed by
    the learner itself (its `train_s`)."""
    from learner.learner import Learner

    learner = Learner(cfg, rank)
    if cfg.learner.num_ranks > 1:
        learner.join_ranks("127.0.0.1", port, peers=[])
    learner.train(groups)
    times = [learner.train(groups)["train_s"] for _ in range(steps)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = learner.train(groups)["train_s"]
    if rank == 0:
        torch.save({"times": times, "profiled_s": profiled, "collective_s": _collective_seconds(prof)},
                   out / "rank0.pt")


def measure(cfg: Config, groups: list[RolloutGroup], ranks: int, cores: int, steps: int) -> RankResult:
    import torch.multiprocessing as mp

    cfg.learner.num_ranks, cfg.learner.threads = ranks, max(1, cores // ranks)
    with listen_socket("127.0.0.1") as sock:  # released at once; rank 0 binds it next
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(cfg, port, groups, steps, Path(tmp)), nprocs=ranks,
                           start_method="spawn")
        saved = torch.load(Path(tmp) / "rank0.pt")
    comm = saved["collective_s"] if ranks > 1 else 0.0
    return RankResult(ranks=ranks, threads_per_rank=cfg.learner.threads,
                      seconds_per_step=statistics.median(saved["times"]), communication_s=comm,
                      communication_share=comm / saved["profiled_s"])


def run(harness: Harness, s: Settings) -> RanksResult:
    """1 rank with every core, then 2 ranks with half each, on one synthetic batch."""
    cfg = harness.config(model=s.preset, batch=s.batch, tokens=s.tokens)
    cores = harness.options.threads
    groups = batch(cfg.grpo.group_size, cfg.prompts_per_step, s.tokens, s.tokens)
    results = []
    for ranks in (1, 2):
        result = measure(cfg, groups, ranks, cores, s.steps)
        log.info("learner on %d rank(s): %.2f s/step, %.0f%% in collectives", ranks,
                 result.seconds_per_step, 100 * result.communication_share)
        results.append(result)
    return RanksResult(model=harness.shape(s.preset), ranks=results, config={
        "completions": s.batch, "G": cfg.grpo.group_size, "prompt tokens": s.tokens,
        "completion tokens": s.tokens, "micro-batch": cfg.learner.micro_batch_size,
        "dtype": cfg.model.dtype, "cores": cores, "timed steps": s.steps, "backend": "gloo"})


def markdown(r: RanksResult) -> list[str]:
    rows = [[x.ranks, x.threads_per_rank, x.seconds_per_step, x.communication_s,
             render.pct(x.communication_share)] for x in r.ranks]
    header = ["ranks", "threads each", "s/step", "s in collectives (one step)", "share of the step"]
    return render.labelled(r.config, r.model, header, rows)
