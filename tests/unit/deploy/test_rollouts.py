"""Splitting a round's prompts over the rollout workers."""

from __future__ import annotations

from deploy.rollouts import split


def test_split_sizes_differ_by_at_most_one_larger_first():
    assert split(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_split_fewer_items_than_parts_leaves_empty_tails():
    assert split(["a", "b"], 3) == [["a"], ["b"], []]


def test_split_even_and_single():
    assert split([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]
    assert split([1, 2, 3], 1) == [[1, 2, 3]]
    assert split([], 2) == [[], []]
