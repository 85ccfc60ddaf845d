"""Padded layout of rollout groups for the learner (left-padded prompts, right-padded
completions), and the statistics of a batch, worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from common.types import Prompt, RolloutGroup
from learner.batch import batch_stats, collate, micro_batches, padded_share, trained_tokens
from learner.grpo import group_advantages

PAD = 0


def group(index: int, prompt: list[int], completions: list[list[int]], rewards: list[float],
          ) -> RolloutGroup:
    g = len(completions)
    return RolloutGroup(
        prompt=Prompt(index=index, text=f"p{index}", token_ids=prompt),
        completions=[""] * g, completion_ids=completions,
        logprobs=[[-0.1 * (t - 4) for t in c] for c in completions],  # token 5 -> -0.1, 6 -> -0.2
        token_versions=[[0] * len(c) for c in completions],
        finish_reasons=["stop"] * g, rewards=rewards, reward_parts={},
        policy_version=0,
    )


def test_collate_layout_two_sequences():
    seqs = [
        ([11, 12, 13], [21, 22], [-0.1, -0.2]),
        ([14], [23, 24, 25], [-0.3, -0.4, -0.5]),
    ]
    mb = collate(seqs, torch.tensor([1.0, -1.0]), PAD)
    # prompts end at column 3 in every row; completions start there
    assert mb.input_ids.tolist() == [[11, 12, 13, 21, 22, PAD],
                                     [PAD, PAD, 14, 23, 24, 25]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0],
                                          [0, 0, 1, 1, 1, 1]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 4],
                                        [0, 0, 0, 1, 2, 3]]
    assert mb.completion_ids.tolist() == [[21, 22, PAD], [23, 24, 25]]
    assert mb.completion_mask.tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(mb.behaviour_logp,
                               torch.tensor([[-0.1, -0.2, 0.0], [-0.3, -0.4, -0.5]]))
    assert mb.advantages.tolist() == [1.0, -1.0]


def test_collate_position_ids_start_at_first_real_token():
    mb = collate([([7, 8], [9], [-1.0]), ([5], [6], [-2.0])], torch.zeros(2), PAD)
    # row 1's first real token (5) is at column 1 and gets position 0
    assert mb.position_ids[1, 1].item() == 0
    assert mb.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]]


def test_collate_empty_completions_keep_one_masked_column():
    mb = collate([([7, 8], [], [])], torch.zeros(1), PAD)
    assert mb.input_ids.tolist() == [[7, 8, PAD]]
    assert mb.completion_mask.tolist() == [[False]]


def test_micro_batches_split_sequences_in_order():
    groups = [
        group(0, [1, 2], [[5], [6, 7]], rewards=[1.0, 0.0]),
        group(1, [3], [[8, 9], [10]], rewards=[0.5, 0.5]),
    ]
    mbs = micro_batches(groups, size=3, scale="group", pad_id=PAD)
    assert mbs[0].input_ids.tolist() == [[1, 2, 5, PAD],
                                         [1, 2, 6, 7],
                                         [PAD, 3, 8, 9]]
    assert mbs[1].input_ids.tolist() == [[3, 10]]
    torch.testing.assert_close(mbs[0].behaviour_logp,
                               torch.tensor([[-0.1, 0.0], [-0.2, -0.3], [-0.4, -0.5]]))


def test_micro_batches_advantages_are_group_advantages_of_the_rewards():
    groups = [
        group(0, [1, 2], [[5], [6, 7]], rewards=[1.0, 0.0]),
        group(1, [3], [[8, 9], [10]], rewards=[0.5, 0.5]),
    ]
    mbs = micro_batches(groups, size=3, scale="group", pad_id=PAD)
    advantages = torch.cat([mb.advantages for mb in mbs])
    expected = group_advantages(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), "group").reshape(-1)
    torch.testing.assert_close(advantages, expected)
    # group 0: mean 0.5, Bessel std sqrt(0.5); group 1 is all equal -> 0
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([a, -a, 0.0, 0.0]))


def test_batch_scaled_advantages_use_the_std_of_the_whole_batch():
    groups = [
        group(0, [1, 2], [[5], [6, 7]], rewards=[1.0, 0.0]),
        group(1, [3], [[8, 9], [10]], rewards=[0.5, 0.5]),
    ]
    mbs = micro_batches(groups, size=3, scale="batch", pad_id=PAD)
    # Centred per group: [0.5, -0.5], [0, 0]. The batch 1, 0, 0.5, 0.5 has mean 0.5 and Bessel
    # std sqrt((0.25 + 0.25 + 0 + 0) / 3) = sqrt(1/6), not group 0's own sqrt(0.5).
    a = 0.5 / (math.sqrt(1 / 6) + 1e-4)
    torch.testing.assert_close(torch.cat([mb.advantages for mb in mbs]), torch.tensor([a, -a, 0.0, 0.0]))


def test_unscored_and_truncated_completions_are_left_out_of_the_loss():
    nan = float("nan")
    groups = [group(0, [1, 2], [[5], [6, 7], [8, 9]], rewards=[1.0, nan, 0.0])]
    groups[0].finish_reasons = ["stop", "stop", "length"]
    kept = micro_batches(groups, size=3, scale="group", pad_id=PAD)[0]
    assert kept.completion_mask.tolist() == [[True, False], [False, False], [True, True]]
    # The unscored completion is out of the group's statistics too: 1 and 0 score as +a and -a.
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(kept.advantages, torch.tensor([a, 0.0, -a]))
    masked = micro_batches(groups, size=3, scale="group", pad_id=PAD, mask_truncated=True)[0]
    assert masked.completion_mask.tolist() == [[True, False], [False, False], [False, False]]


# ----- what a batch holds -----


def test_batch_stats_by_hand():
    nan = float("nan")
    # Trained by policy version 5. Group 0 is from version 4 and one of its completions was
    # sampled across the 4 -> 5 update; group 1 is from version 3.
    first = group(0, [1], [[5, 6, 7], [8]], rewards=[1.0, nan])
    first.policy_version, first.token_versions = 4, [[4, 4, 5], [4]]
    first.finish_reasons = ["stop", "length"]
    first.reward_parts = {"format": [1.0, nan], "answer": [0.0, nan]}
    second = group(1, [2], [[9, 10], [11, 12, 13, 14]], rewards=[0.0, 0.5])
    second.policy_version, second.token_versions = 3, [[3, 3], [3, 3, 3, 3]]
    second.reward_parts = {"format": [0.0, 1.0], "answer": [0.0, 0.5]}

    stats = batch_stats([first, second], trained_version=5)

    # scored rewards 1, 0, 0.5: mean 0.5, Bessel std sqrt((0.25 + 0.25 + 0) / 2) = 0.5
    assert stats["reward"] == 0.5
    assert stats["reward_std"] == pytest.approx(0.5)
    assert stats["unscored_frac"] == 1 / 4
    assert stats["reward/format"] == pytest.approx(2 / 3)  # 1, 0, 1; the NaN left out
    assert stats["reward/answer"] == pytest.approx(0.5 / 3)  # 0, 0, 0.5
    assert stats["completion_len"] == (3 + 1 + 2 + 4) / 4
    assert stats["truncated_frac"] == 1 / 4
    assert stats["zero_std_groups"] == 1 / 2  # group 0 has one scored reward: no spread
    # lags by the oldest token: 5 - 4 = 1 and 5 - 3 = 2
    assert stats["policy_lag"] == 1.5 and stats["policy_lag_max"] == 2
    assert stats["lag_hist"] == {"1": 1, "2": 1}
    # per token: 1, 1, 0, 1 (group 0) and six 2s (group 1): 15 over 10 tokens
    assert stats["token_lag_mean"] == pytest.approx(15 / 10)
    assert stats["mixed_version_frac"] == 1 / 4  # one completion of four spans two versions


def test_batch_stats_with_nothing_scored():
    nan = float("nan")
    only = group(0, [1], [[5], [6]], rewards=[nan, nan])
    stats = batch_stats([only], trained_version=0)
    assert math.isnan(stats["reward"]) and stats["reward_std"] == 0.0
    assert stats["unscored_frac"] == 1.0 and stats["zero_std_groups"] == 1.0
    assert stats["policy_lag"] == 0 and stats["lag_hist"] == {"0": 1}


def test_by_length_puts_like_lengths_together_and_pads_less():
    # Completions of 1, 4, 1, 4 tokens after one-token prompts: in order, each micro-batch of 2
    # pads a 1 to 4 (3 of 10 positions each); by length, none pads.
    groups = [group(0, [1], [[5], [5, 6, 7, 8]], rewards=[1.0, 0.0]),
              group(1, [2], [[6], [6, 7, 8, 9]], rewards=[0.0, 1.0])]
    in_order = micro_batches(groups, size=2, scale="group", pad_id=PAD)
    by_length = micro_batches(groups, size=2, scale="group", pad_id=PAD, by_length=True)
    assert padded_share(in_order) == pytest.approx(6 / 20) and padded_share(by_length) == 0.0
    assert [mb.completion_ids.tolist() for mb in by_length] == [[[5], [6]], [[5, 6, 7, 8], [6, 7, 8, 9]]]
    # Each sequence keeps its own advantage and behaviour log-probs wherever it lands.
    expected = group_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "group").reshape(-1)
    assert torch.cat([mb.advantages for mb in by_length]).tolist() == expected[[0, 2, 1, 3]].tolist()
    torch.testing.assert_close(by_length[1].behaviour_logp, torch.tensor([[-0.1, -0.2, -0.3, -0.4],
                                                                          [-0.2, -0.3, -0.4, -0.5]]))


# --- multi-turn episodes: environment tokens are context, never trained on --------------------


def episode_group(model_masks: list[list[int]] | None) -> RolloutGroup:
    """Two episodes of one prompt: each a model turn of 3 tokens, 2 environment tokens, a model
    turn of 3 (the second episode's model tokens differ), rewards 1 and 0."""
    completions = [[5, 6, 7, 90, 91, 8, 9, 5], [6, 6, 7, 90, 91, 8, 5, 5]]
    g = group(0, [11, 12], completions, [1.0, 0.0])
    g.model_masks = model_masks
    return g


def single_turn_group() -> RolloutGroup:
    """The same episodes' model tokens, as single-turn completions."""
    return group(0, [11, 12], [[5, 6, 7, 8, 9, 5], [6, 6, 7, 8, 5, 5]], [1.0, 0.0])


def logp_grads(groups: list[RolloutGroup], loss_type: str) -> list[list[float]]:
    """d loss / d log-prob of each completion token (row by row, padding cut), the batch as the
    learner builds and weighs it."""
    from common.config import GRPOConfig
    from learner.grpo import Normalisers, grpo_loss

    grpo = GRPOConfig(loss_type=loss_type, group_size=2, batch_size=2)
    [mb] = micro_batches(groups, 4, "group", PAD)
    logp = (mb.behaviour_logp + 0.05).requires_grad_()  # the learner a little off the engine
    totals = Normalisers(num_sequences=2, num_tokens=trained_tokens(groups), max_completion_length=8,
                         num_micro_batches=1)
    grpo_loss(logp, None, mb.behaviour_logp, None, mb.advantages, mb.completion_mask, grpo,
              totals).loss.backward()
    lengths = [len(ids) for g in groups for ids in g.completion_ids]
    return [row[:n] for row, n in zip(logp.grad.tolist(), lengths)]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_environment_tokens_get_no_gradient_and_model_tokens_a_single_turns(loss_type):
    masks = [[1, 1, 1, 0, 0, 1, 1, 1]] * 2
    episodes = logp_grads([episode_group(masks)], loss_type)
    single = logp_grads([single_turn_group()], loss_type)
    model = [[g for g, m in zip(row, mask) if m] for row, mask in zip(episodes, masks)]
    environment = [[g for g, m in zip(row, mask) if not m] for row, mask in zip(episodes, masks)]
    assert environment == [[0.0, 0.0], [0.0, 0.0]]  # exactly zero
    torch.testing.assert_close(torch.tensor(model), torch.tensor(single), rtol=1e-6, atol=0)
    assert any(g != 0 for row in single for g in row)  # the oracle trains on something
    # Precondition: counted as the model's, the environment's tokens would be trained on and
    # would change the model tokens' weights (every loss but dr_grpo normalises by tokens).
    unmasked = logp_grads([episode_group(None)], loss_type)
    assert any(row[3] != 0 for row in unmasked)


def test_batch_statistics_count_the_models_tokens_and_the_episodes():
    from common.types import Episode

    g = episode_group([[1, 1, 1, 0, 0, 1, 1, 1]] * 2)
    g.token_versions = [[0, 0, 0, 5, 5, 1, 1, 1]] * 2  # an environment token's version is never read
    g.episodes = [Episode(turns=2, env_seconds=0.5, tool_calls=1),
                  Episode(turns=3, env_seconds=1.5, tool_calls=0, error="raised")]
    stats = batch_stats([g], trained_version=1)
    assert stats["completion_len"] == 6
    assert stats["token_lag_mean"] == pytest.approx((3 * 1 + 3 * 0) / 6)
    assert (stats["turns"], stats["env_s"], stats["tool_calls"], stats["env_errors"]) == (2.5, 1.0, 0.5, 1)
    assert trained_tokens([g]) == 12 and g.num_tokens == 12


def test_mask_truncated_completions_drops_a_truncated_episode_whole():
    mask = [1, 1, 1, 0, 0, 1, 1, 1]
    g = episode_group([mask] * 2)
    g.finish_reasons = ["length", "stop"]  # the first episode ran out of its token budget
    [mb] = micro_batches([g], 4, "group", PAD, mask_truncated=True)
    assert mb.completion_mask.tolist() == [[False] * 8, [bool(m) for m in mask]]
    assert trained_tokens([g], mask_truncated=True) == 6  # the second episode's model tokens
