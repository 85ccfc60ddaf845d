"""Turning rollout groups into padded tensors for the learner's forward passes, and what a batch
holds (its rewards, lengths and staleness) as metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.types import RolloutGroup
from learner.grpo import group_advantages, mask_truncated_completions, mask_unscored


@dataclass
class MicroBatch:
    """Sequences laid out as [left-padded prompt | right-padded completion], so the completion
    logits are the last `completion_len + 1` positions for every row (as TRL lays them out)."""

    input_ids: torch.Tensor        # [B, P + C]
    attention_mask: torch.Tensor   # [B, P + C]
    position_ids: torch.Tensor     # [B, P + C], counted from each row's first real token
    completion_ids: torch.Tensor   # [B, C]
    completion_mask: torch.Tensor  # [B, C] bool
    behaviour_logp: torch.Tensor   # [B, C], the engine's log-probs of the sampled tokens
    advantages: torch.Tensor       # [B]

    def to(self, device: str | torch.device) -> MicroBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return MicroBatch(**moved)


Sequence = tuple[list[int], list[int], list[float]] | tuple[list[int], list[int], list[float], list[int] | None]
"""(prompt ids, completion ids, behaviour log-probs[, model mask]): the mask, where given and not
None, is 1 per token the model sampled and 0 per environment token."""


def flat_sequences(groups: list[RolloutGroup]) -> list[Sequence]:
    """Every completion (or episode) as a `Sequence`, group after group."""
    return [
        (g.prompt.token_ids, ids, lps, None if g.model_masks is None else g.model_masks[i])
        for g in groups
        for i, (ids, lps) in enumerate(zip(g.completion_ids, g.logprobs))
    ]


def advantages_of(groups: list[RolloutGroup], scale: str) -> torch.Tensor:
    """Group-relative advantages over the training batch ([num_groups * G]): for `batch` scaling
    the std is this batch's, which no single rollout worker could know."""
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    return group_advantages(rewards, scale).reshape(-1)


def trained_tokens(groups: list[RolloutGroup], mask_truncated: bool = False) -> int:
    """Completion tokens the loss counts: the model's (not an environment's), not those of
    unscored completions, nor with `mask_truncated` of completions cut off at the token limit
    (see `micro_batches`)."""
    return sum(n for g in groups for n, r, f in zip(g.model_tokens, g.rewards, g.finish_reasons)
               if not math.isnan(r) and not (mask_truncated and f == "length"))


def micro_batches(groups: list[RolloutGroup], size: int, scale: str, pad_id: int,
                  mask_truncated: bool = False, rows: list[int] | None = None,
                  by_length: bool = False) -> list[MicroBatch]:
    """The batch (or its sequences `rows`) in micro-batches of `size` sequences, with advantages
    over the whole batch. Completions no reward function scored (NaN) are left out of the loss,
    and with `mask_truncated` those cut off at the token limit. With `by_length`, sequences of
    like lengths share a micro-batch (ordered by completion, then prompt length; ties keep their
    order), so a row is padded only to its neighbours' length, not to the batch's longest."""
    seqs = flat_sequences(groups)
    advantages = advantages_of(groups, scale)
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)  # [N]
    truncated = torch.tensor([f == "length" for g in groups for f in g.finish_reasons])  # [N]
    if rows is None:
        rows = list(range(len(seqs)))
    if by_length:
        rows = sorted(rows, key=lambda i: (len(seqs[i][1]), len(seqs[i][0])))
    seqs, advantages = [seqs[i] for i in rows], advantages[rows]
    rewards, truncated = rewards[rows], truncated[rows]
    out = []
    for i in range(0, len(seqs), size):
        mb = collate(seqs[i : i + size], advantages[i : i + size], pad_id)
        mb.completion_mask = mask_unscored(mb.completion_mask, rewards[i : i + size])
        if mask_truncated:
            mb.completion_mask = mask_truncated_completions(mb.completion_mask, truncated[i : i + size])
        out.append(mb)
    return out


def collate(seqs: list[Sequence], advantages: torch.Tensor, pad_id: int) -> MicroBatch:
    """Environment tokens are attended to (context) but out of `completion_mask`."""
    p_len = max(len(p) for p, *_ in seqs)
    c_len = max(max(len(c) for _, c, *_ in seqs), 1)
    n = len(seqs)
    input_ids = torch.full((n, p_len + c_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, p_len + c_len), dtype=torch.long)
    behaviour = torch.zeros((n, c_len), dtype=torch.float32)
    by_model = torch.ones((n, c_len), dtype=torch.bool)
    for row, (prompt, completion, logps, *model_mask) in enumerate(seqs):
        input_ids[row, p_len - len(prompt) : p_len] = torch.tensor(prompt)
        input_ids[row, p_len : p_len + len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention_mask[row, p_len - len(prompt) : p_len + len(completion)] = 1
        behaviour[row, : len(logps)] = torch.tensor(logps)
        if model_mask and model_mask[0] is not None:
            by_model[row, : len(completion)] = torch.tensor(model_mask[0], dtype=torch.bool)
    completion_mask = attention_mask[:, p_len:].bool() & by_model
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        completion_ids=input_ids[:, p_len:],
        completion_mask=completion_mask,
        behaviour_logp=behaviour,
        advantages=advantages,
    )


def padded_share(batches: list[MicroBatch]) -> float:
    """The share of the positions the forward passes compute that are padding."""
    positions = sum(mb.attention_mask.numel() for mb in batches)
    real = torch.stack([mb.attention_mask.sum() for mb in batches]).sum().item()  # one read
    return 1 - real / max(positions, 1)


def batch_stats(groups: list[RolloutGroup], trained_version: int) -> dict:
    """What the batch holds, apart from what an update does with it: its rewards (NaN: unscored)
    and each reward function's, completion lengths and truncation, groups with no signal, and its
    staleness against `trained_version`, the policy version that trains on it (per group by its
    oldest token, and per token)."""
    rewards = torch.tensor([r for g in groups for r in g.rewards])  # [N]
    scored = rewards[~rewards.isnan()]
    lengths = torch.tensor([n for g in groups for n in g.model_tokens], dtype=torch.float)  # [N]
    lags = [trained_version - g.policy_version for g in groups]
    token_lags = torch.tensor([trained_version - v for g in groups
                               for i, versions in enumerate(g.token_versions)
                               for t, v in enumerate(versions)
                               if g.model_masks is None or g.model_masks[i][t]], dtype=torch.float)
    stats = {
        "reward": scored.mean().item() if scored.numel() else math.nan,
        "reward_std": scored.std().item() if scored.numel() > 1 else 0.0,
        "unscored_frac": 1 - scored.numel() / rewards.numel(),
        "completion_len": lengths.mean().item(),
        "truncated_frac": sum(f == "length" for g in groups
                              for f in g.finish_reasons) / len(lengths),
        "zero_std_groups": sum(g.zero_std for g in groups) / len(groups),
        "policy_lag": sum(lags) / len(lags),
        "policy_lag_max": max(lags),
        "lag_hist": {str(lag): lags.count(lag) for lag in sorted(set(lags))},
        "token_lag_mean": token_lags.mean().item(),
        "mixed_version_frac": sum(len(set(versions)) > 1 for g in groups
                                  for versions in g.token_versions) / len(lengths),
    }
    episodes = [e for g in groups for e in g.episodes or ()]
    if episodes:
        stats.update({
            "turns": sum(e.turns for e in episodes) / len(episodes),
            "env_s": sum(e.env_seconds for e in episodes) / len(episodes),
            "tool_calls": sum(e.tool_calls for e in episodes) / len(episodes),
            "env_errors": sum(bool(e.error) for e in episodes),
        })
    for name in groups[0].reward_parts:
        parts = torch.tensor([r for g in groups for r in g.reward_parts[name]])
        stats[f"reward/{name}"] = parts.nanmean().item()
    return stats
