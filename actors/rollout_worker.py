"""The rollout worker: one vLLM engine that turns prompts into scored groups of completions.

A plain class; `deploy/launch.py` makes it a Ray actor. Tests may also build it directly.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import zlib

import torch

from common import logs, models
from common.config import Config, cpu_threads
from common.rewards import Scorer
from common.types import GenerationStats, Prompt, RolloutGroup
from common.weight_sync import TensorSpec

EXTENSION = "actors.vllm_extension.WeightSyncExtension"


def engine_args(cfg: Config, model_path: str, index: int) -> dict:
    """Keyword arguments of `vllm.LLM` for worker `index`: the only place CPU and GPU differ."""
    args = dict(
        model=model_path,
        dtype=str(models.torch_dtype(cfg.model.dtype, cfg.cluster.device)).removeprefix("torch."),
        seed=cfg.seed + index,
        max_model_len=cfg.model.max_model_len,
        worker_extension_cls=EXTENSION,
        # Log-probs after temperature, the distribution the tokens were really sampled from,
        # which is what the learner's importance weights compare against.
        logprobs_mode="processed_logprobs",
    )
    if cfg.cluster.device == "cpu":
        args.update(enforce_eager=True, kv_cache_memory_bytes=int(cfg.rollout.kv_cache_gib * 2**30),
                    # A seeded request whose prompt is split over two steps makes vLLM rewind its
                    # random generator, which CPU generators cannot do ("CPU Generator does not
                    # use offset"): schedule every prompt whole.
                    enable_chunked_prefill=False,
                    max_num_batched_tokens=max(4096, cfg.model.max_model_len))
    else:
        args.update(tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                    gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
        if cfg.rollout.tensor_parallel_size > 1:
            args.update(distributed_executor_backend="mp")
    return args


def request_seed(run_seed: int, round_: int, position: int) -> int:
    """A distinct, reproducible sampling seed per request: a fixed seed for every request would
    replay one random stream, and none at all would make a resumed run sample differently."""
    return zlib.crc32(f"{run_seed}:{round_}:{position}".encode()) & 0x7FFFFFFF


class RolloutWorker:
    def __init__(self, cfg: Config, index: int = 0):
        self.cfg, self.index = cfg, index
        if cfg.run_dir:
            logs.actor_file(cfg.run_dir, f"rollout-worker-{index}")
        self.version = 0
        self.incarnation = uuid.uuid4().hex
        # Resolved on this worker's node (it may not be the driver's).
        model_path = str(models.resolve(cfg.model.name, cfg.model.cache_dir))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not a line per weight reload
        # The engine core runs in this process, on every device, so it dies with the actor.
        # vLLM's default starts it in a child process (vllm/v1/engine/core_client.py,
        # EngineCoreClient.make_client: SyncMPClient) that nothing kills when the actor is
        # killed; on a GPU it would keep its memory, and the restarted engine would fail vLLM's
        # start-up check (vllm/v1/worker/utils.py, request_memory). With 0 it is an InprocClient;
        # tensor-parallel workers (MultiprocExecutor) still run as children, and exit when their
        # parent does (vllm/v1/executor/multiproc_executor.py, the workers' death pipe).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cfg.cluster.device == "cpu":
            # Threads as `cpu_threads` allots them, so actors sharing a machine do not fight
            # over cores.
            threads = cpu_threads(cfg, "rollout", len(os.sched_getaffinity(0)))
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        from vllm import LLM

        # Every reload warns that the rotary embedding got no weights: it has none to get (its
        # cos/sin cache is computed, and vLLM puts it back).
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

        self.llm = LLM(**engine_args(cfg, model_path, index))
        self.tokenizer = self.llm.get_tokenizer()
        self.scorer = Scorer(cfg.rollout.rewards, cfg.rollout.reward_weights)

    def ready(self) -> tuple[str, int]:
        """(incarnation, policy version): a new incarnation means Ray restarted this worker."""
        return self.incarnation, self.version

    # --- generation --------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], round_: int = 0, n: int | None = None,
                 ) -> tuple[list[RolloutGroup], GenerationStats]:
        """G completions per prompt, scored, with their behaviour log-probs."""
        from vllm import SamplingParams

        rollout, n = self.cfg.rollout, n or self.cfg.grpo.group_size
        params = [
            SamplingParams(n=n, max_tokens=rollout.max_tokens, temperature=rollout.temperature,
                           top_p=rollout.top_p, logprobs=0, seed=request_seed(self.cfg.seed, round_, i))
            for i in range(len(prompts))
        ]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts], params,
                                    use_tqdm=False)
        seconds = time.perf_counter() - start

        completions = [[c for c in out.outputs] for out in outputs]
        texts = [c.text for group in completions for c in group]
        columns = {k: [p.columns[k] for p in prompts for _ in range(n)] for k in prompts[0].columns} \
            if prompts else {}
        totals, parts = self.scorer([p.text for p in prompts for _ in range(n)], texts, columns)

        groups = []
        for i, (prompt, group) in enumerate(zip(prompts, completions)):
            span = slice(i * n, (i + 1) * n)
            groups.append(RolloutGroup(
                prompt=prompt,
                completions=texts[span],
                completion_ids=[list(c.token_ids) for c in group],
                logprobs=[[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in group],
                finish_reasons=[c.finish_reason for c in group],
                rewards=totals[span],
                reward_parts={name: scores[span] for name, scores in parts.items()},
                policy_version=self.version,
                worker=self.index,
            ))
        stats = GenerationStats(
            prompts=len(prompts), completions=len(prompts) * n,
            tokens=sum(g.num_tokens for g in groups),
            prompt_tokens=sum(len(p.token_ids) for p in prompts), seconds=seconds, worker=self.index,
        )
        return groups, stats

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """The engine's log-prob of every token of each sequence from its `start` on, each
        given the tokens before it (vLLM's prompt log-probs: temperature 1)."""
        from vllm import SamplingParams

        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in sequences],
                                    SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        return [[out.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))]
                for out, ids, start in zip(outputs, sequences, starts)]

    # --- weights -----------------------------------------------------------------------------

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                          specs: list[TensorSpec], buckets: list[list[int]], timeout_s: float,
                          secret: str) -> None:
        self.llm.collective_rpc("join_weight_group", args=(host, port, rank_offset, world_size,
                                                           specs, buckets, timeout_s, secret))

    def open_shared_weights(self, path: str, specs: list[TensorSpec]) -> None:
        self.llm.collective_rpc("open_shared_weights", args=(path, specs))

    def receive_weights(self, version: int) -> float:
        """Load policy `version` from the weight transport; returns the seconds it took."""
        start = time.perf_counter()
        self.llm.collective_rpc("receive_weights", args=(version,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self.version = version
        return time.perf_counter() - start
