"""The final model's card: TRL's format (front matter, quick start, citation) plus the run's own
sections (reward, GRPO settings, results, versions)."""

from __future__ import annotations

import re

import ray

from common.config import Config
from common.types import RunSummary
from learner.model_card import render


def card() -> str:
    return render(Config(), "/tmp/x/final", RunSummary(steps=40, complete=True, results={"a": 1}))


def test_front_matter():
    text = card()
    assert text.startswith("---\n")
    front = text.split("---\n")[1]
    assert "base_model: tiny\n" in front
    assert "library_name: transformers\n" in front
    assert "model_name: final\n" in front
    tags = re.findall(r"^- (\S+)$", front, flags=re.M)
    assert {"trl", "grpo", "explicit_pos"} <= set(tags)


def test_quick_start_loads_the_final_directory():
    text = card()
    assert "## Quick start" in text
    assert 'pipeline("text-generation", model="/tmp/x/final"' in text


def test_grpo_settings_table():
    text = card()
    assert "| setting | value |" in text
    assert "| loss type | dapo |" in text
    assert "| group size (G) | 8 |" in text
    assert "| completions per step | 32 |" in text
    assert "| epsilon_high | 0.2 |" in text  # None shows as epsilon
    assert "| learning rate | 0.03 |" in text


def test_a_non_default_run_is_described_as_it_ran():
    cfg = Config()
    cfg.model.name = "EleutherAI/pythia-410m-deduped"
    cfg.data.dataset = "trl-lib/tldr"
    cfg.grpo.loss_type, cfg.grpo.beta, cfg.grpo.epsilon_high = "dr_grpo", 0.04, 0.28
    cfg.rollout.rewards, cfg.rollout.reward_weights = ("explicit_pos", "length"), (1.0, 0.5)
    cfg.learner.learning_rate, cfg.buffer.max_policy_lag = 2e-6, 1
    text = render(cfg, "/tmp/x/final", RunSummary(steps=40, complete=True, results={"a": 1}))
    assert "base_model: EleutherAI/pythia-410m-deduped" in text
    assert "[EleutherAI/pythia-410m-deduped](https://huggingface.co/EleutherAI/pythia-410m-deduped)" in text
    assert "trl-lib/tldr" in text
    assert "`explicit_pos` x 1, `length` x 0.5 (weighted sum)" in text
    for row in ("| loss type | dr_grpo |", "| beta (KL) | 0.04 |", "| epsilon_high | 0.28 |",
                "| learning rate | 2e-06 |", "| max policy lag | 1 |"):
        assert row in text, row
    tags = re.search(r"tags:\n((?:- .+\n)+)", text).group(1)
    assert "- length" in tags and "- explicit_pos" in tags


def test_an_environment_run_names_its_environment_as_the_reward():
    cfg = Config()
    cfg.env.name, cfg.env.max_turns = "say_word", 3
    text = render(cfg, "/tmp/x/final", RunSummary(steps=40, complete=True))
    assert "The `say_word` environment (skyrl-gym): episodes of up to 3 model turns" in text
    assert "explicit_pos" not in text  # rollout.rewards does not apply
    tags = re.search(r"tags:\n((?:- .+\n)+)", text).group(1)
    assert "- say_word" in tags


def test_reward_and_results():
    text = card()
    assert "`explicit_pos` x 1 (weighted sum)" in text
    assert "## Results\n\n- a: 1\n" in text


def test_no_results_says_so():
    text = render(Config(), "/tmp/x/final", RunSummary(steps=40, complete=True))
    assert "- (none recorded)" in text


def test_sections_come_before_the_citations():
    text = card()
    assert text.index("## GRPO settings") < text.index("## Citations")
    assert "DeepSeekMath: Pushing the Limits of Mathematical Reasoning" in text
    assert "@article{shao2024deepseekmath," in text


def test_framework_versions():
    text = card()
    assert re.search(r"^- vLLM: \d+\.\d+\.\d+", text, flags=re.M)
    assert f"- Ray: {ray.__version__}\n" in text
