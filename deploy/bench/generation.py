"""Generation throughput: our rollout path (a RolloutWorker's `generate` in a Ray actor: vLLM,
log-probs, rewards, advantages) against Hugging Face `generate`, which TRL's GRPOTrainer uses
without vLLM, on the same model, prompts, group size, completion length and threads."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from common.types import GenerationStats, Prompt
from deploy.bench import flops, prompts, render
from deploy.bench.machine import ModelShape

if TYPE_CHECKING:
    from common.config import RolloutConfig
    from deploy.bench.cluster import Running
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)
# Model FLOPs/s of generation over the peak, at TARGET_BATCH completions per call or more.
TARGET_FRACTION, TARGET_BATCH = 0.5, 128


@dataclass
class Settings:
    """Generation: the rollout path vs Hugging Face `generate` (TRL's path without vLLM)."""

    preset: str = "pythia-70m-shape"
    """Model generating."""
    batches: tuple[int, ...] = (16, 128)
    """Completions per generate call (multiples of group_size)."""
    tokens: int = 64
    """Completion length."""
    repeats: int = 3
    """Timed calls of each side (after a warm-up): the best counts."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(preset="tiny", batches=(16,), tokens=8, repeats=1)


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
    """The same call, as the engine times it around vLLM's `generate` alone (no scoring, no
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

    def __init__(self, model_dir: str, threads: int, rollout: RolloutConfig, group_size: int):
        from transformers import AutoModelForCausalLM, GenerationConfig

        from common import models

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = tok = models.load_tokenizer(model_dir)
        self.group_size = group_size
        self.config = GenerationConfig(  # TRL 1.16's generation kwargs on this path
            max_new_tokens=rollout.max_tokens, do_sample=True, temperature=rollout.temperature,
            top_p=rollout.top_p, top_k=0, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            num_return_sequences=group_size, disable_compile=True)

    def generate(self, prompt_ids: list[list[int]], seed: int) -> tuple[float, list[list[int]]]:
        """Seconds of the call and each prompt's completion lengths."""
        width = max(len(p) for p in prompt_ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):  # left padding, as TRL pads prompts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask,
                                      generation_config=self.config)
        seconds = time.perf_counter() - start
        # A completion ends at its first end-of-text (counted); the rest of the row is padding.
        is_eos = out[:, width:] == self.tokenizer.eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, is_eos.shape[1])
        return seconds, lengths.view(len(prompt_ids), self.group_size).tolist()


def run(harness: Harness, s: Settings) -> GenerationResult:
    """Ours and Hugging Face's on each batch, best of `repeats` calls each after a warm-up."""
    import ray

    from common import models

    threads, g = harness.options.threads, harness.options.group_size
    running = harness.pool.get(s.preset, 1, tokens=s.tokens, cpus=threads)
    shape, peak, r = harness.shape(s.preset), harness.peak_gflops, running.cfg.rollout
    model_dir = str(models.resolve(s.preset, running.cfg.model.cache_dir))
    hf = ray.remote(num_cpus=threads)(HFGenerator).remote(model_dir, threads, r, g)
    try:
        batches = [_batch(running, hf, prompts.first(running.cfg, b // g), s.repeats,
                          shape=shape, peak_gflops=peak) for b in s.batches]
    finally:
        ray.kill(hf)
    return GenerationResult(model=shape, batches=batches, config={
        "G": g, "completion tokens": r.max_tokens, "temperature": r.temperature,
        "top_p": r.top_p, "threads each side": threads, "best of": s.repeats})


def _batch(running: Running, hf, chosen: list[Prompt], repeats: int, *, shape: ModelShape,
           peak_gflops: float) -> GenerationBatch:
    """Both sides on `chosen` x G completions, best of `repeats` calls each after a warm-up."""
    import ray

    g, n = running.cfg.grpo.group_size, len(chosen) * running.cfg.grpo.group_size
    wall, stats, our_lens = _ours(running.actors.workers[0], chosen, g, repeats)
    ids = [p.token_ids for p in chosen]
    ray.get(hf.generate.remote(ids[:1], -1))
    hf_s, hf_lens = min(ray.get([hf.generate.remote(ids, r) for r in range(repeats)]))
    prompt_lens = [len(p) for p in ids]
    our_gflops = flops.generation(shape, prompt_lens, our_lens) / 1e9

    def side(seconds: float, tokens: int, gflops: float) -> GenerationSide:
        return GenerationSide(seconds=seconds, tokens=tokens, completions=n,
                              tokens_per_s=tokens / seconds, completions_per_s=n / seconds,
                              model_gflops=gflops, fraction_of_peak=gflops / seconds / peak_gflops)

    batch = GenerationBatch(
        completions=n, prompts=len(chosen), mean_prompt_tokens=prompts.mean_length(chosen),
        ours=side(wall, stats.tokens, our_gflops),
        ours_engine=side(stats.seconds, stats.tokens, our_gflops),
        hf_generate=side(hf_s, sum(map(sum, hf_lens)),
                         flops.generation(shape, prompt_lens, hf_lens) / 1e9))
    log.info("generation, %d completions: ours %.0f tokens/s (%.0f%% of peak), HF %.0f tokens/s",
             n, batch.ours.tokens_per_s, 100 * batch.ours.fraction_of_peak,
             batch.hf_generate.tokens_per_s)
    return batch


def _ours(worker, chosen: list[Prompt], g: int,
          repeats: int) -> tuple[float, GenerationStats, list[list[int]]]:
    """The best call of the worker's `generate`, timed from the driver (so Ray's transfer of the
    scored groups counts): its seconds, the engine's own stats of it (its `seconds` around
    vLLM's `generate` alone) and each group's completion lengths."""
    import ray

    ray.get(worker.generate.remote(chosen[:1], -1, g))
    calls = []
    for r in range(repeats):
        start = time.perf_counter()
        groups, stats = ray.get(worker.generate.remote(chosen, r, g))
        lengths = [[len(ids) for ids in group.completion_ids] for group in groups]
        calls.append((time.perf_counter() - start, stats, lengths))
    return min(calls, key=lambda call: call[0])


def markdown(g: GenerationResult) -> list[str]:
    rows = []
    for b in g.batches:
        o, e, h = b.ours, b.ours_engine, b.hf_generate
        rows += [[b.completions, "ours (rollout worker)", o.tokens_per_s, o.completions_per_s,
                  render.pct(o.fraction_of_peak), f"{b.ratio_tokens_per_s:.1f}x"],
                 [b.completions, "ours, engine only", e.tokens_per_s, "",
                  render.pct(e.fraction_of_peak), ""],
                 [b.completions, "HF generate (TRL's path)", h.tokens_per_s, h.completions_per_s,
                  render.pct(h.fraction_of_peak), "1.0x"]]
    header = ["completions", "side", "tokens/s", "completions/s", "model FLOPs vs peak", "ratio"]
    return render.labelled(g.config, g.model, header, rows)


def targets(g: GenerationResult) -> list[list[str]]:
    big = [b for b in g.batches if b.completions >= TARGET_BATCH]
    if not big:
        return []
    b = max(big, key=lambda b: b.ours.fraction_of_peak)
    return [[f"generation at {b.completions} completions: model FLOPs/s vs peak",
             f">= {render.pct(TARGET_FRACTION)}", render.pct(b.ours.fraction_of_peak),
             render.met(b.ours.fraction_of_peak >= TARGET_FRACTION)]]


def chart(ax, g: GenerationResult) -> None:
    labels, values, notes = [], [], []
    for b in g.batches:
        for side, name in ((b.ours, "ours"), (b.hf_generate, "HF generate")):
            labels.append(f"{name}\n{b.completions} compl.")
            values.append(side.tokens_per_s)
            notes.append(f"{side.tokens_per_s:,.0f} ({render.pct(side.fraction_of_peak)} peak)")
    render.bars(ax, labels, values, notes)
    render.titled(ax, "Generation", "tokens/s", g.config, g.model)
