"""The weight check's arithmetic: the worst token of two scorings of the probe set."""

from __future__ import annotations

import pytest

from deploy.weight_check import TOLERANCE, worst_difference


def test_the_worst_token_is_found_with_both_log_probs():
    learner = [[-1.0, -2.0, -0.5], [-3.0, -0.25]]
    engine = [[-1.0, -2.0001, -0.5], [-3.5, -0.25]]
    worst = worst_difference(learner, engine)
    assert (worst.probe, worst.token) == (1, 0)
    assert (worst.learner, worst.engine) == (-3.0, -3.5)
    assert worst.difference == pytest.approx(0.5)


def test_probe_sets_of_other_shapes_are_an_error_not_a_pass():
    with pytest.raises(ValueError):
        worst_difference([[-1.0, -2.0]], [[-1.0]])


def test_float32_is_held_to_a_thousandth_and_16_bit_formats_to_their_rounding():
    assert TOLERANCE["float32"] == 1e-3 and TOLERANCE["bfloat16"] > TOLERANCE["float16"] > 1e-3
