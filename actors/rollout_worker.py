"""The rollout worker: one vLLM engine that turns prompts into scored groups of completions.

A plain class; `deploy/launch.py` makes it a Ray actor. Tests may also build it directly.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import Future

import ray
import torch

from actors.engine_loop import EngineLoop
from actors.episodes import EpisodeRunner
from actors.reward_model import RewardModelClient
from actors.vllm_extension import WeightSyncExtension, exit_for_restart
from common import logs, lora, models
from common.buffer import buffer_name
from common.config import Config, cpu_threads
from common.held import held_dir, remove_unheld
from common.rewards import Scorer, model_rewards
from common.spans import Span, Spans
from common.types import GenerationStats, Prompt, RolloutGroup
from common.weight_sync import TensorSpec

EXTENSION = f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__name__}"
log = logging.getLogger(__name__)


def engine_scratch(run_id: str, index: int) -> str:
    """The prefix of the temporary directories of run `run_id`'s rollout worker `index`. vLLM
    leaves a file there per engine start (its rendezvous file store:
    vllm/utils/network_utils.py, get_file_store_init_method), and never removes it."""
    return os.path.join(tempfile.gettempdir(), f"grpo-ray-engine-{run_id or 'local'}-{index}-")


ENGINE_MAX_SEQS = 256
"""Most sequences a CPU engine runs at once (vLLM's own default there, made explicit because the
KV cache is sized by it): an eval of 32 prompts x G 8 is admitted whole."""
KV_BLOCK_ROUNDING = 256
"""Tokens a sequence's KV cache is rounded up to: a multiple of every block size vLLM's CPU
attention uses (vllm/platforms/cpu.py, CpuPlatform.check_and_update_config)."""


def kv_bytes_per_token(model_path: str, dtype: str) -> int:
    """KV-cache bytes one token takes in an engine of `dtype`: a key and a value per layer and
    key-value head, from the model's Hugging Face config."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_path)
    heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return 2 * hf.num_hidden_layers * heads * head_dim * getattr(torch, dtype).itemsize


def kv_cache_bytes(cfg: Config, per_token: int) -> int:
    """A CPU engine's KV cache: room for ENGINE_MAX_SEQS sequences of model.max_model_len
    tokens, all it can ever run at once (so nothing is preempted), at most rollout.kv_cache_gib.
    vLLM zeroes the whole cache while the engine starts, 0.35 s per GiB here on one thread: the
    tiny default needs 128 MiB of its 1 GiB."""
    length = -(-cfg.model.max_model_len // KV_BLOCK_ROUNDING) * KV_BLOCK_ROUNDING
    return min(ENGINE_MAX_SEQS * length * per_token, int(cfg.rollout.kv_cache_gib * 2**30))


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
    if lora.enabled(cfg.learner):
        # One adapter slot: the engines serve one policy, its adapter replaced at every sync.
        args.update(enable_lora=True, max_loras=1, max_lora_rank=lora.engine_rank(cfg.learner.lora_rank))
    if cfg.cluster.device == "cpu":
        args.update(enforce_eager=not cfg.rollout.compile, max_num_seqs=ENGINE_MAX_SEQS,
                    kv_cache_memory_bytes=kv_cache_bytes(cfg, kv_bytes_per_token(model_path, args["dtype"])),
                    # A seeded request whose prompt is split over two steps makes vLLM rewind its
                    # random generator, which CPU generators cannot do ("CPU Generator does not
                    # use offset"): schedule every prompt whole.
                    enable_chunked_prefill=False,
                    max_num_batched_tokens=max(4096, cfg.model.max_model_len))
    else:
        args.update(tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                    gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
        if cfg.rollout.weight_update == "in_flight":
            # With async scheduling (vLLM's default on GPUs, off on CPUs) step() returns batch k
            # after launching batch k+1 with the weights of that moment, and labels its tokens
            # with the version set after it (vllm/v1/engine/core.py,
            # EngineCore.step_with_batch_queue and _attach_weight_version): an update between
            # two steps would then reach one token late, labelled wrong. Off, it is exact.
            args.update(async_scheduling=False)
        if cfg.rollout.tensor_parallel_size > 1:
            args.update(distributed_executor_backend="mp")
    return args


def prefetch_compiler_lookups() -> None:
    """Start, on a thread of its own, what torch's compiler looks up once per process before its
    first compile on a CPU, which here is vLLM's first call with log-probs (its rank count is
    compiled: vllm/v1/sample/ops/logprobs.py, batched_count_greater_than): which vector ISAs
    build and load, each checked in a child process (torch/_inductor/cpu_vec_isa.py,
    valid_vec_isa_list, cached per process), and the hashes of torch's and triton's sources that
    key its cache (torch/_inductor/codecache.py, torch_key and triton_key, cached likewise).
    Mostly waiting on children and reading files, it runs beside `import vllm` and the engine's
    construction, which it slows by about 1 s: the bench's time-to-reward run starts in 19 s
    instead of 21-22 s, its first weight check taking 0.9 s instead of 3.4-3.8 s (2 cores)."""
    def lookups() -> None:
        try:
            from torch._inductor import codecache, cpu_vec_isa

            cpu_vec_isa.pick_vec_isa()
            codecache.torch_key()
            codecache.triton_key()
        except Exception:  # an optimisation only: the first compile looks them up itself
            log.debug("prefetching the compiler's lookups failed", exc_info=True)

    threading.Thread(target=lookups, name="compiler-lookups", daemon=True).start()


def request_seed(run_seed: int, round_: int, prompt: int) -> int:
    """A distinct, reproducible sampling seed per request: a fixed seed for every request would
    replay one random stream, and none at all would make a resumed run sample differently.
    Keyed by the prompt's index, not its place in a worker's share: two workers' shares, or a
    round and its dynamic-sampling extra rounds, never replay each other's stream, and the
    seeds do not depend on how many workers split the round."""
    return zlib.crc32(f"{run_seed}:{round_}:{prompt}".encode()) & 0x7FFFFFFF


class RolloutWorker:
    def __init__(self, cfg: Config, index: int = 0, run_id: str = ""):
        self.cfg, self.index, self.run_id = cfg, index, run_id
        """The run's id: `stream` finds the run's buffer by it."""
        if cfg.run_dir:
            logs.actor_file(cfg.run_dir, f"rollout-worker-{index}")
        self.version = 0
        self.has_adapter = False
        """With LoRA: whether the learner's adapter has arrived; until then the engine generates
        with the base model, which is what a new adapter (B = 0) computes."""
        self.incarnation = uuid.uuid4().hex
        self.in_flight = cfg.rollout.weight_update == "in_flight"
        self.spans = Spans(f"rollout worker {index}")
        self.spans.since_process_start("start process")  # Ray's worker process and our imports
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
        # A compiled engine (every GPU one, a CPU one with rollout.compile) saves its compiled
        # model for the next start through torch's AOT compile by default (vllm/envs.py,
        # use_aot_compile: on from torch 2.10), which cannot pickle the Transformers backend's
        # GPT-NeoX forward (vllm/compilation/decorators.py, save_aot_compiled_function warns
        # "unable to save"): every start compiled from nothing, 14 s here. Without it the next
        # start finds the compiled graph in a cache (Dynamo still traces the model): 4 s here.
        # On a GPU vLLM's own (vllm/compilation/backends.py, CompilerManager.load); on a CPU,
        # where vLLM compiles the whole graph once (vllm/platforms/cpu.py,
        # CpuPlatform.check_and_update_config: DYNAMO_TRACE_ONCE), torch's FX graph cache.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if cfg.cluster.device == "cpu":
            # Threads as `cpu_threads` allots them, so actors sharing a machine do not fight
            # over cores.
            threads = cpu_threads(cfg, "rollout", len(os.sched_getaffinity(0)))
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        # Temporary files in a directory this process holds: the driver removes it when the run
        # ends, and the next worker on this node removes any that a killed process left.
        for orphan in remove_unheld(os.path.join(tempfile.gettempdir(), "grpo-ray-engine-*")):
            log.info("removed %s, left by a rollout worker that is gone", orphan)
        # torch's inductor keeps the kernels it compiles (vLLM's sampler compiles its log-prob
        # gathering on the first call: 13 s on 2 cores) and its precompiled headers under the
        # temporary directory (torch/_inductor/runtime/cache_dir_utils.py, default_cache_dir;
        # torch/_inductor/codecache.py reads it for _HEADER_DIR when imported): in the
        # machine's, where the next run finds them, not in the scratch below that the run removes.
        from torch._inductor import codecache  # noqa: F401
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
        tempfile.tempdir = held_dir(engine_scratch(run_id, index))
        if cfg.cluster.device == "cpu":
            prefetch_compiler_lookups()
        with self.spans.span("import vllm"):
            from vllm import LLM

        # Every reload warns that the rotary embedding got no weights: it has none to get (its
        # cos/sin cache is computed, and vLLM puts it back).
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

        def build() -> LLM:
            # Building an engine runs three full garbage collections (after loading the weights,
            # vllm/model_executor/model_loader/base_loader.py, BaseModelLoader.load_model; and
            # before vLLM freezes its heap, vllm/utils/gc_utils.py, freeze_gc_heap), each over
            # every object that importing torch, transformers, Ray and vLLM left behind: 1.7 of
            # the 4.7 s an engine took to start here. Frozen now, as freeze_gc_heap freezes them
            # once the engine is up, they are skipped; the engine's shutdown unfreezes them
            # (vllm/v1/engine/core.py, EngineCore.shutdown).
            gc.freeze()
            llm = LLM(**engine_args(cfg, model_path, index))
            # vLLM labels every token with the weight version current when it was sampled
            # (vllm/v1/engine/core.py, EngineCore.set_weight_version; CompletionOutput.weight_versions).
            llm.update_weight_version(str(self.version))
            return llm

        reward_models = {name: RewardModelClient(run_id, k, cfg.reward_model.num_workers)
                         for k, name in enumerate(model_rewards(cfg.rollout.rewards))}
        self.scorer = Scorer(cfg.rollout.rewards, cfg.rollout.reward_weights, cfg.rollout.reward_timeout_s,
                             reward_models)
        # In-flight updates keep up to max_in_flight groups generating; between rounds, every
        # group submitted is admitted at once, as LLM.generate would. The loop's thread builds
        # the engine, and is the only one that touches it.
        # A loop that stopped leaves an actor that can do nothing: it exits, and Ray restarts it
        # (an engine whose tensor-parallel worker died, or that stepped on weights left half
        # loaded, would otherwise fail every call while Ray saw a live actor).
        with self.spans.span("start engine"):
            self.loop = EngineLoop(build, cfg.rollout.max_in_flight if self.in_flight else 0,
                                   self.spans, salt=lambda: f"policy-{self.version}",
                                   adapter=self._adapter,
                                   on_failure=lambda _: exit_for_restart("the engine's loop stopped"))
        self.llm = self.loop.llm
        # The environment's calls overlap generation: a row of their own in the trace.
        self.env_spans = Spans(f"rollout worker {index} environments")
        self.episodes = EpisodeRunner(cfg, self.loop.submit, models.load_tokenizer(model_path),
                                      self.env_spans, token_versions) if cfg.env.name else None
        """Multi-turn episodes with env.name's environment; None: one completion per sample."""

    def ready(self) -> tuple[str, int]:
        """(incarnation, policy version): a new incarnation means Ray restarted this worker."""
        return self.incarnation, self.version

    def take_spans(self) -> list[Span]:
        return self.spans.take() + self.env_spans.take()

    # --- generation --------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], round_: int = 0, n: int | None = None,
                 max_tokens: int | None = None) -> tuple[list[RolloutGroup], GenerationStats]:
        """G (or `n`) completions per prompt of `rollout.max_tokens` (or `max_tokens`: the
        benchmark's prefill-only call asks 1), scored, with their behaviour log-probs; all of
        them, in the order of `prompts`, once every group is done."""
        return self._generate(prompts, round_, n or self.cfg.grpo.group_size, on_group=None,
                              max_tokens=max_tokens or self.cfg.rollout.max_tokens)

    def stream(self, prompts: list[Prompt], round_: int) -> GenerationStats:
        """As `generate`, but each group goes into the buffer the moment its G completions are
        done; returns once all are stored."""
        self.spans.step = self.env_spans.step = round_
        buffer, stored = ray.get_actor(buffer_name(self.run_id)), []
        _, stats = self._generate(prompts, round_, self.cfg.grpo.group_size, on_group=lambda g: stored.append(
            buffer.put.remote([g], self.cfg.buffer.timeout_s)), max_tokens=self.cfg.rollout.max_tokens)
        ray.get(stored)
        return stats

    def _generate(self, prompts: list[Prompt], round_: int, n: int, on_group,
                  max_tokens: int) -> tuple[list[RolloutGroup], GenerationStats]:
        start = time.perf_counter()
        generate = self._completions if self.episodes is None else self._episodes
        groups = generate(prompts, round_, n, on_group, max_tokens)
        return groups, GenerationStats(tokens=sum(g.num_tokens for g in groups),
                                       seconds=time.perf_counter() - start)

    def _completions(self, prompts: list[Prompt], round_: int, n: int, on_group,
                     max_tokens: int) -> list[RolloutGroup]:
        """`n` completions per prompt, one request each, scored by the reward functions; each
        group goes to `on_group` as soon as it is scored."""
        from vllm import SamplingParams

        rollout = self.cfg.rollout
        events: queue.SimpleQueue = queue.SimpleQueue()  # generated, then scored, in any order
        submitted = self.loop.submit_all([(p.token_ids, SamplingParams(
            n=n, max_tokens=max_tokens, temperature=rollout.temperature, top_p=rollout.top_p,
            logprobs=0, seed=request_seed(self.cfg.seed, round_, p.index))) for p in prompts],
            on_done=events.put)
        position = {future: i for i, future in enumerate(submitted)}
        groups: list[RolloutGroup | None] = [None] * len(prompts)
        # Scoring runs on the scorer's thread while the engine generates on: a group is scored
        # as soon as its completions are done, and stored as soon as it is scored.
        for _ in range(2 * len(prompts)):
            event = events.get()
            if isinstance(event, Future):  # a prompt's completions, done
                i, outputs = position[event], event.result().outputs
                self._score(prompts[i], outputs).add_done_callback(
                    lambda scored, i=i, outputs=outputs: events.put((i, outputs, scored)))
                continue
            i, outputs, scored = event
            groups[i] = self._group(prompts[i], outputs, *scored.result())
            if on_group is not None:
                on_group(groups[i])
        return groups

    def _episodes(self, prompts: list[Prompt], round_: int, n: int, on_group,
                  max_tokens: int) -> list[RolloutGroup]:
        """`n` multi-turn episodes per prompt, scored by their environment; each group goes to
        `on_group` as soon as its episodes are done."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        submitted = [self.episodes.submit(p, round_, n, max_tokens) for p in prompts]
        for future in submitted:
            future.add_done_callback(done.put)
        groups: list[RolloutGroup | None] = [None] * len(prompts)
        position = {future: i for i, future in enumerate(submitted)}
        for _ in prompts:
            future = done.get()
            prompt, episodes = future.result()  # an EnvError ends the round in one line
            rewards = [e.reward for e in episodes]
            groups[position[future]] = group = RolloutGroup(
                prompt=prompt, completions=[e.text for e in episodes],
                completion_ids=[e.token_ids for e in episodes], logprobs=[e.logprobs for e in episodes],
                token_versions=[e.versions for e in episodes],
                finish_reasons=[e.finish_reason for e in episodes], rewards=rewards,
                reward_parts={"env": rewards},
                policy_version=min((v for e in episodes for v in e.versions), default=self.version),
                worker=self.index, model_masks=[e.model_mask for e in episodes],
                episodes=[e.episode for e in episodes])
            if on_group is not None:
                on_group(group)
        return groups

    def _score(self, prompt: Prompt, completions: list) -> Future:
        """The rewards of one prompt's completions, as TRL's reward functions take them."""
        n = len(completions)
        texts = [c.text for c in completions]
        if isinstance(prompt.raw, list):  # chat messages: completions are messages too
            texts = [[{"role": "assistant", "content": text}] for text in texts]
        return self.scorer.submit([prompt.text if prompt.raw is None else prompt.raw] * n, texts,
                                  [list(c.token_ids) for c in completions],
                                  {k: [v] * n for k, v in prompt.columns.items()}, step=self.version)

    def _group(self, prompt: Prompt, completions: list, rewards: list[float],
               parts: dict[str, list[float]]) -> RolloutGroup:
        """One prompt's completions, scored, with the version that sampled each token."""
        versions = [token_versions(c) for c in completions]
        return RolloutGroup(
            prompt=prompt, completions=[c.text for c in completions],
            completion_ids=[list(c.token_ids) for c in completions],
            logprobs=[[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in completions],
            token_versions=versions, finish_reasons=[c.finish_reason for c in completions],
            rewards=rewards, reward_parts=parts,
            policy_version=min(v for tokens in versions for v in tokens), worker=self.index)

    def probe_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """The engine's log-prob of every token of each sequence from its `start` on, each
        given the tokens before it (vLLM's prompt log-probs: temperature 1)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        outputs = self.loop.submit_all([(ids, params) for ids in sequences])
        return [[out.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))]
                for out, ids, start in zip((f.result() for f in outputs), sequences, starts)]

    # --- weights -----------------------------------------------------------------------------

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                          specs: list[TensorSpec], buckets: list[list[int]], timeout_s: float,
                          secret: str) -> None:
        self.loop.call(lambda: self._on_every_rank(WeightSyncExtension.join_weight_group, host, port,
                                                   rank_offset, world_size, specs, buckets, timeout_s, secret))

    def open_shared_weights(self, path: str, specs: list[TensorSpec]) -> None:
        self.loop.call(lambda: self._on_every_rank(WeightSyncExtension.open_shared_weights, path, specs))

    def receive_weights(self, version: int) -> float:
        """Load policy `version` from the weight transport; returns the seconds it took. In flight,
        between two decode steps: requests being generated go on with the new weights (over the
        KV cache of the old). Between rounds, once no request is in the engine."""
        start = time.perf_counter()
        self.loop.call(lambda: self._reload(version), when_idle=not self.in_flight)
        return time.perf_counter() - start

    def _reload(self, version: int) -> None:
        with self.spans.span("reload"):
            adapter = lora.peft_config(self.cfg.learner) if lora.enabled(self.cfg.learner) else None
            self._on_every_rank(WeightSyncExtension.receive_weights, version, adapter)
        self.has_adapter = adapter is not None
        self.llm.update_weight_version(str(version))  # the tokens sampled from now on
        self.version = version  # and the cache salt of the prompts admitted from now on

    def _adapter(self):
        """The LoRA request every request admitted now generates under (None: the model alone).
        A request admitted before a sync goes on under the new adapter from its next token, as
        under new full weights: vLLM reads the adapter's slot at every step
        (vllm/lora/model_manager.py, LoRAModelManager.activate_adapter)."""
        return lora.request(self.version) if self.has_adapter else None

    def _on_every_rank(self, method: Callable, *args) -> None:
        """`method` of the engine's worker extension on each of its ranks. vLLM's RPC is the one
        call made by name: a function passed instead would get vLLM's wrapper as `self`, not
        the worker (vllm/v1/serial_utils.py, run_method), so the name is taken from it."""
        self.llm.collective_rpc(method.__name__, args=args)


def token_versions(completion) -> list[int]:
    """The policy version that sampled each token of a vLLM completion, from vLLM's spans."""
    versions = [int(span.version) for span in completion.weight_versions
                for _ in range(span.start, span.end)]
    if len(versions) != len(completion.token_ids):
        raise RuntimeError(f"vLLM labelled {len(versions)} of {len(completion.token_ids)} tokens "
                           "with a weight version")
    return versions
