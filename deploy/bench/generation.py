"""Generation throughput: our rollout path (a RolloutWorker's `generate` in a Ray actor: vLLM,
log-probs, rewards, advantages) against Hugging Face `generate`, which TRL's GRPOTrainer uses
without vLLM, on the same model, prompts, group size, completion length and threads."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from common.types import GenerationStats, Prompt
from deploy.bench import flops
from deploy.bench.machine import ModelShape

log = logging.getLogger(__name__)


@dataclass
class GenerationSide:
    """One side's best call on a batch."""

    seconds: float
    tokens: int
    """Completion tokens generated."""
    completions: int
    tokens_per_s: float
    completions_per_s: float
    model_gflops: float
    """Model FLOPs of the call (flops.generation), in GFLOP."""
    fraction_of_peak: float
    """Model FLOPs/s over the machine's matmul peak."""


@dataclass
class GenerationBatch:
    """Both sides on one batch of prompts x G completions."""

    completions: int
    prompts: int
    mean_prompt_tokens: float
    ours: GenerationSide
    """Our rollout worker's `generate`, timed from the driver."""
    ours_engine: GenerationSide
    """The same call, timed inside the worker around vLLM's `generate` alone (no scoring, no
    Ray)."""
    hf_generate: GenerationSide
    """Hugging Face `generate`, as TRL's GRPOTrainer samples without vLLM."""
    ratio_tokens_per_s: float = field(init=False)
    """Our tokens/s over Hugging Face's."""

    def __post_init__(self):
        self.ratio_tokens_per_s = self.ours.tokens_per_s / self.hf_generate.tokens_per_s


@dataclass
class GenerationResult:
    model: ModelShape
    config: dict[str, object]
    """What the numbers were measured with, as the report labels them."""
    batches: list[GenerationBatch]


class HFGenerator:
    """Sampling as TRL's GRPOTrainer does without vLLM: one `model.generate` over the batch."""

    def __init__(self, model_dir: str, threads: int):
        from transformers import AutoModelForCausalLM

        from common import models

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = models.load_tokenizer(model_dir)

    def generate(self, prompt_ids: list[list[int]], group_size: int, max_tokens: int,
                 temperature: float, top_p: float, seed: int) -> dict:
        from transformers import GenerationConfig

        tok = self.tokenizer
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):  # left padding, as TRL pads prompts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        config = GenerationConfig(  # TRL 1.16's generation kwargs on this path
            max_new_tokens=max_tokens, do_sample=True, temperature=temperature, top_p=top_p,
            top_k=0,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, num_return_sequences=group_size, disable_compile=True)
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask,
                                      generation_config=config)
        seconds = time.perf_counter() - start
        completions = out[:, width:]
        # A completion ends at its first end-of-text (counted); the rest of the row is padding.
        is_eos = completions == tok.eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completions.shape[1])
        return {"seconds": seconds,
                "completion_lens": lengths.view(len(prompt_ids), group_size).tolist()}


def measure_ours(worker, prompts: list[Prompt], group_size: int,
                 repeats: int) -> tuple[float, GenerationStats, list[list[int]]]:
    """Best of `repeats` calls of the worker's `generate`, timed from the driver (so Ray's
    transfer of the scored groups counts), after a warm-up call: its wall-clock seconds, the
    engine's own stats of it and each group's completion lengths."""
    import ray

    ray.get(worker.generate.remote(prompts[:1], -1, group_size))
    best = None
    for r in range(repeats):
        start = time.perf_counter()
        groups, stats = ray.get(worker.generate.remote(prompts, r, group_size))
        wall = time.perf_counter() - start
        if best is None or wall < best[0]:
            best = (wall, stats, groups)
    wall, stats, groups = best
    return wall, stats, [[len(ids) for ids in g.completion_ids] for g in groups]


def measure_hf(generator, prompts: list[Prompt], group_size: int, max_tokens: int,
               temperature: float, top_p: float, repeats: int) -> tuple[float, list[list[int]]]:
    """Best of `repeats` calls after a warm-up: its seconds and each group's completion lengths."""
    import ray

    ids = [p.token_ids for p in prompts]
    ray.get(generator.generate.remote(ids[:1], group_size, max_tokens, temperature, top_p, -1))
    runs = [ray.get(generator.generate.remote(ids, group_size, max_tokens, temperature, top_p, r))
            for r in range(repeats)]
    best = min(runs, key=lambda run: run["seconds"])
    return best["seconds"], best["completion_lens"]


def _side(seconds: float, tokens: int, completions: int, model_gflops: float,
          peak_gflops: float) -> GenerationSide:
    return GenerationSide(seconds=seconds, tokens=tokens, completions=completions,
                          tokens_per_s=tokens / seconds, completions_per_s=completions / seconds,
                          model_gflops=model_gflops,
                          fraction_of_peak=model_gflops / seconds / peak_gflops)


def run(running, hf_generator, prompts: list[Prompt], group_size: int, shape: ModelShape,
        peak_gflops: float, repeats: int) -> GenerationBatch:
    """Ours and Hugging Face's on one batch; tokens/s and model FLOPs/s as a fraction of peak."""
    r = running.cfg.rollout
    prompt_lens = [len(p.token_ids) for p in prompts]
    wall, stats, our_lens = measure_ours(running.cluster.workers[0], prompts, group_size, repeats)
    hf_seconds, hf_lens = measure_hf(hf_generator, prompts, group_size, r.max_tokens,
                                     r.temperature, r.top_p, repeats)
    our_gflops = flops.generation(shape, prompt_lens, our_lens) / 1e9
    completions = len(prompts) * group_size
    batch = GenerationBatch(
        completions=completions, prompts=len(prompts),
        mean_prompt_tokens=sum(prompt_lens) / len(prompt_lens),
        ours=_side(wall, stats.tokens, stats.completions, our_gflops, peak_gflops),
        ours_engine=_side(stats.seconds, stats.tokens, stats.completions, our_gflops, peak_gflops),
        hf_generate=_side(hf_seconds, sum(map(sum, hf_lens)), completions,
                          flops.generation(shape, prompt_lens, hf_lens) / 1e9, peak_gflops))
    for name, s in (("ours", batch.ours), ("hf_generate", batch.hf_generate)):
        log.info("generation %s, %d completions: %.0f tokens/s, %.0f%% of peak", name,
                 s.completions, s.tokens_per_s, 100 * s.fraction_of_peak)
    return batch
