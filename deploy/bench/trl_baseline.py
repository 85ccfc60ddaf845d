"""TRL's GRPOTrainer (HF `generate`, no vLLM) on the benchmark's configuration, in its own process
so it owns the machine's threads, recording the wall-clock time and reward of every step:

    python -m deploy.bench.trl_baseline spec.json result.json

`deploy/bench/end_to_end.py` writes the spec (see `spec_for`) and reads the result.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from common import models
from common.rewards import Scorer


class StepClock(TrainerCallback):
    """Seconds from the start of training to the end of each optimizer step, and its reward;
    stops training once the reward reaches `stop_at` (if given)."""

    def __init__(self, stop_at: float | None):
        self.stop_at = stop_at
        self.begin = 0.0
        self.startup_s = 0.0
        self.ends: dict[int, float] = {}
        self.logs: dict[int, dict] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()
        # From the start of this process: its imports count, as our actors' imports do.
        self.startup_s = time.time() - psutil.Process().create_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends[state.global_step] = time.perf_counter() - self.begin

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.logs[state.global_step] = dict(logs)
            if self.stop_at is not None and logs["reward"] >= self.stop_at:
                control.should_training_stop = True


def reward_function(names: list[str], weights: list[float]):
    """Our reward functions, summed with their weights, as one TRL reward function."""
    scorer = Scorer(names, weights)

    def reward(prompts, completions, **kwargs):
        return scorer(list(prompts), list(completions))[0]

    reward.__name__ = "+".join(names)
    return reward


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)  # as our learner computes (learner/learner.py), TRL does too
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    args = GRPOConfig(
        output_dir=spec["output_dir"], max_steps=spec["steps"], seed=spec["seed"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["batch_size"] // spec["micro_batch_size"],
        num_generations=spec["group_size"], max_completion_length=spec["max_tokens"],
        temperature=spec["temperature"], top_p=spec["top_p"],
        learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        # max_grad_norm 0 turns clipping off in both.
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"],
        beta=spec["beta"], loss_type=spec["loss_type"], epsilon=spec["epsilon"],
        epsilon_high=spec["epsilon_high"], scale_rewards=spec["scale_rewards"],
        num_iterations=spec["num_iterations"],
        use_cpu=True, bf16=spec["bf16"], report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True,
    )
    clock = StepClock(spec.get("stop_at"))
    trainer = GRPOTrainer(
        model=model, args=args, processing_class=models.load_tokenizer(spec["model_dir"]),
        reward_funcs=reward_function(spec["rewards"], spec["reward_weights"]),
        # Prompts already rendered with the chat template, exactly as our runs see them.
        train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}),
        callbacks=[clock],
    )
    trainer.train()
    startup = clock.startup_s
    steps = [{"step": step, "elapsed_s": startup + end,
              "reward": clock.logs.get(step, {}).get("reward", float("nan")),
              "tokens": clock.logs.get(step, {}).get("completions/mean_length", float("nan"))
              * spec["batch_size"]}
             for step, end in sorted(clock.ends.items())]
    Path(result_path).write_text(json.dumps({
        "first_step_start_s": startup, "steps": steps, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
