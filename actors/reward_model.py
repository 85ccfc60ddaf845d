"""Reward models as their own actors: a sequence-classification model scores completions, as
TRL's GRPOTrainer scores with one named in `reward_funcs` (`_calculate_rewards`), on its own
resources, so a large reward model neither sits in every rollout worker nor holds up generation.

`RewardModel` is a plain class, made a Ray actor at launch; `RewardModelClient` is what a rollout
worker's scorer calls in its place, an `async` reward function."""

from __future__ import annotations

import asyncio
import logging
import os

import torch

from common import logs, models
from common.config import Config, cpu_threads
from common.rewards import MODEL_PREFIX

log = logging.getLogger(__name__)
RESTART_POLL_S = 1.0


def actor_name(run_id: str, reward: int, index: int) -> str:
    """The Ray name of actor `index` of the run's `reward`-th reward model: rollout workers find
    it by name, also after either of them was restarted."""
    return f"grpo-ray-reward-{run_id}-{reward}-{index}"


class RewardModel:
    def __init__(self, cfg: Config, name: str, index: int = 0):
        from transformers import AutoModelForSequenceClassification

        if cfg.run_dir:
            logs.actor_file(cfg.run_dir, f"reward-model-{index}")
        path = models.resolve(name.removeprefix(MODEL_PREFIX), cfg.model.cache_dir)
        # On a GPU cluster "cuda" is the actor's own GPU: Ray sets CUDA_VISIBLE_DEVICES to the
        # GPUs of its num_gpus (ray/_private/utils.py, set_visible_accelerator_ids), as for the
        # learner (learner/learner.py).
        self.device = "cpu" if cfg.cluster.device == "cpu" else "cuda"
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads(cfg, "reward_model", len(os.sched_getaffinity(0))))
        self.tokenizer = models.load_tokenizer(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # TRL loads it so (GRPOTrainer.__init__): one logit, and the pad token it pads with, so
        # that the score is read at each text's last real token.
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(self.device)
        self.model.config.get_text_config().pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        log.info("reward model %s loaded on %s", path, self.device)

    def score(self, prompts: list, completions: list) -> list[float]:
        """The model's first logit for each prompt + completion, as TRL computes it: the text
        joined, or chat messages through the reward tokenizer's template; padded on the right,
        no special tokens added."""
        if isinstance(prompts[0], list):
            from trl.data_utils import apply_chat_template

            texts = [apply_chat_template({"messages": p + c}, self.tokenizer)["text"]
                     for p, c in zip(prompts, completions, strict=True)]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        inputs = self.tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                                add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            return self.model(**inputs).logits[:, 0].float().tolist()


class RewardModelClient:
    """A reward function that sends each batch to one of a reward model's actors in turn. An
    actor that died is asked again until Ray has restarted it; the scorer's timeout
    (rollout.reward_timeout_s) bounds the wait."""

    def __init__(self, run_id: str, reward: int, actors: int):
        self.names = [actor_name(run_id, reward, i) for i in range(actors)]
        self.next = 0

    async def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        import ray

        index, self.next = self.next, (self.next + 1) % len(self.names)
        while True:
            try:
                return await ray.get_actor(self.names[index]).score.remote(prompts, completions)
            except ray.exceptions.RayActorError as e:  # died in the call, or is restarting
                log.warning("reward model actor %s: %s; asking again once Ray has restarted it",
                            self.names[index], type(e).__name__)
                await asyncio.sleep(RESTART_POLL_S)
