"""Layer placement: pure, deterministic, and clear when it cannot fit."""

from __future__ import annotations

import pytest

from zmqinfer.gateway.placement import PlacementError, plan, split_counts
from zmqinfer.wire import NodeId

N = [NodeId(n) for n in ("a", "b", "c")]


def test_three_equal_nodes_28_layers_give_10_9_9() -> None:
    assert split_counts(28, [16, 16, 16]) == [10, 9, 9]
    p = plan(28, N)
    assert [(x.node, x.start, x.end) for x in p] == [("a", 0, 10), ("b", 10, 19), ("c", 19, 28)]


@pytest.mark.parametrize("n_layers", range(3, 40))
@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 2, 3], [16, 8, 0.5], [5, 5, 1]])
def test_split_is_contiguous_complete_and_proportional(n_layers, weights) -> None:
    counts = split_counts(n_layers, weights)
    assert sum(counts) == n_layers and min(counts) >= 1
    total = sum(weights)
    for c, w in zip(counts, weights):
        assert abs(c - n_layers * w / total) < 1.0 + 1e-9 or c == 1
    p = plan(n_layers, N, weights=weights)
    assert p[0].start == 0 and p[-1].end == n_layers
    assert all(x.end == y.start for x, y in zip(p, p[1:]))


def test_pinned_counts_are_honoured_and_the_rest_shared() -> None:
    p = plan(30, N, counts=[4, None, None])
    assert [x.n_layers for x in p] == [4, 13, 13]
    assert [x.n_layers for x in plan(30, N, counts=[10, 10, 10])] == [10, 10, 10]


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_layers=2, nodes=N), "only 2 layers"),
    (dict(n_layers=30, nodes=N, counts=[10, 10, 9]), "add up to 29"),
    (dict(n_layers=30, nodes=N, counts=[15, 15, None]), "leave 0 layers for 1"),
    (dict(n_layers=30, nodes=N, counts=[0, None, None]), "at least 1"),
    (dict(n_layers=30, nodes=[NodeId("a"), NodeId("a")]), "duplicate"),
    (dict(n_layers=30, nodes=[]), "no nodes"),
    (dict(n_layers=30, nodes=N, counts=[1, 2]), "3 nodes but 2"),
])
def test_impossible_placements_say_why(kwargs, match) -> None:
    with pytest.raises(PlacementError, match=match):
        plan(**kwargs)
