"""The learner's step, where its time goes: `Learner.train` on the end-to-end section's shape
(its batch, prompt and completion lengths, dtype and threads), with the log-probs taken through
`token_logprobs` (the learner's way on a CPU) and through the whole float32 logits (its way on a
GPU, and this project's before), on the random-init policy and on one sharpened as training
sharpens it (the output layer scaled up; its distributions put most of the vocabulary below
exp(-87)). Then torch's profiler over the learner's own steps, its operators' time in groups.
No engines, no Ray: the learners run in a child process started with the learner actor's
environment (deploy/launch.py, `learner_env`)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import statistics
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deploy.bench import render
from deploy.bench.machine import ModelShape
from deploy.bench.padding import spread_batch

if TYPE_CHECKING:
    from common.config import Config
    from deploy.bench.harness import Harness

log = logging.getLogger(__name__)
GROUPS = {  # profiler operator -> group; the first matching prefix wins, in this order
    "aten::mm": "matmuls", "aten::addmm": "matmuls", "aten::bmm": "matmuls",
    "aten::_scaled_dot_product": "attention", "aten::copy_": "casts and copies",
}


@dataclass
class Settings:
    """The learner's step: log-probs chunked vs whole logits, and a profile of its operators."""

    preset: str = "pythia-70m-shape"
    """Model trained."""
    batch: int = 16
    """Completions per learner step (the e2e section's)."""
    prompt_tokens: int = 16
    """Prompt length."""
    tokens: int = 64
    """Completion length (every completion full length, as in the e2e section)."""
    sharpen: float = 30.0
    """The sharpened policy's output layer is scaled by this."""
    steps: int = 3
    """Timed learner steps per case (after one warm-up step), and profiled steps."""

    @classmethod
    def smoke(cls) -> Settings:
        return cls(preset="tiny", batch=8, prompt_tokens=4, tokens=8, steps=1)


@dataclass
class Case:
    policy: str
    log_probs: str
    seconds_per_step: float
    """Median over the timed steps."""
    entropy: float
    """The policy's mean entropy per token on the batch, in nats."""


@dataclass
class LearnerStepResult:
    model: ModelShape
    config: dict[str, object]
    cases: list[Case]
    profile: dict[str, float]
    """Seconds per step by operator group (the profiled steps' mean), chunked, random init."""
    step_s: float
    """The profiled steps' mean wall time (the profiler's own cost included)."""


def _config(harness: Harness, s: Settings) -> Config:
    return harness.config(model=s.preset, batch=s.batch, tokens=s.tokens,
                          extra=("--learner.threads", str(harness.options.threads)))


def _case(cfg: Config, s: Settings, groups, sharpen: float, chunked: bool) -> Case:
    from learner.learner import Learner

    learner = Learner(cfg)
    with torch.no_grad():
        learner.model.get_output_embeddings().weight.mul_(sharpen)
    if not chunked:
        learner._fused_head_of = lambda model: None
    learner.train(groups)  # warm-up
    steps = [learner.train(groups) for _ in range(s.steps)]
    return Case(policy="random init" if sharpen == 1 else f"sharpened (output layer x{sharpen:g})",
                log_probs="chunked (token_logprobs)" if chunked else "whole float32 logits",
                seconds_per_step=statistics.median(m["train_s"] for m in steps),
                entropy=steps[0]["entropy"])


def _group(name: str, ancestors: list[str]) -> str:
    """The group of a profiler operator `name`, called from within `ancestors`."""
    if any(a.startswith("Optimizer.step#") for a in [name, *ancestors]):
        return "optimizer (AdamW)"
    for prefix, group in GROUPS.items():
        if name.startswith(prefix):
            return group
    if any(a.startswith("_TokenLogprobs") for a in [name, *ancestors]):
        return "log-probs' float32 pass over the vocabulary"
    return "everything else"


def _profile(cfg: Config, s: Settings, groups) -> tuple[dict[str, float], float]:
    from torch.profiler import ProfilerActivity, profile

    from learner.learner import Learner

    learner = Learner(cfg)
    learner.train(groups)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = sum(learner.train(groups)["train_s"] for _ in range(s.steps))
    spent: dict[str, float] = defaultdict(float)
    for event in prof.events():
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        spent[_group(event.name, ancestors)] += event.self_cpu_time_total / 1e6 / s.steps
    return dict(sorted(spent.items(), key=lambda kv: -kv[1])), seconds / s.steps


def run(harness: Harness, s: Settings) -> LearnerStepResult:
    from deploy.launch import learner_env

    g, cfg = harness.options.group_size, _config(harness, s)
    groups = spread_batch(g, s.batch // g, s.prompt_tokens, s.tokens, s.tokens)
    saved = dict(os.environ)
    os.environ.update(learner_env())  # the child inherits it: its C library reads it as it starts
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            cases = [child.submit(_case, cfg, s, groups, sharpen, chunked).result()
                     for sharpen in (1.0, s.sharpen) for chunked in (False, True)]
            profile, step_s = child.submit(_profile, cfg, s, groups).result()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    result = LearnerStepResult(
        model=harness.shape(s.preset), cases=cases, profile=profile, step_s=step_s,
        config={"completions": s.batch, "G": g, "prompt tokens": s.prompt_tokens,
                "completion tokens": s.tokens, "threads": harness.options.threads,
                "dtype": harness.dtype(cfg), **learner_env(),
                "timed steps": s.steps})
    for c in cases:
        log.info("learner step: %s, %s: %.2f s", c.policy, c.log_probs, c.seconds_per_step)
    return result


def markdown(r: LearnerStepResult) -> list[str]:
    rows = [[c.policy, c.log_probs, c.entropy, c.seconds_per_step] for c in r.cases]
    total = sum(r.profile.values())
    return [*render.labelled(r.config, r.model, ["policy", "log-probs", "entropy (nats)", "s/step"],
                             rows),
            f"The chunked learner's step under torch's profiler ({r.step_s:.2f} s a step with the "
            "profiler's own cost), its operators' own time by group:", "",
            *render.table(["group", "s/step", "share"],
                          [[name, seconds, render.pct(seconds / total)]
                           for name, seconds in r.profile.items()]), ""]
