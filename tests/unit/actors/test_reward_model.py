"""A reward model's scores are the classifier's first logit on prompt + completion, computed as
TRL computes it; a `model:PATH` that cannot load is refused before anything starts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from actors.reward_model import RewardModel
from common.config import Config, RolloutConfig
from deploy.launch import plan


def logits_one_at_a_time(path, texts: list[str]) -> list[float]:
    """The oracle: each text alone, unpadded, through transformers' own classifier."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                for t in texts]


def test_scores_are_the_classifiers_logits_on_prompt_and_completion(reward_model_dir):
    cfg = Config(rollout=RolloutConfig(rewards=(f"model:{reward_model_dir}",)))
    prompts = ["How was the film?", "How was the film?", "Describe the sea."]
    completions = [" Wonderful, I loved it.", " Dull", " Grey and endless, under a low sky."]
    scores = RewardModel(cfg, f"model:{reward_model_dir}").score(prompts, completions)
    expected = logits_one_at_a_time(reward_model_dir, [p + c for p, c in zip(prompts, completions)])
    assert len(set(expected)) == 3  # the precondition: the texts score apart (lengths differ, so padding matters)
    assert scores == pytest.approx(expected, abs=1e-5)


def test_conversational_texts_go_through_the_reward_tokenizers_chat_template(reward_model_dir):
    cfg = Config(rollout=RolloutConfig(rewards=(f"model:{reward_model_dir}",)))
    prompt = [{"role": "user", "content": "How was the film?"}]
    completion = [{"role": "assistant", "content": "Wonderful."}]
    [score] = RewardModel(cfg, f"model:{reward_model_dir}").score([prompt], [completion])
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert "Wonderful." in text and score == pytest.approx(logits_one_at_a_time(reward_model_dir, [text])[0], abs=1e-5)


def test_a_reward_model_that_cannot_load_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    for path, words in ((tmp_path / "absent", "no such directory"), (tmp_path, "cannot load its config")):
        problems = Config(rollout=RolloutConfig(rewards=(f"model:{path}",))).problems()
        [line] = [p for p in problems if "model:" in p]
        assert line.startswith(f"rollout.rewards: model:{path}: ") and words in line and "\n" not in line


def test_each_reward_model_gets_its_own_actors_and_bundles(reward_model_dir):
    cfg = Config(rollout=RolloutConfig(rewards=("explicit_pos", f"model:{reward_model_dir}")))
    cfg.reward_model.num_workers, cfg.reward_model.num_cpus = 2, 3
    bundles = plan(cfg).bundles
    assert bundles[-2:] == [{"CPU": 3.0}, {"CPU": 3.0}] and len(bundles) == 1 + 1 + 2
