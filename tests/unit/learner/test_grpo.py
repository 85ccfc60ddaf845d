"""GRPO math checked against numbers worked out by hand (and TRL's `nanstd` for the std)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from trl.trainer.utils import nanstd

from common.config import GRPOConfig
from learner.grpo import (
    IMPORTANCE_SAMPLING_LEVELS,
    IMPORTANCE_SAMPLING_MODES,
    LOSS_TYPES,
    SCALES,
    LossOutput,
    Normalisers,
    aggregate,
    bias_corrected_kl_k3,
    cispo_loss,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    importance_sampling_ratio,
    kl_k3,
    loss_notes,
    mask_truncated_completions,
    mask_unscored,
    policy_ratio,
    sampling_mismatch,
    sapo_loss,
)

LN = math.log
NAN = float("nan")


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


def loss_args(**overrides) -> tuple[GRPOConfig, Normalisers]:
    """grpo_loss's options and normalisers: dapo, the importance-sampling correction and the KL
    off, plain k3 where a test turns the KL on, and a batch of 2 sequences, 5 tokens, completions
    of at most 3; `overrides` set either's fields by name."""
    options = dict(loss_type="dapo", epsilon=0.2, epsilon_high=None, beta=0.0,
                   use_bias_correction_kl=False, vllm_importance_sampling_correction=False)
    counts = dict(num_sequences=2, num_tokens=5, max_completion_length=3, num_micro_batches=1)
    for name, value in overrides.items():
        (counts if name in counts else options)[name] = value
    return GRPOConfig(**options), Normalisers(**counts)


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
        out = grpo_loss(logp, old, None, None, ADV, PAD_MASK, *loss_args(loss_type=loss_type))
        out.loss.backward()
        close(logp.grad, expected_grad)
        assert torch.isfinite(out.loss)


def test_gradient_through_a_parameter_at_ratio_one():
    # logp = theta * x at theta = 1: dL/dtheta = sum(-A * x) / num_tokens over unmasked tokens
    x = torch.tensor(LOGP)
    theta = torch.tensor(1.0, requires_grad=True)
    out = grpo_loss(theta * x, x, None, None, ADV, PAD_MASK, *loss_args())
    out.loss.backward()
    # -2 * (-1 - 2 - 0.5) + 1 * (-0.3 - 0.7) = 7 - 1 = 6, over 5 tokens
    close(theta.grad, 6 / 5)


def test_clip_fraction_counts_masked_tokens_only():
    logp, old = ratios_to_logp([[1.5, 0.5, 1.1], [1.5, 0.5, 0.1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # (1, 2) would be clipped but is padding
    out = grpo_loss(logp, old, None, None, torch.tensor([1.0, -1.0]), mask, *loss_args())
    close(out.clip_fraction, 2 / 5)
    # clipped tokens: -1.2 and 0.8; unclipped: -0.5, -1.1, 1.5 -> sum -0.5 over 5 tokens
    close(out.loss, -0.5 / 5)


def test_importance_weight_scales_the_per_token_loss():
    logp = torch.zeros(1, 3, requires_grad=True)
    behaviour = torch.tensor([[-LN(2.0), -LN(5.0), -LN(0.5)]])  # old/behaviour = 2, 5, 0.5
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 3)
    kw = dict(num_sequences=1, num_tokens=3)
    truncate = dict(vllm_importance_sampling_correction=True,
                    vllm_importance_sampling_mode="token_truncate",
                    vllm_importance_sampling_clip_max=3.0)
    out = grpo_loss(logp, logp.detach(), behaviour, None, adv, mask, *loss_args(**kw, **truncate))
    # ratio 1, A = 1: per-token loss -w with w = 2, 3 (capped from 5), 0.5
    close(out.loss, -5.5 / 3)
    close(out.is_weight, 5.5 / 3)
    for on, behaviour_logp in ((False, behaviour), (True, None)):  # both mean "correction off"
        out = grpo_loss(logp, logp.detach(), behaviour_logp, None, adv, mask,
                        *loss_args(**{**kw, **truncate, "vllm_importance_sampling_correction": on}))
        close(out.loss, -1.0)
        close(out.is_weight, 1.0)


def test_beta_adds_beta_times_kl():
    logp = torch.full((2, 3), LN(0.5))
    ref = torch.full((2, 3), LN(0.25))
    ref[1, 2] = 1e4  # padding
    k3 = 0.5 - LN(0.5) - 1  # per token, see test_kl_k3_known_values
    plain = grpo_loss(logp, logp, None, ref, ADV, PAD_MASK, *loss_args())
    with_kl = grpo_loss(logp, logp, None, ref, ADV, PAD_MASK, *loss_args(beta=0.1))
    close(with_kl.loss - plain.loss, 0.1 * k3)  # dapo: 5 tokens * k3 / 5
    close(with_kl.kl, k3)
    close(plain.kl, 0.0)
    no_ref = grpo_loss(logp, logp, None, None, ADV, PAD_MASK, *loss_args(beta=0.1))
    close(no_ref.loss, plain.loss)
    close(no_ref.kl, 0.0)


def test_the_kl_terms_gradient_pulls_toward_the_reference():
    # d/dlogp of beta * k3 = beta * (1 - exp(ref - logp)); here exp(ref - logp) = 0.25 / 0.5.
    # With zero advantages only the KL term carries gradient; dapo divides by the 5 tokens.
    logp = torch.full((2, 3), LN(0.5), requires_grad=True)
    ref = torch.full((2, 3), LN(0.25))
    out = grpo_loss(logp, logp.detach(), None, ref, torch.zeros(2), PAD_MASK,
                    *loss_args(beta=0.1))
    out.loss.backward()
    per_token = 0.1 * (1 - 0.5) / 5
    close(logp.grad, [[per_token] * 3, [per_token, per_token, 0.0]])  # the padded token: none


def test_metrics_are_detached_scalars():
    logp = torch.tensor(LOGP, requires_grad=True)
    out = grpo_loss(logp, old_with_garbage(), old_with_garbage(), old_with_garbage(), ADV,
                    PAD_MASK, *loss_args(beta=0.1, vllm_importance_sampling_correction=True,
                                            vllm_importance_sampling_clip_max=2.0))
    assert isinstance(out, LossOutput)
    assert out.loss.requires_grad and out.loss.dim() == 0
    for metric in (out.clip_fraction, out.kl, out.is_weight):
        assert metric.dim() == 0 and not metric.requires_grad and torch.isfinite(metric)


# ----- unscored samples: NaN rewards -----


def test_nan_rewards_are_left_out_of_the_group_statistics():
    rewards = torch.tensor([[1.0, NAN, 0.0, 2.0], [NAN, NAN, NAN, NAN], [3.0, NAN, NAN, NAN]])
    # group 0 scored 1, 0, 2: nan-mean 1, Bessel std sqrt((0 + 1 + 1) / 2) = 1
    a = 1 / (1 + 1e-4)
    # group 1 has no scored sample, group 2 one (std of one value is NaN, as TRL's nanstd): all 0
    expected = [[0.0, 0.0, -a, a], [0.0] * 4, [0.0] * 4]
    close(group_advantages(rewards, "group"), expected)
    # batch: scored 1, 0, 2, 3: mean 1.5, squared deviations 0.25 + 2.25 + 0.25 + 2.25 = 5, / 3
    b = 1 / (math.sqrt(5 / 3) + 1e-4)
    close(group_advantages(rewards, "batch"), [[0.0, 0.0, -b, b], [0.0] * 4, [0.0] * 4])
    close(group_advantages(rewards, "none"), [[0.0, 0.0, -1.0, 1.0], [0.0] * 4, [0.0] * 4])


def test_nan_std_matches_trl_nanstd():
    rewards = torch.tensor([[0.3, NAN, -0.2, 0.9], [2.0, 2.5, NAN, NAN]])
    centred = rewards - torch.nanmean(rewards, dim=1, keepdim=True)
    expected = centred / (nanstd(rewards, dim=1, keepdim=True) + 1e-4)
    close(group_advantages(rewards, "group"), torch.nan_to_num(expected, nan=0.0))


def test_mask_unscored_drops_the_whole_completion():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = mask_unscored(mask, torch.tensor([NAN, 0.5]))
    assert out.tolist() == [[0, 0, 0], [1, 1, 1]] and out.dtype == mask.dtype


def test_unscored_completion_counts_in_the_loss_unless_masked():
    rewards = torch.tensor([[1.0, NAN, 0.0]])
    # scored 1 and 0: mean 0.5, Bessel std sqrt(0.5); the unscored sample gets 0
    adv = group_advantages(rewards).reshape(-1)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    close(adv, [a, 0.0, -a])
    logp = torch.full((3, 2), LN(0.5))
    ref = torch.full((3, 2), LN(0.25))
    ref[1] = LN(0.5)  # the unscored row has KL 0 to the reference, the others k3 per token
    k3 = 0.5 - LN(0.5) - 1
    kw = dict(beta=0.1, num_sequences=3)
    # as TRL: on policy per-token -A + 0.1 k3; the -A cancel, 4 tokens of KL over all 6 tokens
    full = torch.ones(3, 2)
    out = grpo_loss(logp, None, None, ref, adv, full, *loss_args(**kw, num_tokens=6))
    close(out.loss, 4 * 0.1 * k3 / 6)
    # left out: the same sum over the 4 scored tokens
    mask = mask_unscored(full, rewards.reshape(-1))
    out = grpo_loss(logp, None, None, ref, adv, mask, *loss_args(**kw, num_tokens=int(mask.sum())))
    close(out.loss, 4 * 0.1 * k3 / 4)


def test_mask_truncated_completions_drops_rows_that_hit_the_limit():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = mask_truncated_completions(mask, torch.tensor([False, True]))
    assert out.tolist() == [[1, 1, 0], [0, 0, 0]] and out.dtype == mask.dtype
    assert mask_truncated_completions(mask.bool(), torch.tensor([0, 0])).tolist() == [
        [True, True, False], [True, True, True]]


# ----- importance_sampling_ratio: the four modes -----

# old - behaviour per token: ln 2, ln 5, ln 0.5, ln 0.2; all masked in
IS_OLD = torch.tensor([[LN(2.0), LN(5.0), LN(0.5), LN(0.2)]])
IS_BEHAVIOUR = torch.zeros(1, 4)
ALL = torch.ones(1, 4)


def test_token_truncate_clamps_to_both_bounds():
    w = importance_sampling_ratio(IS_OLD, IS_BEHAVIOUR, ALL, "token_truncate", 0.25, 3.0)
    close(w, [[2.0, 3.0, 0.5, 0.25]])


def test_token_mask_zeroes_ratios_outside_the_bounds():
    w = importance_sampling_ratio(IS_OLD, IS_BEHAVIOUR, ALL, "token_mask", 0.25, 3.0)
    close(w, [[2.0, 0.0, 0.5, 0.0]])  # 5 > 3 and 0.2 < 0.25 dropped
    w = importance_sampling_ratio(IS_OLD, IS_BEHAVIOUR, ALL, "token_mask", None, 3.0)
    close(w, [[2.0, 0.0, 0.5, 0.2]])  # no lower bound


# rows: ln 2 + ln 2 = ln 4; ln 0.5 + ln 0.5 = ln 0.25; ln 2 + ln 0.5 = 0; the last column is
# padding holding garbage that must not count
SEQ_OLD = torch.tensor(
    [[LN(2.0), LN(2.0), 50.0], [LN(0.5), LN(0.5), -50.0], [LN(2.0), LN(0.5), 9.0]]
)
SEQ_BEHAVIOUR = torch.tensor([[0.0, 0.0, -1e4], [0.0, 0.0, 1e4], [0.0, 0.0, NAN]])
SEQ_MASK = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0]])


def test_sequence_truncate_uses_exp_of_the_summed_differences():
    w = importance_sampling_ratio(SEQ_OLD, SEQ_BEHAVIOUR, SEQ_MASK, "sequence_truncate", 0.5, 3.0)
    assert w.shape == (3, 1)
    close(w, [[3.0], [0.5], [1.0]])  # 4 -> 3, 0.25 -> 0.5, 1


def test_sequence_mask_drops_whole_sequences():
    w = importance_sampling_ratio(SEQ_OLD, SEQ_BEHAVIOUR, SEQ_MASK, "sequence_mask", None, 3.0)
    close(w, [[0.0], [0.25], [1.0]])  # 4 > 3 dropped; 0.25 kept without a lower bound
    w = importance_sampling_ratio(SEQ_OLD, SEQ_BEHAVIOUR, SEQ_MASK, "sequence_mask", 0.5, None)
    close(w, [[4.0], [0.0], [1.0]])  # lower bound only


def test_nan_behaviour_logprob_counts_as_ratio_one():
    old = torch.tensor([[LN(2.0), LN(3.0), LN(0.5)]])
    behaviour = torch.tensor([[0.0, NAN, 0.0]])
    mask = torch.ones(1, 3)
    close(importance_sampling_ratio(old, behaviour, mask, "token_truncate", None, 3.0),
          [[2.0, 1.0, 0.5]])
    # sequence: ln 2 + 0 + ln 0.5 = 0
    close(importance_sampling_ratio(old, behaviour, mask, "sequence_mask", None, 3.0), [[1.0]])


def test_importance_sampling_rejects_unknown_mode_and_unbounded_truncation():
    with pytest.raises(ValueError):
        importance_sampling_ratio(IS_OLD, IS_BEHAVIOUR, ALL, "sequence_clip")
    with pytest.raises(ValueError):
        importance_sampling_ratio(IS_OLD, IS_BEHAVIOUR, ALL, "token_truncate", None, None)


def test_sequence_mask_in_the_loss_drops_the_sequence_and_reports_it():
    logp = torch.zeros(2, 2, requires_grad=True)
    behaviour = torch.tensor([[-LN(2.0), -LN(2.0)], [0.0, NAN]])  # ratios 4 (dropped) and 1
    adv = torch.tensor([1.0, 1.0])
    kw = dict(num_sequences=2, num_tokens=4, vllm_importance_sampling_correction=True,
                     vllm_importance_sampling_mode="sequence_mask")
    out = grpo_loss(logp, None, behaviour, None, adv, torch.ones(2, 2), *loss_args(**kw))
    # ratio 1, A = 1: per-token loss -w; w = 0, 0, 1, 1 -> dapo: -2 / 4
    close(out.loss, -0.5)
    close(out.is_weight, 0.5)
    close(out.is_masked_fraction, 0.5)
    out.loss.backward()
    close(logp.grad, [[0.0, 0.0], [-0.25, -0.25]])


# ----- policy ratio at sequence level (GSPO) -----


def test_sequence_ratio_is_exp_of_the_mean_log_ratio():
    logp = torch.tensor([[LN(2.0), LN(8.0), 7.0], [LN(0.5), 3.0, 3.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # (ln 2 + ln 8) / 2 = ln 4; ln 0.5 / 1; an empty row gives exp(0 / 1) = 1
    close(policy_ratio(logp, torch.zeros(3, 3), mask, "sequence"), [[4.0], [0.5], [1.0]])
    with pytest.raises(ValueError):
        policy_ratio(logp, torch.zeros(3, 3), mask, "group")


def test_gspo_clips_and_weights_whole_sequences():
    # row 0: log ratios 0.1, -0.1 -> sequence ratio 1; row 1: one token, ratio 1.5 (> 1.2, clipped)
    logp = torch.tensor([[0.1, -0.1], [LN(1.5), 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([2.0, 1.0])
    kw = dict(loss_type="grpo", num_sequences=2, num_tokens=3,
                     importance_sampling_level="sequence")
    out = grpo_loss(logp, torch.zeros(2, 2), None, None, adv, mask, *loss_args(**kw))
    # per-token losses -A * r = -2 (row 0) and -1.2 (row 1): grpo (-2 + -1.2) / 2
    close(out.loss, -1.6)
    close(out.clip_fraction, 1 / 3)  # row 1's single token, of 3 tokens
    out.loss.backward()
    # row 0: d(-A * s)/d logp_t = -A * s / len / num_sequences = -2 / 2 / 2; row 1 clipped: 0
    close(logp.grad, [[-0.5, -0.5], [0.0, 0.0]])


# ----- delta: the two-sided clip -----


def test_delta_caps_the_ratio_for_negative_advantages():
    logp = torch.tensor([[LN(3.0)], [LN(3.0)]], requires_grad=True)
    ratio = torch.exp(logp)
    adv = torch.tensor([-1.0, 1.0])
    plain, _ = clipped_surrogate(ratio, adv, 0.2)
    capped, clipped = clipped_surrogate(ratio, adv, 0.2, delta=2.0)
    # A = -1: -min(-3, -1.2) = 3 unbounded, -min(-2, -1.2) = 2 with delta; A = +1: -1.2 either way
    close(plain, [[3.0], [-1.2]])
    close(capped, [[2.0], [-1.2]])
    assert clipped.tolist() == [[False], [True]]  # TRL counts the A > 0 side only
    capped.sum().backward()
    close(logp.grad, [[0.0], [0.0]])  # both tokens now carry a constant


def test_delta_below_one_plus_eps_hides_high_clipping_as_in_trl():
    # TRL judges clipping on the delta-capped ratio: 3 -> 1.1 is not > 1.2, so not counted
    loss, clipped = clipped_surrogate(torch.tensor([[3.0]]), torch.tensor([1.0]), 0.2, delta=1.1)
    close(loss, [[-1.1]])
    assert not clipped.item()


# ----- cispo and sapo -----


def test_cispo_clips_the_detached_weight_not_the_token():
    logp = torch.tensor([[LN(0.5), LN(1.5), LN(6.0)]], requires_grad=True)
    ratio = torch.exp(logp)  # old = 0
    loss, clipped = cispo_loss(ratio, logp, torch.tensor([1.0]), epsilon_high=5.0)
    # -min(r, 5) * A * logp: -0.5 ln 0.5, -1.5 ln 1.5, -5 ln 6
    close(loss, [[-0.5 * LN(0.5), -1.5 * LN(1.5), -5.0 * LN(6.0)]])
    assert clipped.tolist() == [[False, False, True]]
    loss.sum().backward()
    close(logp.grad, [[-0.5, -1.5, -5.0]])  # the weight is a constant: -w * A, none is zeroed
    _, clipped = cispo_loss(ratio, logp, torch.tensor([-1.0]), epsilon_high=5.0)
    assert not clipped.any()  # TRL counts A > 0 only


def test_sapo_soft_gate():
    logp = torch.tensor([[0.0, LN(2.0)], [0.0, 0.0]], requires_grad=True)
    ratio = torch.exp(logp)
    loss = sapo_loss(ratio, torch.tensor([1.0, -1.0]))
    # r = 1: sigmoid(0) * 4 / tau = 2 / tau; A = 1 uses tau_pos 1, A = -1 tau_neg 1.05
    # r = 2, A = 1: -4 * sigmoid(1) = -4 * 0.7310586
    close(loss, [[-2.0, -2.9242344], [2 / 1.05, 2 / 1.05]])
    loss.sum().backward()
    # d/dlogp = -A * 4 * s(1 - s)(tau(r - 1)) * r: at r = 1 that is -A; at r = 2, A = 1:
    # -4 * 0.7310586 * 0.2689414 * 2 = -1.5728954
    close(logp.grad, [[-1.0, -1.5728954], [1.0, 1.0]])


def test_cispo_and_sapo_in_the_loss_use_their_aggregations():
    logp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    kw = dict(num_sequences=2, num_tokens=3)
    # on policy, cispo's per-token loss is -A * logp = 0 but its gradient is -A, summed / 3 tokens
    out = grpo_loss(logp, None, None, None, adv, mask,
                    *loss_args(**kw, loss_type="cispo", epsilon_high=5.0))
    out.loss.backward()
    close(out.loss, 0.0)
    close(logp.grad, [[-1 / 3, -1 / 3], [1 / 3, 0.0]])
    # sapo at r = 1: -2A (tau_pos 1), 2A / 1.05 for A < 0; grpo: (-2 + 2 / 1.05) / 2
    out = grpo_loss(logp, None, None, None, adv, mask, *loss_args(**kw, loss_type="sapo"))
    close(out.loss, (-2 + 2 / 1.05) / 2)
    close(out.clip_fraction, 0.0)


def test_cispo_cap_falls_back_to_epsilon_as_in_trl():
    logp = torch.full((1, 2), LN(0.5), requires_grad=True)  # ratio 0.5 against old 0
    kw = dict(loss_type="cispo", num_sequences=1, num_tokens=2)
    out = grpo_loss(logp, torch.zeros(1, 2), None, None, torch.tensor([1.0]), torch.ones(1, 2),
                    *loss_args(**kw))
    out.loss.backward()
    close(logp.grad, [[-0.2 / 2, -0.2 / 2]])  # weight min(0.5, epsilon 0.2) = 0.2, over 2 tokens
    close(out.clip_fraction, 1.0)


# ----- bnpo: the micro-batch's own token count -----


def test_bnpo_normalises_by_each_micro_batch_tokens():
    # micro-batch rows 0-1: token sums 6 + 4 over 4 tokens; rows 2-3: 11 + 18 over 6 tokens;
    # TRL divides each by the accumulation steps (2): (10 / 4 + 29 / 6) / 2
    totals = dict(num_sequences=4, num_tokens=10, max_completion_length=4, num_micro_batches=2)
    parts = [aggregate(BATCH_LOSS[s], BATCH_MASK[s], "bnpo", **totals)
             for s in (slice(0, 2), slice(2, 4))]
    close(sum(parts), (10 / 4 + 29 / 6) / 2)  # 3.6667, where dapo gives 39 / 10
    whole = aggregate(BATCH_LOSS, BATCH_MASK, "bnpo", **{**totals, "num_micro_batches": 1})
    close(whole, BATCH_EXPECTED["dapo"])  # one micro-batch: bnpo is dapo


@pytest.mark.parametrize("loss_type, same_as", [("sapo", "grpo"), ("cispo", "dapo")])
def test_sapo_and_cispo_aggregate_as_trl(loss_type, same_as):
    totals = dict(num_sequences=4, num_tokens=10, max_completion_length=4)
    close(aggregate(BATCH_LOSS, BATCH_MASK, loss_type, **totals), BATCH_EXPECTED[same_as])


# ----- bias-corrected KL -----


def test_bias_corrected_kl_multiplies_k3_by_the_ratio():
    logp = torch.tensor([[LN(0.5)]], requires_grad=True)
    ref = torch.tensor([[LN(0.25)]])
    ratio = torch.exp(logp - LN(0.25))  # pi / pi_old = 0.5 / 0.25 = 2
    k3 = 0.5 - LN(0.5) - 1  # 0.1931472
    kl = bias_corrected_kl_k3(logp, ref, ratio)
    close(kl, [[2 * k3]])
    kl.sum().backward()
    # d(k3 * r)/dlogp = k3' r + k3 r, k3' = 1 - exp(ref - logp) = 0.5: 0.5 * 2 + 2 * k3
    close(logp.grad, [[1.0 + 2 * k3]])


def test_bias_correction_changes_only_the_gradient_on_policy():
    ref = torch.full((2, 3), LN(0.25))
    k3 = 0.5 - LN(0.5) - 1
    grads, outs = [], []
    for corrected in (False, True):
        logp = torch.full((2, 3), LN(0.5), requires_grad=True)
        out = grpo_loss(logp, None, None, ref, torch.zeros(2), PAD_MASK,
                        *loss_args(beta=0.1, use_bias_correction_kl=corrected))
        out.loss.backward()
        outs.append(out)
        grads.append(logp.grad)
    close(outs[0].loss, outs[1].loss)  # ratio 1: same value, 0.1 * k3
    close(outs[1].kl, k3)
    # per token beta / 5 tokens times k3' = 0.5 (plain) or k3' + k3 (corrected)
    close(grads[0], torch.where(PAD_MASK.bool(), 0.1 / 5 * 0.5, 0.0))
    close(grads[1], torch.where(PAD_MASK.bool(), 0.1 / 5 * (0.5 + k3), 0.0))


def test_kl_metric_reports_the_corrected_term():
    logp = torch.full((1, 2), LN(0.5))
    old = torch.full((1, 2), LN(0.25))  # ratio 2 (clipped at A = 0: loss 0)
    ref = torch.full((1, 2), LN(0.25))
    kw = dict(beta=0.1, use_bias_correction_kl=True, num_sequences=1, num_tokens=2)
    out = grpo_loss(logp, old, None, ref, torch.zeros(1), torch.ones(1, 2), *loss_args(**kw))
    k3 = 0.5 - LN(0.5) - 1
    close(out.kl, 2 * k3)
    close(out.loss, 0.1 * 2 * k3)


# ----- sampler vs learner mismatch -----


def test_sampling_mismatch_k3_and_largest_difference():
    learner = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    behaviour = torch.tensor([[-1.5, NAN, -2.0], [-0.2, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = sampling_mismatch(learner, behaviour, mask)
    # counted: log r = 0.5, -1.0, -0.3 (NaN and padding left out)
    # k3 = e^x - 1 - x: 0.1487213, 0.3678794, 0.0408182 -> mean 0.1858063
    close(out.kl, (0.1487213 + 0.3678794 + 0.0408182) / 3)
    close(out.max_abs_diff, 1.0)


def test_sampling_mismatch_with_nothing_to_compare():
    out = sampling_mismatch(torch.zeros(1, 2), torch.tensor([[NAN, 3.0]]), torch.tensor([[1, 0]]))
    close(out.kl, 0.0)
    close(out.max_abs_diff, 0.0)


# ----- options -----


def test_the_option_names_are_the_configs():
    assert LOSS_TYPES == ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
    assert SCALES == ("group", "batch", "none")
    assert IMPORTANCE_SAMPLING_LEVELS == ("token", "sequence")
    assert IMPORTANCE_SAMPLING_MODES == ("token_truncate", "token_mask", "sequence_truncate",
                                         "sequence_mask")


def test_the_loss_takes_no_option_the_config_does_not_set():
    parameters = inspect.signature(grpo_loss).parameters.values()
    assert len(parameters) <= 8
    assert all(p.default is inspect.Parameter.empty for p in parameters)


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo", "dapo", "cispo"])
def test_a_sequence_level_ratio_with_a_per_token_sum_is_noted(loss_type):
    notes = loss_notes(GRPOConfig(loss_type=loss_type, importance_sampling_level="sequence"))
    assert len(notes) == 1
    assert f"grpo.loss_type {loss_type} sums per-token terms" in notes[0]
    assert "set grpo.loss_type grpo" in notes[0]


@pytest.mark.parametrize("loss_type, level", [("grpo", "sequence"), ("sapo", "sequence"),
                                              ("dapo", "token"), ("grpo", "token")])
def test_nothing_is_noted_where_each_sequence_is_averaged_or_the_ratio_is_per_token(loss_type,
                                                                                      level):
    # grpo and sapo take each sequence's mean before the mean over sequences: GSPO's objective
    assert loss_notes(GRPOConfig(loss_type=loss_type, importance_sampling_level=level)) == []
