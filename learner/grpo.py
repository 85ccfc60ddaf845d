"""The GRPO objective as pure tensor functions: group advantages, clipped surrogate, k3 KL,
truncated importance weights and the TRL loss aggregations (grpo, dapo, dr_grpo)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Added to the std so a group whose rewards are all equal gets advantage 0, not 0/0 (TRL's value).
STD_EPS = 1e-4

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def _std(x: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected std, as TRL's `nanstd`; 0 (not NaN) when there is a single value."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.sum() if dim is None else x.sum(dim, keepdim=True))
    return x.std() if dim is None else x.std(dim=dim, keepdim=True)


def group_advantages(rewards: Tensor, scale: str = "group") -> Tensor:
    """rewards: [num_groups, G]. Reward minus its group mean, divided by (std + 1e-4), where std
    is the group's ("group"), the whole tensor's ("batch"), or absent ("none", Dr. GRPO)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale == "none":
        return centred
    std = _std(rewards, dim=-1) if scale == "group" else _std(rewards)
    return centred / (std + STD_EPS)


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss -min(r*A, clip(r, 1-eps, 1+eps_high)*A), r = exp(logp - old_logp).

    logp/old_logp: [B, T]; advantages: [B] (or already [B, T]). Returns (loss [B, T], is_clipped
    [B, T]) where is_clipped marks the tokens whose gradient the clip removed.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    # Only these regions make min() pick the constant clipped term; elsewhere the gradient flows.
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, is_clipped


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1, always >= 0
    and unbiased for samples drawn from pi (Schulman's "Approximating KL divergence")."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def truncated_importance_weight(old_logp: Tensor, behaviour_logp: Tensor, cap: float) -> Tensor:
    """Per-token min(exp(old_logp - behaviour_logp), cap), detached; cap == 0 gives all ones.

    Corrects for tokens sampled by a different policy (stale weights, or vLLM's numerics) than the
    one the surrogate's ratio is taken against; truncation bounds the variance.
    """
    if cap == 0:
        return torch.ones_like(old_logp).detach()
    return torch.clamp(torch.exp(old_logp - behaviour_logp), max=cap).detach()


def aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str,
    *,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> Tensor:
    """Reduce one micro-batch's per-token loss [B, T] to a scalar; the sum over the micro-batches
    of a batch is that batch's loss, because the normalisers are whole-batch totals:
    grpo: per-sequence masked mean, summed, / num_sequences; dapo: masked sum / num_tokens;
    dr_grpo: masked sum / (num_sequences * max_completion_length)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    keep = mask.bool()
    # where, not multiply: inf/NaN at padded positions would survive a multiply by 0.
    masked = torch.where(keep, per_token_loss, torch.zeros_like(per_token_loss))
    if loss_type == "grpo":
        lengths = keep.sum(-1).clamp(min=1).to(masked.dtype)
        return (masked.sum(-1) / lengths).sum() / max(num_sequences, 1)
    if loss_type == "dapo":
        return masked.sum() / max(num_tokens, 1)
    return masked.sum() / max(num_sequences * max_completion_length, 1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the positions where mask is set; 0 when none is."""
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x)).sum()
    return total / keep.sum().clamp(min=1)


@dataclass
class LossOutput:
    """What `grpo_loss` returns: the loss to backpropagate and detached micro-batch metrics."""

    loss: Tensor
    """Scalar to call .backward() on."""
    clip_fraction: Tensor
    """Fraction of masked tokens whose ratio was clipped."""
    kl: Tensor
    """Masked mean k3 KL to the reference; 0 when beta == 0 or there is no reference."""
    is_weight: Tensor
    """Masked mean truncated importance weight; 1 when the correction is off."""


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    behaviour_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str,
    epsilon: float,
    epsilon_high: float | None,
    beta: float,
    importance_sampling_cap: float,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> LossOutput:
    """The per-token GRPO objective composed as TRL does, then `aggregate`d:
    clipped surrogate x truncated IS weight (old vs behaviour) + beta x k3 KL (to ref).

    old_logp None means on-policy (one pass per batch): the ratio is taken against logp.detach().
    """
    keep = mask.bool()
    zero = torch.zeros_like(logp)

    def clean(x: Tensor) -> Tensor:
        # Padded positions may hold garbage; zeroing them on both sides of every difference keeps
        # exp() finite there, so neither the loss nor its gradient sees inf * 0 = NaN.
        return torch.where(keep, x, zero.to(x.dtype))

    logp = clean(logp)
    old_logp = logp.detach() if old_logp is None else clean(old_logp)

    per_token_loss, is_clipped = clipped_surrogate(
        logp, old_logp, advantages, epsilon, epsilon_high
    )

    if behaviour_logp is not None and importance_sampling_cap != 0:
        behaviour_logp = clean(behaviour_logp)
        weight = truncated_importance_weight(old_logp, behaviour_logp, importance_sampling_cap)
        per_token_loss = per_token_loss * weight
    else:
        weight = torch.ones_like(per_token_loss)

    if beta > 0 and ref_logp is not None:
        kl = kl_k3(logp, clean(ref_logp))
        per_token_loss = per_token_loss + beta * kl
        mean_kl = masked_mean(kl.detach(), keep)
    else:
        mean_kl = zero.sum().detach()

    loss = aggregate(
        per_token_loss,
        keep,
        loss_type,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_completion_length=max_completion_length,
    )
    return LossOutput(
        loss=loss,
        clip_fraction=masked_mean(is_clipped.to(logp.dtype), keep).detach(),
        kl=mean_kl,
        is_weight=masked_mean(weight, keep).detach(),
    )
