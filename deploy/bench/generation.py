"""Generation throughput: our rollout path (a RolloutWorker's `generate` in a Ray actor: vLLM,
log-probs, rewards, advantages) against Hugging Face `generate`, which TRL's GRPOTrainer uses
without vLLM, on the same model, prompts, group size, completion length and threads."""

from __future__ import annotations

import logging
import time

import torch

from common.types import Prompt
from deploy.bench import flops

log = logging.getLogger(__name__)


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


def measure_ours(worker, prompts: list[Prompt], group_size: int, repeats: int) -> dict:
    """Best of `repeats` calls of the worker's `generate`, timed from the driver (so Ray's
    transfer of the scored groups counts), after a warm-up call."""
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
    return {
        "seconds": wall, "engine_seconds": stats.seconds, "tokens": stats.tokens,
        "completions": stats.completions,
        "completion_lens": [[len(ids) for ids in g.completion_ids] for g in groups],
    }


def measure_hf(generator, prompts: list[Prompt], group_size: int, max_tokens: int,
               temperature: float, top_p: float, repeats: int) -> dict:
    import ray

    ids = [p.token_ids for p in prompts]
    ray.get(generator.generate.remote(ids[:1], group_size, max_tokens, temperature, top_p, -1))
    runs = [ray.get(generator.generate.remote(ids, group_size, max_tokens, temperature, top_p, r))
            for r in range(repeats)]
    best = min(runs, key=lambda run: run["seconds"])
    tokens = sum(sum(lens) for lens in best["completion_lens"])
    return {"seconds": best["seconds"], "tokens": tokens, "completions": len(prompts) * group_size,
            "completion_lens": best["completion_lens"]}


def run(running, hf_generator, prompts: list[Prompt], group_size: int, shape: dict,
        peak_gflops: float, repeats: int) -> dict:
    """Ours and Hugging Face's on one batch; tokens/s and model FLOPs/s as a fraction of peak."""
    r = running.cfg.rollout
    prompt_lens = [len(p.token_ids) for p in prompts]
    sides = {
        "ours": measure_ours(running.cluster.workers[0], prompts, group_size, repeats),
        "hf_generate": measure_hf(hf_generator, prompts, group_size, r.max_tokens, r.temperature,
                                  r.top_p, repeats),
    }
    for name, side in sides.items():
        side["tokens_per_s"] = side["tokens"] / side["seconds"]
        side["completions_per_s"] = side["completions"] / side["seconds"]
        lens = side.pop("completion_lens")
        side["model_gflops"] = flops.generation(shape, prompt_lens, lens) / 1e9
        side["fraction_of_peak"] = side["model_gflops"] / side["seconds"] / peak_gflops
        log.info("generation %s, %d completions: %.0f tokens/s, %.0f%% of peak", name,
                 side["completions"], side["tokens_per_s"], 100 * side["fraction_of_peak"])
    ours = sides["ours"]
    ours["engine_tokens_per_s"] = ours["tokens"] / ours["engine_seconds"]
    ours["engine_fraction_of_peak"] = ours["model_gflops"] / ours["engine_seconds"] / peak_gflops
    return {"completions": len(prompts) * group_size, "prompts": len(prompts),
            "mean_prompt_tokens": sum(prompt_lens) / len(prompt_lens), **sides,
            "ratio_tokens_per_s": ours["tokens_per_s"] / sides["hf_generate"]["tokens_per_s"]}
