"""The GRPO objective as pure tensor functions, with TRL 1.16's variants and names: group
advantages (NaN = unscored), policy ratios per token or per sequence (GSPO), the clipped, CISPO and
SAPO surrogates, k3 KL (optionally bias-corrected), the vLLM importance-sampling correction, the
loss aggregations (grpo, bnpo, dr_grpo, dapo, cispo, sapo) and sampler/learner mismatch metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args, get_type_hints

import torch
from torch import Tensor

from common.config import GRPOConfig

# Added to the std so a group whose rewards are all equal gets advantage 0, not 0/0 (TRL's value).
STD_EPS = 1e-4


def _choices(field: str) -> tuple[str, ...]:
    """The values GRPOConfig's `Literal` type allows for `field`: one list of names to keep."""
    return get_args(get_type_hints(GRPOConfig)[field])


SCALES = _choices("scale_rewards")
LOSS_TYPES = _choices("loss_type")
IMPORTANCE_SAMPLING_LEVELS = _choices("importance_sampling_level")
IMPORTANCE_SAMPLING_MODES = _choices("vllm_importance_sampling_mode")
PER_SEQUENCE_LOSS_TYPES = ("grpo", "sapo")
"""Loss types that average each sequence over its tokens before averaging over sequences."""


# ----- rewards and advantages -----


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """TRL's `nanstd` (keepdim): Bessel-corrected std over the non-NaN values; NaN when fewer
    than two, which `group_advantages` then turns into advantage 0."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, torch.nan))
    return torch.sqrt(variance * correction)


def group_advantages(rewards: Tensor, scale: str = "group") -> Tensor:
    """rewards: [num_groups, G], NaN for unscored samples. Reward minus its group's nan-mean,
    divided by (nan-std + 1e-4), where the std is the group's ("group"), the whole tensor's
    ("batch"), or absent ("none", Dr. GRPO). Unscored samples get advantage 0 (TRL); leave them
    out of the loss with `mask_unscored`."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    centred = rewards - torch.nanmean(rewards, dim=-1, keepdim=True)  # [num_groups, G]
    if scale == "none":
        advantages = centred
    else:
        std = _nanstd(rewards, dim=-1) if scale == "group" else _nanstd(rewards)
        advantages = centred / (std + STD_EPS)
    # NaN here means an unscored sample, or a group (or batch) with fewer than two scored ones:
    # either way there is nothing to compare against.
    return torch.nan_to_num(advantages, nan=0.0)


def mask_unscored(completion_mask: Tensor, rewards: Tensor) -> Tensor:
    """Leave completions no reward function scored (reward NaN, rewards: [B]) out of the loss.

    TRL only zeroes their advantage: their tokens still count in the dapo/bnpo normalisers and
    still carry the KL term. With this mask they count nowhere; compute `num_tokens` after it.
    """
    return completion_mask * ~torch.isnan(rewards).unsqueeze(-1)  # [B, T]


def mask_truncated_completions(completion_mask: Tensor, is_truncated: Tensor) -> Tensor:
    """TRL's `mask_truncated_completions` (DAPO's overlong filtering): completions that hit the
    token limit without EOS (is_truncated: [B], e.g. vLLM finish_reason == "length") are left out
    of the loss, so an unfinished answer is not penalised as a wrong one. Compute `num_tokens`
    after it, as TRL's `num_items_in_batch` is."""
    return completion_mask * ~is_truncated.bool().unsqueeze(-1)  # [B, T]


# ----- policy ratio and per-token surrogates -----


def policy_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """exp(logp - old_logp) per token ([B, T], "token"), or per sequence ([B, 1], "sequence"):
    the exp of the mean log-ratio over the sequence's masked tokens, GSPO's length-normalised
    sequence ratio ("Group Sequence Policy Optimization", arXiv:2507.18071)."""
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {level!r}")
    log_ratio = logp - old_logp  # [B, T]
    if level == "token":
        return torch.exp(log_ratio)
    keep = mask.bool()
    log_ratio = torch.where(keep, log_ratio, torch.zeros_like(log_ratio))  # [B, T]
    lengths = keep.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    return torch.exp(log_ratio.sum(-1, keepdim=True) / lengths)  # [B, 1]


def _per_token(advantages: Tensor) -> Tensor:
    """Advantages [B] as a column [B, 1] that broadcasts over tokens; [B, T] as they are."""
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
    delta: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO-clip loss -min(r*A, clip(r, 1-eps, 1+eps_high)*A) of the GRPO family (grpo, bnpo,
    dr_grpo, dapo). "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
    Models", arXiv:2402.03300; clip-higher (eps_high) from "DAPO: An Open-Source LLM Reinforcement
    Learning System at Scale", arXiv:2503.14476.

    delta: INTELLECT-2's two-sided clip, r capped at delta in the unclipped term, so a negative
    advantage cannot push a ratio up without bound ("INTELLECT-2: A Reasoning Model Trained
    Through Globally Decentralized Reinforcement Learning", arXiv:2505.07291).

    ratio: [B, T] or [B, 1]; advantages: [B] or [B, T]. Returns (loss, is_clipped), broadcast
    together; is_clipped marks the low/high regions TRL logs as clip_ratio/region_mean, judged
    on the delta-capped ratio as TRL does.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = _per_token(advantages)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    # Only these regions make min() pick the constant clipped term; elsewhere the gradient flows.
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, is_clipped


def cispo_loss(
    ratio: Tensor, logp: Tensor, advantages: Tensor, epsilon_high: float
) -> tuple[Tensor, Tensor]:
    """CISPO: -sg(min(r, epsilon_high)) * A * logp. The weight, not the token, is clipped, so
    every token keeps a gradient ("MiniMax-M1: Scaling Test-Time Compute Efficiently with
    Lightning Attention", arXiv:2506.13585). epsilon_high caps the ratio itself, not 1 + eps (TRL
    and ScaleRL recommend 5.0). Returns (loss, is_clipped): ratio above the cap with A > 0, TRL's
    cispo_clip_ratio."""
    adv = _per_token(advantages)
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    loss = -weight * adv * logp
    return loss, (ratio > epsilon_high) & (adv > 0)


def sapo_loss(
    ratio: Tensor,
    advantages: Tensor,
    temperature_pos: float = 1.0,
    temperature_neg: float = 1.05,
) -> Tensor:
    """SAPO: -sigmoid(tau * (r - 1)) * 4 / tau * A, tau = temperature_pos where A > 0, else
    temperature_neg. A smooth gate in place of the hard clip; its slope at r = 1 is 1, so on
    policy it is plain GRPO ("Soft Adaptive Policy Optimization", arXiv:2511.20347)."""
    adv = _per_token(advantages)
    tau = torch.where(adv > 0, temperature_pos, temperature_neg)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1, always >= 0
    and unbiased for samples drawn from pi (Schulman's "Approximating KL divergence")."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def bias_corrected_kl_k3(logp: Tensor, ref_logp: Tensor, ratio: Tensor) -> Tensor:
    """k3 times the (differentiable) policy ratio pi/pi_old: the tokens were sampled from pi_old,
    so this makes k3 and its gradient unbiased for KL(pi || pi_ref) (TRL's
    use_bias_correction_kl; "DeepSeek-V3.2: Pushing the Frontier of Open Large Language Models",
    arXiv:2512.02556). Changes the gradient even on policy, where the ratio's value is 1."""
    return kl_k3(logp, ref_logp) * ratio


# ----- importance sampling: behaviour (vLLM) vs learner -----


def importance_sampling_ratio(
    old_logp: Tensor,
    behaviour_logp: Tensor,
    mask: Tensor,
    mode: str,
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> Tensor:
    """Detached weight pi_old / pi_behaviour correcting for tokens sampled by another policy than
    the one the surrogate's ratio is taken against (stale weights, or vLLM's numerics).

    Token modes: per token, [B, T]. Sequence modes: exp of the summed per-token log differences
    over the masked tokens, one weight per sequence, [B, 1]. `*_truncate` clamps to [clip_min,
    clip_max] (truncated IS, Yao et al., "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training", blog, no arXiv id); `*_mask` zeroes weights outside it (masked IS,
    "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch",
    blog, no arXiv id). A None bound is open. A NaN behaviour log-prob (vLLM could not score the
    token) counts as difference 0, ratio 1.
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of "
                         f"{IMPORTANCE_SAMPLING_MODES}, got {mode!r}")
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"{mode} needs vllm_importance_sampling_clip_min or _clip_max")
    with torch.no_grad():
        diff = torch.where(mask.bool(), old_logp - behaviour_logp, torch.zeros_like(old_logp))
        # TRL's nan_to_num: NaN -> 0, and +-inf -> the largest finite float.
        diff = torch.nan_to_num(diff, nan=0.0)  # [B, T]
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)  # [B, 1]
        ratio = torch.exp(diff)
        if mode.endswith("_truncate"):
            return torch.clamp(ratio, min=clip_min, max=clip_max)
        low = -torch.inf if clip_min is None else clip_min
        high = torch.inf if clip_max is None else clip_max
        return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


# ----- aggregation -----


def aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str,
    *,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
    num_micro_batches: int = 1,
) -> Tensor:
    """Reduce one micro-batch's per-token loss [B, T] to a scalar; the sum over the micro-batches
    of a batch is that batch's loss, because the normalisers are whole-batch totals:
    grpo, sapo: per-sequence masked mean, summed, / num_sequences; dapo, cispo: masked sum /
    num_tokens; dr_grpo: masked sum / (num_sequences * max_completion_length) ("Understanding
    R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783).

    bnpo is TRL's exception: masked sum / this micro-batch's own token count / num_micro_batches
    (TRL's gradient-accumulation steps). Its sum over micro-batches is the mean of per-micro-batch
    token means, which equals dapo only when every micro-batch holds the same number of tokens.
    TRL names no paper for it.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    keep = mask.bool()
    # where, not multiply: inf/NaN at padded positions would survive a multiply by 0.
    masked = torch.where(keep, per_token_loss, torch.zeros_like(per_token_loss))  # [B, T]
    if loss_type in PER_SEQUENCE_LOSS_TYPES:
        lengths = keep.sum(-1).clamp(min=1).to(masked.dtype)
        return (masked.sum(-1) / lengths).sum() / max(num_sequences, 1)
    if loss_type in ("dapo", "cispo"):
        return masked.sum() / max(num_tokens, 1)
    if loss_type == "bnpo":
        return masked.sum() / keep.sum().clamp(min=1) / max(num_micro_batches, 1)
    return masked.sum() / max(num_sequences * max_completion_length, 1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the positions where mask is set; 0 when none is."""
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x)).sum()
    return total / keep.sum().clamp(min=1)


# ----- the loss -----


@dataclass
class LossOutput:
    """What `grpo_loss` returns: the loss to backpropagate and detached micro-batch metrics, each
    a mean over the micro-batch's masked tokens (so token-weighted sums combine micro-batches)."""

    loss: Tensor
    """Scalar to call .backward() on."""
    clip_fraction: Tensor
    """Fraction of masked tokens whose ratio was clipped: the low/high regions for the GRPO family,
    ratio above the cap with A > 0 for cispo, always 0 for sapo (its gate never clips; TRL logs
    nothing for it). Token-weighted also at sequence level, where TRL counts sequences."""
    kl: Tensor
    """Masked mean of the KL term as added to the loss (bias-corrected when asked, as TRL logs
    it); 0 when beta == 0 or there is no reference."""
    is_weight: Tensor
    """Masked mean importance-sampling weight; 1 when the correction is off. Token-weighted also
    in sequence modes, where TRL averages over sequences."""
    is_masked_fraction: Tensor
    """Fraction of masked tokens whose importance-sampling weight is 0 (a *_mask mode drops)."""


@dataclass(frozen=True)
class Normalisers:
    """The whole batch's counts that each micro-batch's loss is divided by, so that the
    micro-batches' losses sum to the batch's (see `aggregate`)."""

    num_sequences: int
    num_tokens: int
    """Completion tokens the loss counts over the whole batch, after every mask."""
    max_completion_length: int
    """A completion's token limit: dr_grpo's constant."""
    num_micro_batches: int
    """Micro-batches of the batch over every rank; only bnpo reads it."""


def surrogate(ratio: Tensor, logp: Tensor, advantages: Tensor,
              grpo: GRPOConfig) -> tuple[Tensor, Tensor]:
    """The per-token policy term of `grpo.loss_type` and where it clipped (never, for sapo).
    epsilon_high None means epsilon, also for cispo's cap, as in TRL."""
    if grpo.loss_type == "cispo":
        eps_high = grpo.epsilon if grpo.epsilon_high is None else grpo.epsilon_high
        return cispo_loss(ratio, logp, advantages, eps_high)
    if grpo.loss_type == "sapo":
        loss = sapo_loss(ratio, advantages, grpo.sapo_temperature_pos, grpo.sapo_temperature_neg)
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    return clipped_surrogate(ratio, advantages, grpo.epsilon, grpo.epsilon_high, grpo.delta)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    behaviour_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    grpo: GRPOConfig,
    totals: Normalisers,
) -> LossOutput:
    """The per-token objective composed as TRL's `_compute_loss` does, then `aggregate`d:
    surrogate(r) x IS weight (old vs behaviour) + beta x KL (to ref), r = pi/pi_old, in the
    variant `grpo` names (its fields carry TRL's GRPOConfig names).

    old_logp None means on-policy (one pass per batch): the ratio is taken against logp.detach().
    behaviour_logp None, or grpo.vllm_importance_sampling_correction False, turns the IS weight
    off. mask: completion tokens that count, with `mask_truncated_completions` / `mask_unscored`
    already applied; totals.num_tokens must count this mask over the whole batch.
    """
    keep = mask.bool()
    zero = torch.zeros_like(logp)

    def clean(x: Tensor) -> Tensor:
        # Padded positions may hold garbage; zeroing them on both sides of every difference keeps
        # exp() finite there, so neither the loss nor its gradient sees inf * 0 = NaN.
        return torch.where(keep, x, zero.to(x.dtype))

    logp = clean(logp)
    old_logp = logp.detach() if old_logp is None else clean(old_logp)
    ratio = policy_ratio(logp, old_logp, keep, grpo.importance_sampling_level)  # [B, T] or [B, 1]
    per_token_loss, is_clipped = surrogate(ratio, logp, advantages, grpo)

    weight = torch.ones_like(zero)  # [B, T], or [B, 1] in a sequence mode
    if behaviour_logp is not None and grpo.vllm_importance_sampling_correction:
        weight = importance_sampling_ratio(
            old_logp, clean(behaviour_logp), keep, grpo.vllm_importance_sampling_mode,
            grpo.vllm_importance_sampling_clip_min, grpo.vllm_importance_sampling_clip_max)
        per_token_loss = per_token_loss * weight

    mean_kl = zero.sum().detach()
    if grpo.beta > 0 and ref_logp is not None:
        ref_logp = clean(ref_logp)
        kl = (bias_corrected_kl_k3(logp, ref_logp, ratio) if grpo.use_bias_correction_kl
              else kl_k3(logp, ref_logp))  # [B, T]
        per_token_loss = per_token_loss + grpo.beta * kl
        mean_kl = masked_mean(kl.detach(), keep)

    loss = aggregate(per_token_loss.expand_as(logp), keep, grpo.loss_type,
                     num_sequences=totals.num_sequences, num_tokens=totals.num_tokens,
                     max_completion_length=totals.max_completion_length,
                     num_micro_batches=totals.num_micro_batches)
    weight = weight.expand_as(logp)  # [B, T]
    return LossOutput(
        loss=loss,
        clip_fraction=masked_mean(is_clipped.expand_as(logp).to(logp.dtype), keep).detach(),
        kl=mean_kl,
        is_weight=masked_mean(weight, keep).detach(),
        is_masked_fraction=masked_mean((weight == 0).to(logp.dtype), keep).detach(),
    )


def loss_notes(grpo: GRPOConfig) -> list[str]:
    """Lines worth logging at the start of a run about settings that work but likely do not do
    what was meant; none when there is nothing to say."""
    notes = []
    per_sequence = grpo.loss_type in PER_SEQUENCE_LOSS_TYPES
    if grpo.importance_sampling_level == "sequence" and not per_sequence:
        # TRL's GRPOTrainer warns of the same (grpo_trainer.py, __init__).
        notes.append(
            f"grpo.importance_sampling_level is sequence but grpo.loss_type {grpo.loss_type} sums "
            "per-token terms, which weights each sequence by its completion length instead of "
            "optimising the per-sequence objective; GSPO's paper (arXiv:2507.18071) averages "
            "over sequences: set grpo.loss_type grpo")
    return notes


# ----- sampler vs learner mismatch -----


@dataclass
class SamplingMismatch:
    """How far the engine's log-probs of the sampled tokens are from the learner's."""

    kl: Tensor
    """Mean per-token k3 estimate of KL(pi_behaviour || pi_learner) over the masked tokens."""
    max_abs_diff: Tensor
    """Largest |logp_learner - logp_behaviour| over the masked tokens (TRL's
    sampling/sampling_logp_difference/max); 0 when there is none."""


def sampling_mismatch(logp: Tensor, behaviour_logp: Tensor, mask: Tensor) -> SamplingMismatch:
    """Mismatch between the engine (behaviour) and the learner on the sampled tokens, [B, T] each.

    The tokens were drawn from the behaviour policy, so with r = exp(learner - behaviour) the
    k3 estimate r - 1 - log r is >= 0 and unbiased for KL(pi_behaviour || pi_learner). Pass the
    learner's log-probs under the weights that generated (the first pass of a step), or the KL
    also measures the learner's own update. Tokens vLLM could not score (NaN) are left out, as
    TRL does for its logged differences. Nothing here waits for the device.
    """
    with torch.no_grad():
        valid = mask.bool() & ~torch.isnan(behaviour_logp)
        log_r = torch.where(valid, logp - behaviour_logp, torch.zeros_like(logp))  # [B, T]
        k3 = torch.expm1(log_r) - log_r  # [B, T]
        abs_diff = torch.where(valid, log_r.abs(), torch.zeros_like(log_r))  # [B, T]
        return SamplingMismatch(masked_mean(k3, valid), abs_diff.amax())
