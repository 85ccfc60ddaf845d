"""GRPO math checked against numbers worked out by hand (and TRL's `nanstd` for the std)."""

from __future__ import annotations

import math

import pytest
import torch
from trl.trainer.utils import nanstd

from learner.grpo import (
    LossOutput,
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    importance_sampling_ratio,
    kl_k3,
)

LN = math.log


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


def loss_kwargs(**overrides) -> dict:
    kwargs = dict(
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=None,
        beta=0.0,
        vllm_importance_sampling_correction=False,
        num_sequences=2,
        num_tokens=5,
        max_completion_length=3,
    )
    kwargs.update(overrides)
    return kwargs


# ----- group_advantages -----


def test_group_scale_brief_example():
    # mean 0.5; Bessel std = sqrt((4 * 0.25) / 3) = sqrt(1/3)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]])), [[a, -a, -a, a]])


REWARDS = torch.tensor([[0.0, 2.0], [1.0, 1.0]])


def test_group_scale_uses_each_groups_std():
    # group 0: mean 1, std sqrt((1 + 1) / 1) = sqrt(2); group 1: all equal -> 0
    a = 1 / (math.sqrt(2) + 1e-4)
    close(group_advantages(REWARDS, "group"), [[-a, a], [0.0, 0.0]])


def test_batch_scale_uses_std_of_all_rewards():
    # all rewards 0, 2, 1, 1: mean 1, squared deviations 1+1+0+0 = 2, Bessel: 2/3
    a = 1 / (math.sqrt(2 / 3) + 1e-4)
    close(group_advantages(REWARDS, "batch"), [[-a, a], [0.0, 0.0]])


def test_none_scale_only_centres():
    close(group_advantages(REWARDS, "none"), [[-1.0, 1.0], [0.0, 0.0]])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_zero_advantage_without_nan(scale):
    adv = group_advantages(torch.tensor([[3.0, 3.0, 3.0], [-1.0, -1.0, -1.0]]), scale)
    close(adv, torch.zeros(2, 3))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_single_completion_group_gives_zero_advantage(scale):
    close(group_advantages(torch.tensor([[5.0]]), scale), [[0.0]])


def test_unknown_scale_raises():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, "global")


def test_std_matches_trl_nanstd():
    rewards = torch.tensor([[0.3, 1.7, -0.2, 0.9], [2.0, 2.5, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0]])
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    close(
        group_advantages(rewards, "group"),
        centred / (nanstd(rewards, dim=1, keepdim=True) + 1e-4),
    )
    close(group_advantages(rewards, "batch"), centred / (nanstd(rewards) + 1e-4))


# ----- clipped_surrogate -----


def ratios_to_logp(ratios) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.tensor([[LN(r) for r in row] for row in ratios], requires_grad=True)
    return logp, torch.zeros_like(logp)


def test_clip_both_sides():
    logp, old = ratios_to_logp([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]])
    loss, clipped = clipped_surrogate(torch.exp(logp - old), torch.tensor([1.0, -1.0]), epsilon=0.2)
    # A > 0: min(r, clip(r)) -> 1.5 clipped to 1.2; 0.5 and 1.1 unclipped
    # A < 0: min(-r, -clip(r)) -> -1.5 kept; 0.5 clipped to 0.8 (-> -0.8); 1.1 kept
    close(loss, [[-1.2, -0.5, -1.1], [1.5, 0.8, 1.1]])
    assert clipped.tolist() == [[True, False, False], [False, True, False]]
    # clipped tokens carry no gradient; the others d(-r*A)/dlogp = -r*A
    loss.sum().backward()
    close(logp.grad, [[0.0, -0.5, -1.1], [1.5, 0.0, 1.1]])


def test_clip_higher_widens_only_the_upper_side():
    logp, old = ratios_to_logp([[1.25, 1.5, 0.75]])
    pos = torch.tensor([1.0])
    ratio = torch.exp(logp - old)
    loss, clipped = clipped_surrogate(ratio, pos, epsilon=0.2, epsilon_high=0.28)
    close(loss[0, :2], [-1.25, -1.28])
    assert clipped[0, :2].tolist() == [False, True]
    loss, clipped = clipped_surrogate(ratio, pos, epsilon=0.2)  # epsilon_high None -> 0.2
    close(loss[0, :2], [-1.2, -1.2])
    assert clipped[0, :2].tolist() == [True, True]
    # the lower bound stays 1 - epsilon: 0.75 < 0.8 is clipped for A < 0
    neg = torch.tensor([-1.0])
    loss, clipped = clipped_surrogate(ratio, neg, epsilon=0.2, epsilon_high=0.28)
    close(loss[0, 2], 0.8)
    assert clipped[0, 2].item()


# ----- kl_k3 -----


def test_kl_k3_zero_when_equal():
    logp = torch.tensor([[-0.1, -2.0, -7.5]])
    close(kl_k3(logp, logp.clone()), torch.zeros(1, 3))


def test_kl_k3_known_values():
    # ref - logp = ln 0.5: 0.5 - ln 0.5 - 1 = 0.193147; ref - logp = 1: e - 1 - 1 = 0.718282
    logp = torch.tensor([[LN(0.5), 0.0]])
    ref = torch.tensor([[LN(0.25), 1.0]])
    close(kl_k3(logp, ref), [[0.1931472, 0.7182818]])


# ----- importance_sampling_ratio, token_truncate (the project's original truncated IS) -----


def test_importance_weight_truncates_at_cap():
    behaviour = torch.zeros(1, 3)
    old = torch.tensor([[LN(2.0), LN(5.0), LN(0.5)]], requires_grad=True)
    w = importance_sampling_ratio(old, behaviour, torch.ones(1, 3), "token_truncate", clip_max=3.0)
    close(w, [[2.0, 3.0, 0.5]])
    assert not w.requires_grad


# ----- aggregate -----

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_aggregate_grpo_mean_per_sequence_then_over_sequences():
    # (mean(1, 2) + mean(4)) / 2 = (1.5 + 4) / 2
    out = aggregate(LOSS, MASK, "grpo", num_sequences=2, num_tokens=3, max_completion_length=3)
    close(out, 2.75)


def test_aggregate_grpo_empty_sequence_contributes_zero():
    loss = torch.cat([LOSS, torch.tensor([[7.0, 8.0, 9.0]])])
    mask = torch.cat([MASK, torch.zeros(1, 3)])
    out = aggregate(loss, mask, "grpo", num_sequences=3, num_tokens=3, max_completion_length=3)
    close(out, (1.5 + 4.0) / 3)


def test_aggregate_dapo_sum_over_token_count():
    out = aggregate(LOSS, MASK, "dapo", num_sequences=2, num_tokens=3, max_completion_length=3)
    close(out, 7 / 3)


def test_aggregate_dr_grpo_sum_over_sequences_times_max_length():
    out = aggregate(LOSS, MASK, "dr_grpo", num_sequences=2, num_tokens=3, max_completion_length=4)
    close(out, 7 / 8)


def test_aggregate_ignores_nan_and_inf_at_masked_positions():
    loss = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), -float("inf")]])
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        out = aggregate(
            loss, MASK.bool(), loss_type, num_sequences=2, num_tokens=3, max_completion_length=3
        )
        assert torch.isfinite(out)


def test_aggregate_unknown_loss_type_raises():
    with pytest.raises(ValueError):
        aggregate(LOSS, MASK, "gspo", num_sequences=2, num_tokens=3, max_completion_length=3)


# lengths 3, 1, 2, 4; the 9s sit at masked positions
BATCH_LOSS = torch.tensor(
    [[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [5.0, 6.0, 9.0, 9.0], [7.0, 8.0, 1.0, 2.0]]
)
BATCH_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
BATCH_EXPECTED = {
    "grpo": (2.0 + 4.0 + 5.5 + 4.5) / 4,  # per-sequence means over 4 sequences
    "dapo": 39 / 10,  # token sums 6 + 4 + 11 + 18 over 10 tokens
    "dr_grpo": 39 / (4 * 4),
}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_aggregate_sums_over_micro_batches_to_the_batch_loss(loss_type):
    totals = dict(num_sequences=4, num_tokens=10, max_completion_length=4)
    whole = aggregate(BATCH_LOSS, BATCH_MASK, loss_type, **totals)
    parts = sum(
        aggregate(BATCH_LOSS[s], BATCH_MASK[s], loss_type, **totals)
        for s in (slice(0, 2), slice(2, 4))
    )
    close(whole, BATCH_EXPECTED[loss_type])
    close(parts, BATCH_EXPECTED[loss_type])


# ----- grpo_loss -----

# padded position (1, 2): logp is a padded 0 while old/behaviour/ref are huge, so unmasked
# arithmetic there would overflow to inf and poison loss and gradient with NaN
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]]
PAD_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([2.0, -1.0])


def old_with_garbage() -> torch.Tensor:
    old = torch.tensor(LOGP)
    old[1, 2] = -1e4
    return old


@pytest.mark.parametrize(
    "loss_type, expected_grad",
    [
        # -A per token over 5 tokens
        ("dapo", [[-2 / 5, -2 / 5, -2 / 5], [1 / 5, 1 / 5, 0.0]]),
        # -A / (length * num_sequences): 3 * 2 for the first, 2 * 2 for the second
        ("grpo", [[-2 / 6, -2 / 6, -2 / 6], [1 / 4, 1 / 4, 0.0]]),
        # -A / (num_sequences * max_completion_length) = -A / 6
        ("dr_grpo", [[-2 / 6, -2 / 6, -2 / 6], [1 / 6, 1 / 6, 0.0]]),
    ],
)
def test_gradient_at_ratio_one_is_minus_advantage_over_normaliser(loss_type, expected_grad):
    for old in (old_with_garbage(), None):  # None: on-policy, ratio against logp.detach()
        logp = torch.tensor(LOGP, requires_grad=True)
        out = grpo_loss(logp, old, None, None, ADV, PAD_MASK, **loss_kwargs(loss_type=loss_type))
        out.loss.backward()
        close(logp.grad, expected_grad)
        assert torch.isfinite(out.loss)


def test_gradient_through_a_parameter_at_ratio_one():
    # logp = theta * x at theta = 1: dL/dtheta = sum(-A * x) / num_tokens over unmasked tokens
    x = torch.tensor(LOGP)
    theta = torch.tensor(1.0, requires_grad=True)
    out = grpo_loss(theta * x, x, None, None, ADV, PAD_MASK, **loss_kwargs())
    out.loss.backward()
    # -2 * (-1 - 2 - 0.5) + 1 * (-0.3 - 0.7) = 7 - 1 = 6, over 5 tokens
    close(theta.grad, 6 / 5)


def test_clip_fraction_counts_masked_tokens_only():
    logp, old = ratios_to_logp([[1.5, 0.5, 1.1], [1.5, 0.5, 0.1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # (1, 2) would be clipped but is padding
    out = grpo_loss(logp, old, None, None, torch.tensor([1.0, -1.0]), mask, **loss_kwargs())
    close(out.clip_fraction, 2 / 5)
    # clipped tokens: -1.2 and 0.8; unclipped: -0.5, -1.1, 1.5 -> sum -0.5 over 5 tokens
    close(out.loss, -0.5 / 5)


def test_importance_weight_scales_the_per_token_loss():
    logp = torch.zeros(1, 3, requires_grad=True)
    behaviour = torch.tensor([[-LN(2.0), -LN(5.0), -LN(0.5)]])  # old/behaviour = 2, 5, 0.5
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 3)
    kw = loss_kwargs(num_sequences=1, num_tokens=3)
    truncate = dict(vllm_importance_sampling_correction=True,
                    vllm_importance_sampling_mode="token_truncate",
                    vllm_importance_sampling_clip_max=3.0)
    out = grpo_loss(logp, logp.detach(), behaviour, None, adv, mask, **{**kw, **truncate})
    # ratio 1, A = 1: per-token loss -w with w = 2, 3 (capped from 5), 0.5
    close(out.loss, -5.5 / 3)
    close(out.is_weight, 5.5 / 3)
    for on, behaviour_logp in ((False, behaviour), (True, None)):  # both mean "correction off"
        out = grpo_loss(logp, logp.detach(), behaviour_logp, None, adv, mask,
                        **{**kw, **truncate, "vllm_importance_sampling_correction": on})
        close(out.loss, -1.0)
        close(out.is_weight, 1.0)


def test_beta_adds_beta_times_kl():
    logp = torch.full((2, 3), LN(0.5))
    ref = torch.full((2, 3), LN(0.25))
    ref[1, 2] = 1e4  # padding
    k3 = 0.5 - LN(0.5) - 1  # per token, see test_kl_k3_known_values
    plain = grpo_loss(logp, logp, None, ref, ADV, PAD_MASK, **loss_kwargs())
    with_kl = grpo_loss(logp, logp, None, ref, ADV, PAD_MASK, **loss_kwargs(beta=0.1))
    close(with_kl.loss - plain.loss, 0.1 * k3)  # dapo: 5 tokens * k3 / 5
    close(with_kl.kl, k3)
    close(plain.kl, 0.0)
    no_ref = grpo_loss(logp, logp, None, None, ADV, PAD_MASK, **loss_kwargs(beta=0.1))
    close(no_ref.loss, plain.loss)
    close(no_ref.kl, 0.0)


def test_metrics_are_detached_scalars():
    logp = torch.tensor(LOGP, requires_grad=True)
    out = grpo_loss(logp, old_with_garbage(), old_with_garbage(), old_with_garbage(), ADV,
                    PAD_MASK, **loss_kwargs(beta=0.1, vllm_importance_sampling_correction=True,
                                            vllm_importance_sampling_clip_max=2.0))
    assert isinstance(out, LossOutput)
    assert out.loss.requires_grad and out.loss.dim() == 0
    for metric in (out.clip_fraction, out.kl, out.is_weight):
        assert metric.dim() == 0 and not metric.requires_grad and torch.isfinite(metric)
