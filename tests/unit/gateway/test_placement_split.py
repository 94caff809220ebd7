"""Layer counts by weight: deterministic, complete, proportional (placement.split_counts, which
plan_by_memory uses; its pins and refusals are tested in test_placement.py)."""

from __future__ import annotations

import pytest

from zmqinfer.gateway.placement import PlacementError, split_counts


def test_three_equal_nodes_28_layers_give_10_9_9() -> None:
    assert split_counts(28, [16, 16, 16]) == [10, 9, 9]


@pytest.mark.parametrize("n_layers", range(3, 40))
@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 2, 3], [16, 8, 0.5], [5, 5, 1]])
def test_split_is_complete_and_proportional(n_layers, weights) -> None:
    counts = split_counts(n_layers, weights)
    assert sum(counts) == n_layers and min(counts) >= 1
    total = sum(weights)
    for c, w in zip(counts, weights):
        assert abs(c - n_layers * w / total) < 1.0 + 1e-9 or c == 1


@pytest.mark.parametrize("n_layers,weights,match", [
    (2, [1, 1, 1], "only 2 layers"),
    (30, [], "no nodes"),
    (30, [1, 0, 1], "must be positive"),
])
def test_impossible_splits_say_why(n_layers, weights, match) -> None:
    with pytest.raises(PlacementError, match=match):
        split_counts(n_layers, weights)
