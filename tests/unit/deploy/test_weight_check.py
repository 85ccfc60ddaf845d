"""The weight check's arithmetic: the mean difference of two scorings of the probe set, and the
worst token."""

from __future__ import annotations

import pytest

from deploy.weight_check import TOLERANCE, compare


def test_the_mean_and_the_worst_token_are_found_with_both_log_probs():
    learner = [[-1.0, -2.0, -0.5], [-3.0, -0.25]]
    engine = [[-1.0, -2.0001, -0.5], [-3.5, -0.25]]
    agreement = compare(learner, engine)
    assert agreement.mean == pytest.approx(0.5001 / 5)
    assert (agreement.probe, agreement.token) == (1, 0)
    assert (agreement.learner, agreement.engine) == (-3.0, -3.5)
    assert agreement.worst == pytest.approx(0.5)


def test_one_unlikely_token_off_by_a_unit_passes_in_bfloat16_and_a_shifted_policy_does_not():
    """bfloat16 rounding can put a token of log-prob -16 a whole unit from the learner's (CI saw
    1.03) while the others agree to a few hundredths; other weights move every token."""
    learner = [[-1.0 - 0.1 * t for t in range(16)], [-16.0] + [-2.0] * 15]
    rounded = [[x + 0.02 for x in learner[0]], [-17.03] + [x - 0.02 for x in learner[1][1:]]]
    shifted = [[x + 0.3 for x in learner[0]], [x - 0.3 for x in learner[1]]]
    assert compare(learner, rounded).worst > 1  # the precondition: the worst token alone would stop it
    assert compare(learner, rounded).mean <= TOLERANCE["bfloat16"] < compare(learner, shifted).mean


def test_probe_sets_of_other_shapes_are_an_error_not_a_pass():
    with pytest.raises(ValueError):
        compare([[-1.0, -2.0]], [[-1.0]])


def test_float32_is_held_to_a_thousandth_and_16_bit_formats_to_their_rounding():
    assert TOLERANCE["float32"] == 1e-3 and TOLERANCE["bfloat16"] > TOLERANCE["float16"] > 1e-3


class FakeLearner:
    """Scores the probe set as the engines would (its weights cast to their dtype), or from its
    float32 weights."""

    def __init__(self, scored: list[list[float]], exact: list[list[float]]):
        self.scored, self.exact = scored, exact

    def probe_logprobs(self, sequences, starts, dtype: str | None = None):
        assert dtype in ("bfloat16", "float32")  # never autocast: it is not what the engines compute
        return self.exact if dtype == "float32" else self.scored


class FakeWorkers:
    def __init__(self, scored: list[list[float]]):
        self.scored = scored

    def probe_logprobs(self, sequences, starts):
        return [self.scored]


def check(learner_scores, exact, engine, ranks: int = 1, tolerance: float | None = None):
    from types import SimpleNamespace

    from common.config import Config
    from common.types import Prompt
    from deploy.weight_check import WeightCheck

    cfg = Config()
    cfg.learner.num_ranks, cfg.cluster.weight_check_tolerance = ranks, tolerance
    return WeightCheck(cfg, FakeLearner(learner_scores, exact), FakeWorkers(engine),
                       [SimpleNamespace(dtype="bfloat16")], [Prompt(0, "p", [1, 2]), Prompt(1, "q", [3])],
                       lambda text, add_special_tokens: {"input_ids": [7, 8]})


def shifted(scores: list[list[float]], by: float) -> list[list[float]]:
    return [[x + by for x in row] for row in scores]


def test_in_16_bits_the_tolerance_follows_the_learners_own_rounding():
    from deploy.weight_check import ROUNDING_FACTOR, ROUNDING_FLOOR, WeightCheckFailed

    learner = [[-1.0, -20.0], [-2.0, -25.0]]
    # A sharp policy: its float32 scores are 0.3 from its bfloat16 ones, so an engine 0.5 apart
    # (other bfloat16 kernels move it by a share of that rounding) holds, as the fixed 0.1 would not.
    exact = shifted(learner, 0.3)
    got = check(learner, exact, shifted(learner, -0.5))(3)
    assert got["probe_rounding"] == pytest.approx(0.3) and got["probe_tolerance"] == pytest.approx(ROUNDING_FACTOR * 0.3)
    assert 0.5 > TOLERANCE["bfloat16"]  # the precondition: the fixed tolerance would have stopped it
    with pytest.raises(WeightCheckFailed, match=r"tolerance 0\.9 \(3x the learner's own bfloat16 rounding of it, 0\.3\)"):
        check(learner, exact, shifted(learner, -1.0))(3)
    # Rounding near nothing (a fresh model): the floor, so a small corruption still stops it.
    fresh = check(learner, shifted(learner, 1e-4), shifted(learner, 0.004))(1)
    assert fresh["probe_tolerance"] == ROUNDING_FLOOR
    with pytest.raises(WeightCheckFailed):
        check(learner, shifted(learner, 1e-4), shifted(learner, 0.015))(2)


def test_a_set_tolerance_and_a_sharded_learner_keep_the_fixed_one():
    from deploy.weight_check import WeightCheckFailed

    learner = [[-1.0, -20.0]]
    exact = shifted(learner, 0.3)
    assert check(learner, exact, learner, tolerance=0.05)(1)["probe_tolerance"] == 0.05
    sharded = check(learner, exact, shifted(learner, 0.05), ranks=2)(1)
    assert sharded["probe_rounding"] == 0.0 and sharded["probe_tolerance"] == TOLERANCE["bfloat16"]
    with pytest.raises(WeightCheckFailed, match="cluster.weight_check_tolerance"):
        check(learner, exact, shifted(learner, 0.5), ranks=2)(1)
