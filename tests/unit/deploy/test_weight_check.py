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
