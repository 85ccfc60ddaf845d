"""Reward functions: built-in values, name resolution, weighted combination, error messages."""

from __future__ import annotations

import math

import pytest

from common import rewards
from common.rewards import RewardError, Scorer

HERE = "tests.unit.common.test_rewards"


def my_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    return [float(len(c)) for c in completions]


def echo_bonus(prompts: list[str], completions: list[str], bonus: list[float], **kwargs):
    return [b + (1.0 if p in c else 0.0) for p, c, b in zip(prompts, completions, bonus)]


def fails_by_position(prompts, completions, **kwargs):
    # Fails on the batch's third slot whatever is in it, so no sample fails on its own.
    return [1.0 / (i != 2) for i, _ in enumerate(completions)]


def fails_on_boom(prompts, completions, **kwargs):
    return [1.0 if "boom" not in c else 1 / 0 for c in completions]


def scores_questions_only(prompts, completions, **kwargs):
    """A task's reward: it scores completions of prompts ending in '?', and no others."""
    return [1.0 if c.strip().endswith(".") else 0.0 if p.endswith("?") else None
            for p, c in zip(prompts, completions)]


def returns_nan(prompts, completions, **kwargs):
    return [math.nan if c == "bad" else 0.0 for c in completions]


def returns_inf(prompts, completions, **kwargs):
    return [math.inf if c == "bad" else 0.0 for c in completions]


def returns_text(prompts, completions, **kwargs):
    return ["high" if c == "bad" else 0.0 for c in completions]


def returns_short(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def returns_scalar(prompts, completions, **kwargs):
    return 1.0


NOT_CALLABLE = 3


def score(name: str, completions: list[str], **columns) -> list[float]:
    _, parts = Scorer([name])([""] * len(completions), completions, columns=columns)
    return parts[name]


def test_explicit_pos_ranks_positive_above_negative_and_neutral_near_zero():
    pos, neg, neutral = score("explicit_pos", [
        "I love this, it is wonderful and great!",
        "This is terrible and I hate it.",
        "The train leaves the station at nine.",
    ])
    assert pos > 0.5 and neg < -0.5
    assert abs(neutral) < 0.1


def test_explicit_pos_scores_the_completion_only():
    _, parts = Scorer(["explicit_pos"])(["I hate everything, awful!"], ["The sky is blue."])
    assert abs(parts["explicit_pos"][0]) < 0.1


def test_length_and_format_values():
    words = ["", "one two three four five", " ".join(["w"] * 40)]
    assert score("length", words) == [0.0, 0.25, 1.0]
    assert score("format", ["Done.", "Really?  ", "Wow!", "no end", "", "a.b,"]) == [
        1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_resolve_builtin_and_module_path():
    assert rewards.resolve("length") is rewards.length
    assert rewards.resolve(f"{HERE}:my_reward") is my_reward
    assert [rewards.resolve(name) for name in ("explicit_pos", "format")] == [rewards.explicit_pos,
                                                                             rewards.format_]


def test_unknown_builtin_lists_builtins():
    with pytest.raises(RewardError) as info:
        rewards.resolve("foo")
    msg = str(info.value)
    assert "`foo`" in msg and "explicit_pos, length, format" in msg and "module:function" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("path, needle", [
    ("no_such_pkg_xyz.mod:fn", "cannot import module `no_such_pkg_xyz.mod`"),
    (f"{HERE}:missing_fn", "no attribute `missing_fn`"),
    (f"{HERE}:NOT_CALLABLE", "not a callable"),
    (f"{HERE}:", "module:function"),
])
def test_resolve_bad_path(path, needle):
    with pytest.raises(RewardError, match=needle):
        rewards.resolve(path)


def test_register_adds_builtin():
    @rewards.register("test_only_constant")
    def constant(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    try:
        assert rewards.resolve("test_only_constant") is constant
    finally:
        rewards._REGISTRY.pop("test_only_constant")


def test_weighted_combination():
    scorer = Scorer(["length", "format", f"{HERE}:my_reward"], [2.0, 0.5, -0.1])
    completions = ["one two three four five.", "no end"]
    total, parts = scorer(["p", "p"], completions)
    assert parts == {"length": [0.25, 0.1], "format": [1.0, 0.0], f"{HERE}:my_reward": [24.0, 6.0]}
    assert total == pytest.approx([2 * 0.25 + 0.5 * 1.0 - 0.1 * 24, 2 * 0.1 + 0 - 0.1 * 6])


def test_combine_sums_the_scoring_functions_and_keeps_nan_when_none_scored():
    nan = math.nan
    # weights 1 and 0.5: 1 (second unscored), NaN (none scored), 1 + 0.5 x 2 = 2
    out = rewards.combine([[1.0, nan, 1.0], [nan, nan, 2.0]], [1.0, 0.5])
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == 2.0


def test_default_weights_are_one():
    total, _ = Scorer(["length", "format"])(["p"], ["ten words " * 5 + "end."])
    assert total == pytest.approx([11 / 20 + 1.0])


def test_weights_length_mismatch():
    with pytest.raises(RewardError, match="2 reward weights for 1 reward functions"):
        Scorer(["length"], [1.0, 2.0])


def test_columns_passed_as_kwargs():
    total, _ = Scorer([f"{HERE}:echo_bonus"])(
        ["cat", "dog"], ["a cat", "a cow"], columns={"bonus": [10.0, 20.0], "unused": ["x", "y"]})
    assert total == [11.0, 20.0]


def test_empty_batch():
    assert Scorer(["length", "explicit_pos"])([], []) == ([], {"length": [], "explicit_pos": []})


@pytest.mark.parametrize("fn, completions, needles", [
    ("fails_by_position", ["a", "b", "c", "d"], ["raised ZeroDivisionError", "batch of 4",
                                                  "no single sample fails alone"]),
    ("fails_on_boom", ["ok", "fine", "x boom " * 20], ["raised ZeroDivisionError", "sample 2",
                                                        "'x boom x boom", "...'"]),
    ("returns_nan", ["good", "bad"], ["returned nan", "sample 1", "'bad'"]),
    ("returns_inf", ["bad", "good"], ["returned inf", "sample 0", "'bad'"]),
    ("returns_text", ["good", "bad"], ["returned 'high'", "sample 1", "'bad'"]),
    ("returns_short", ["a", "b", "c"], ["returned 2 scores for 3 completions"]),
    ("returns_scalar", ["a"], ["returned a float", "expected a list"]),
])
def test_misbehaving_reward_errors(fn, completions, needles):
    name = f"{HERE}:{fn}"
    with pytest.raises(RewardError) as info:
        Scorer([name])([""] * len(completions), completions)
    msg = str(info.value)
    assert f"reward `{name}`" in msg and "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_raising_reward_chains_original_exception():
    with pytest.raises(RewardError) as info:
        Scorer([f"{HERE}:fails_on_boom"])(["p"], ["boom"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_a_reward_may_leave_samples_unscored():
    scorer = Scorer([f"{HERE}:scores_questions_only", "length"], [2.0, 0.5])
    total, parts = scorer(["Why?", "Why?", "Say hi"], ["Because.", "no end", "hi there"])
    # Both score the questions: 2 * 1 + 0.5 * (1 / 20); 2 * 0 + 0.5 * (2 / 20). Only `length`
    # scores the third: 0.5 * (2 / 20).
    assert total == pytest.approx([2.025, 0.05, 0.05])
    assert parts[f"{HERE}:scores_questions_only"][:2] == [1.0, 0.0]
    assert math.isnan(parts[f"{HERE}:scores_questions_only"][2])


def test_a_sample_no_reward_scores_is_nan():
    total, _ = Scorer([f"{HERE}:scores_questions_only"])(["Say hi"], ["hi"])
    assert math.isnan(total[0])


def test_built_ins_take_both_the_positional_form_and_trls_keywords():
    """Plug-ins written for the positional form call the built-ins so (a test plug-in does)."""
    completions = ["I love it!", "I hate it."]
    positional = rewards.explicit_pos(["p", "p"], completions)
    assert rewards.explicit_pos(prompts=["p", "p"], completions=completions, completion_ids=[[], []]) == positional
    messages = [[{"role": "assistant", "content": "one two"}]]
    assert rewards.length(["p"], ["one two"]) == rewards.length(prompts=["p"], completions=messages)
