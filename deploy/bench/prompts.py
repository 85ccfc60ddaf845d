"""The prompts every measurement uses: the run's train split, rendered and tokenized exactly as a
training run renders them, in the run's own sampling order."""

from __future__ import annotations

from common import data, models
from common.config import Config
from common.types import Prompt


def train_prompts(cfg: Config) -> list[Prompt]:
    tokenizer = models.tokenizer_for(cfg.model.name, cfg.model.cache_dir)
    return data.load_prompts(cfg.data, tokenizer).train


def first(cfg: Config, count: int) -> list[Prompt]:
    """The first `count` prompts a run with this config would train on."""
    return data.PromptSampler(train_prompts(cfg), cfg.seed).take(count)


def mean_length(prompts: list[Prompt]) -> float:
    return sum(len(p.token_ids) for p in prompts) / len(prompts)
