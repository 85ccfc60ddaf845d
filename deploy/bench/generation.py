"""Generation throughput: our rollout path (a RolloutWorker's `generate` in a Ray actor: vLLM,
log-probs, rewards, advantages) against Hugging Face `generate`, which TRL's GRPOTrainer uses
without vLLM, on the same model, prompts, group size, completion length and threads; and our
engine's prefill and decode against their roofline floors."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from common.types import GenerationStats, Prompt
from deploy.bench import flops, prompts, render, roofline
from deploy.bench.machine import ModelShape
from deploy.bench.peak import PeakResult
from deploy.bench.roofline import Phase

if TYPE_CHECKING:
    from common.config import RolloutConfig
    from deploy.bench.cluster import Running
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)
# Our generation's roofline floor over its time, at TARGET_BATCH completions per call.
TARGET_SHARE, TARGET_BATCH = 0.5, 16


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
    dtype: str
    """What it computes in."""
    fraction_of_peak: float
    """Model FLOPs/s over the machine's matmul peak in `dtype`."""


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
    phases: list[Phase]
    """Our engine's prefill (a call of one token per completion) and decode (the rest of the
    whole call), each against its roofline floor."""
    floor_s: float
    """The whole call's floor: prefill's plus decode's."""
    share_of_floor: float
    """`floor_s` over our rollout worker's call (`ours.seconds`)."""
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
    shape, peak, r = harness.shape(s.preset), harness.peak, running.cfg.rollout
    model_dir = str(models.resolve(s.preset, running.cfg.model.cache_dir))
    hf = ray.remote(num_cpus=threads)(HFGenerator).remote(model_dir, threads, r, g)
    dtype = harness.dtype(running.cfg)
    try:
        batches = [_batch(running, hf, prompts.first(running.cfg, b // g), s.repeats,
                          shape=shape, peak=peak, dtype=dtype) for b in s.batches]
    finally:
        ray.kill(hf)
    return GenerationResult(model=shape, batches=batches, config={
        "G": g, "completion tokens": r.max_tokens, "temperature": r.temperature,
        "top_p": r.top_p, "ours in": dtype, "HF in": "float32", "threads each side": threads,
        "best of": s.repeats})


def _batch(running: Running, hf, chosen: list[Prompt], repeats: int, *, shape: ModelShape,
           peak: PeakResult, dtype: str) -> GenerationBatch:
    """Both sides on `chosen` x G completions, best of `repeats` calls each after a warm-up;
    and our engine's prefill alone, to split its call into phases."""
    import ray

    g, n = running.cfg.grpo.group_size, len(chosen) * running.cfg.grpo.group_size
    worker = running.actors.workers[0]
    wall, stats, our_lens = _ours(worker, chosen, g, repeats)
    _, prefill, _ = _ours(worker, chosen, g, repeats, max_tokens=1)
    ids = [p.token_ids for p in chosen]
    ray.get(hf.generate.remote(ids[:1], -1))
    hf_s, hf_lens = min(ray.get([hf.generate.remote(ids, r) for r in range(repeats)]))
    prompt_lens = [len(p) for p in ids]
    our_gflops = flops.generation(shape, prompt_lens, our_lens) / 1e9

    def side(seconds: float, tokens: int, gflops: float, dtype: str) -> GenerationSide:
        return GenerationSide(seconds=seconds, tokens=tokens, completions=n,
                              tokens_per_s=tokens / seconds, completions_per_s=n / seconds,
                              model_gflops=gflops, dtype=dtype,
                              fraction_of_peak=gflops / seconds / peak.gflops(dtype))

    phases = [
        roofline.phase("prefill", dtype, prefill.seconds,
                       sum(flops.prefill(shape, p) for p in prompt_lens) / 1e9,
                       roofline.prefill_gbytes(shape, prompt_lens, dtype), peak),
        roofline.phase("decode", dtype, stats.seconds - prefill.seconds,
                       sum(flops.decode(shape, p, c) for p, cs in zip(prompt_lens, our_lens)
                           for c in cs) / 1e9,
                       roofline.decode_gbytes(shape, prompt_lens, our_lens, dtype), peak)]
    floor = sum(p.floor_s for p in phases)
    batch = GenerationBatch(
        completions=n, prompts=len(chosen), mean_prompt_tokens=prompts.mean_length(chosen),
        ours=side(wall, stats.tokens, our_gflops, dtype),
        ours_engine=side(stats.seconds, stats.tokens, our_gflops, dtype),
        hf_generate=side(hf_s, sum(map(sum, hf_lens)),
                         flops.generation(shape, prompt_lens, hf_lens) / 1e9, "float32"),
        phases=phases, floor_s=floor, share_of_floor=floor / wall)
    log.info("generation, %d completions: ours %.0f tokens/s (%.0f%% of its floor), HF %.0f "
             "tokens/s", n, batch.ours.tokens_per_s, 100 * batch.share_of_floor,
             batch.hf_generate.tokens_per_s)
    return batch


def _ours(worker, chosen: list[Prompt], g: int, repeats: int,
          max_tokens: int | None = None) -> tuple[float, GenerationStats, list[list[int]]]:
    """The best call of the worker's `generate`, timed from the driver (so Ray's transfer of the
    scored groups counts): its seconds, the engine's own stats of it (its `seconds` around
    vLLM's `generate` alone) and each group's completion lengths."""
    import ray

    ray.get(worker.generate.remote(chosen[:1], -1, g, max_tokens))
    calls = []
    for r in range(repeats):
        start = time.perf_counter()
        groups, stats = ray.get(worker.generate.remote(chosen, r, g, max_tokens))
        lengths = [[len(ids) for ids in group.completion_ids] for group in groups]
        calls.append((time.perf_counter() - start, stats, lengths))
    return min(calls, key=lambda call: call[0])


def markdown(g: GenerationResult) -> list[str]:
    rows = []
    for b in g.batches:
        o, e, h = b.ours, b.ours_engine, b.hf_generate
        rows += [[b.completions, "ours (rollout worker)", o.tokens_per_s, o.completions_per_s,
                  render.pct(o.fraction_of_peak), render.pct(b.share_of_floor),
                  f"{b.ratio_tokens_per_s:.1f}x"],
                 [b.completions, "ours, engine only", e.tokens_per_s, "",
                  render.pct(e.fraction_of_peak), render.pct(b.floor_s / e.seconds), ""],
                 [b.completions, "HF generate (TRL's path)", h.tokens_per_s, h.completions_per_s,
                  render.pct(h.fraction_of_peak), "", "1.0x"]]
    header = ["completions", "side", "tokens/s", "completions/s",
              "model FLOPs vs peak of its dtype", "share of roofline floor", "ratio"]
    phases = [[b.completions, *row] for b in g.batches for row in roofline.rows(b.phases)]
    return [*render.labelled(g.config, g.model, header, rows),
            "Our engine's call in phases: prefill is a call of one token per completion, decode "
            "the rest of the whole call.", "",
            *render.table(["completions", *roofline.HEADER], phases)]


def targets(g: GenerationResult) -> list[list[str]]:
    chosen = [b for b in g.batches if b.completions == TARGET_BATCH]
    if not chosen:
        return []
    b = chosen[0]
    return [[f"generation at {b.completions} completions: share of its roofline floor",
             f">= {render.pct(TARGET_SHARE)}", render.pct(b.share_of_floor),
             render.met(b.share_of_floor >= TARGET_SHARE)]]


def chart(ax, g: GenerationResult) -> None:
    labels, values, notes = [], [], []
    for b in g.batches:
        for side, name in ((b.ours, "ours"), (b.hf_generate, "HF generate")):
            labels.append(f"{name}\n{b.completions} compl.")
            values.append(side.tokens_per_s)
            notes.append(f"{side.tokens_per_s:,.0f} ({render.pct(side.fraction_of_peak)} peak)")
    render.bars(ax, labels, values, notes)
    render.titled(ax, "Generation", "tokens/s", g.config, g.model)
