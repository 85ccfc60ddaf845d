"""What a GRPO update measures of itself (loss, clipping, KL, importance weights, entropy, the
engine/learner mismatch, the gradient norm), summed on the device over every pass and micro-batch
and read once after the step: reading them per micro-batch would make the host wait for the
device every time."""

from __future__ import annotations

import torch

from learner import sharding
from learner.batch import MicroBatch
from learner.grpo import LossOutput, masked_mean, sampling_mismatch

KEYS = ("loss", "clip_fraction", "kl", "is_weight", "is_masked", "entropy", "mismatch_kl",
        "mismatch_max")


class UpdateMetrics:
    """Token-weighted means over every pass and micro-batch (the loss: each pass's, averaged
    over the passes), kept on the device until `read`."""

    def __init__(self, device: str | torch.device, passes: int):
        self.passes = passes
        self.sums = {key: torch.zeros((), dtype=torch.float64, device=device) for key in KEYS}
        self.grad_norms: list[torch.Tensor] = []
        """Each pass's gradient norm before clipping, whole over the ranks."""

    def add(self, out: LossOutput, share: float) -> None:
        """A micro-batch's loss and its metrics; `share`: its part of the batch's tokens."""
        self.sums["loss"] += out.loss.detach() / self.passes
        for key, value in (("clip_fraction", out.clip_fraction), ("kl", out.kl),
                           ("is_weight", out.is_weight), ("is_masked", out.is_masked_fraction)):
            self.sums[key] += torch.as_tensor(value).detach() * share / self.passes

    def add_first_pass(self, logp: torch.Tensor, entropy: torch.Tensor, mb: MicroBatch,
                       share: float) -> None:
        """What is measured on the first pass alone, whose weights generated the batch: the
        entropy, and how far the engine's sampling log-probs are from the learner's (`logp`) on
        the tokens trained on: vLLM's numerics, and the policy lag."""
        self.sums["entropy"] += masked_mean(entropy, mb.completion_mask) * share
        mismatch = sampling_mismatch(logp, mb.behaviour_logp, mb.completion_mask)
        self.sums["mismatch_kl"] += mismatch.kl * share
        self.sums["mismatch_max"] = torch.maximum(self.sums["mismatch_max"], mismatch.max_abs_diff)

    def read(self, changed: dict[str, torch.Tensor], sharded: bool) -> dict[str, float]:
        """The step's one wait for the device: the sums, the first pass's gradient norm, and the
        share of the engines' weights the step changed (`WeightSender.changed_since`); with
        `sharded`, over every rank, each of which measured its own sequences and shards."""
        n = len(self.sums)
        read = torch.stack([*self.sums.values(), self.grad_norms[0].to(torch.float64),
                            *changed.values()]).tolist()
        totals, grad_norm = dict(zip(self.sums, read[:n])), read[n]
        changed = dict(zip(changed, read[n + 1:]))
        if sharded:
            maxima = {"mismatch_max": totals.pop("mismatch_max")}
            totals, maxima = sharding.reduce_sums({**totals, **changed}, maxima)
            changed = {key: totals.pop(key) for key in ("changed", "parameters")}
            totals.update(maxima)
        return {**totals, "grad_norm": grad_norm,
                "engine_weights_changed": changed["changed"] / changed["parameters"]}
