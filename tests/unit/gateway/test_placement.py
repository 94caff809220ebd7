"""plan_by_memory: proportional to free memory, pins kept, hopeless nodes left out with a
reason, and an impossible model refused with its exact shortfall in bytes.

Besides hand-picked cases, a brute force over every contiguous assignment of small models
checks that the planner refuses exactly when no assignment fits.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from typing import Any

import pytest

from zmqinfer.gateway.placement import (
    MemoryPlan,
    NodeCapacity,
    PlacementError,
    plan_by_memory,
    split_counts,
)
from zmqinfer.model.size import ModelSize
from zmqinfer.protocol.wire import NodeId

GB = 1 << 30
MB = 1 << 20
# mlx-community/Qwen3-1.7B-8bit, from its shapes: 28 layers of ~50.3M params at 8 bits plus
# bf16 scales/biases per 64 (8.5 bits/param); a tied 151936 x 2048 embedding.
QWEN3_1_7B_8BIT = ModelSize(n_layers=28, layer_bytes=53_477_376, embed_bytes=330_563_584,
                            head_bytes=4096, tied=True, kv_bytes_per_token=2 * 8 * 128 * 2)


def caps(*spec: tuple[Any, ...]) -> list[NodeCapacity]:
    """caps(("a", free_bytes), ("b", free_bytes, pin), ...)"""
    return [NodeCapacity(NodeId(s[0]), s[1], s[2] if len(s) > 2 else None) for s in spec]


def layout(p: MemoryPlan) -> list[tuple[str, int, int]]:
    return [(x.node, x.start, x.end) for x in p.placements]


def assert_valid(p: MemoryPlan, nodes: list[NodeCapacity], size: ModelSize, kv: int = 0,
                 overhead: int = 0) -> None:
    pl = p.placements
    assert pl[0].start == 0 and pl[-1].end == size.n_layers
    assert all(a.end == b.start for a, b in zip(pl, pl[1:])) and all(x.n_layers >= 1 for x in pl)
    order = [c.node for c in nodes]
    assert [order.index(x.node) for x in pl] == sorted(order.index(x.node) for x in pl)
    by = {c.node: c for c in nodes}
    for i, x in enumerate(pl):
        need = overhead + size.stage_bytes(x.start, x.end, kv)
        assert need <= by[x.node].free_bytes, (x, need)
        pin = by[x.node].pinned
        assert pin is None or pin == x.n_layers or pin == (x.start, x.end)
    assert set(p.excluded) == set(order) - {x.node for x in pl}


def test_three_16gb_macs_and_a_28_layer_model_give_10_9_9() -> None:
    nodes = caps(("mini1", 16 * GB), ("mini2", 16 * GB), ("mini3", 16 * GB))
    p = plan_by_memory(nodes, QWEN3_1_7B_8BIT, kv_tokens=32768, overhead_bytes=300 * MB)
    assert layout(p) == [("mini1", 0, 10), ("mini2", 10, 19), ("mini3", 19, 28)]
    assert p.excluded == {}
    assert_valid(p, nodes, QWEN3_1_7B_8BIT, 32768, 300 * MB)


def test_shares_follow_free_memory() -> None:
    nodes = caps(("big", 32 * GB), ("a", 16 * GB), ("b", 16 * GB))
    assert [x.n_layers for x in plan_by_memory(nodes, QWEN3_1_7B_8BIT).placements] == [14, 7, 7]
    nodes = caps(("a", 8 * GB), ("b", 24 * GB))
    assert [x.n_layers for x in plan_by_memory(nodes, QWEN3_1_7B_8BIT).placements] == [7, 21]


def test_a_node_never_gets_more_than_it_holds() -> None:
    size = ModelSize(n_layers=20, layer_bytes=100 * MB)
    # By memory "small" would get 4 layers; it holds 3, the others take the rest by share.
    nodes = caps(("big", 1100 * MB), ("small", 380 * MB), ("mid", 700 * MB))
    p = plan_by_memory(nodes, size)
    assert layout(p) == [("big", 0, 10), ("small", 10, 13), ("mid", 13, 20)]
    assert_valid(p, nodes, size)


def test_nodes_that_cannot_hold_one_layer_are_left_out_with_the_reason() -> None:
    size = ModelSize(n_layers=10, layer_bytes=100 * MB, embed_bytes=300 * MB, head_bytes=50 * MB)
    # "tiny" could hold a middle layer but not a layer plus the embedding, so as the first node
    # it is left out and the embedding moves to "a"; "crumb" cannot hold anything.
    nodes = caps(("tiny", 350 * MB), ("a", 2 * GB), ("crumb", 99 * MB), ("b", 2 * GB))
    p = plan_by_memory(nodes, size)
    assert layout(p) == [("a", 0, 5), ("b", 5, 10)]
    assert p.excluded["tiny"] == ("cannot hold one layer: 367001600 bytes free, one layer there "
                                  "needs 419430400")
    assert p.excluded["crumb"].startswith("cannot hold one layer: 103809024 bytes free")
    assert_valid(p, nodes, size)


def test_more_nodes_than_layers_leaves_the_smallest_inner_node_out() -> None:
    size = ModelSize(n_layers=3, layer_bytes=MB)
    nodes = caps(("a", 4 * GB), ("b", 3 * GB), ("c", 2 * GB), ("d", 1 * GB))
    p = plan_by_memory(nodes, size)
    assert layout(p) == [("a", 0, 1), ("b", 1, 2), ("d", 2, 3)]  # d is last: c goes instead
    assert p.excluded == {"c": "not needed: 3 layer(s) [0,3) for 4 nodes"}


def test_the_shortfall_is_exact_and_names_the_node() -> None:
    size = ModelSize(n_layers=28, layer_bytes=60 * MB, embed_bytes=300 * MB, head_bytes=MB, tied=True)
    nodes = caps(("a", GB), ("b", GB))
    with pytest.raises(PlacementError) as e:
        plan_by_memory(nodes, size)
    msg = str(e.value)
    # a: 1024-300 = 724 MiB -> 12 layers, 4 MiB spare; b (tied head: 301 MiB) 12 layers, 3 MiB
    # spare. 4 more layers = 240 MiB, minus a's 4 MiB spare.
    assert "room for 24; short by 247463936 bytes (0.23 GiB): a would need that much more" in msg
    short = int(re.search(r"short by (\d+) bytes", msg)[1])  # type: ignore[index]
    plan_by_memory(caps(("a", GB + short), ("b", GB)), size)  # that much more fits ...
    with pytest.raises(PlacementError):  # ... one byte less does not
        plan_by_memory(caps(("a", GB + short - 1), ("b", GB)), size)


def test_nothing_fits_anywhere() -> None:
    size = ModelSize(n_layers=4, layer_bytes=GB, embed_bytes=GB)
    with pytest.raises(PlacementError, match=r"no node can hold even one layer of \[0,4\): the "
                       r"best, b, has 1610612736 bytes free; holding them all needs 5368709120: "
                       r"short by 3758096384 bytes"):
        plan_by_memory(caps(("a", GB), ("b", 3 * GB // 2)), size)


def test_pinned_counts_and_ranges_are_kept() -> None:
    size = ModelSize(n_layers=28, layer_bytes=50 * MB)
    nodes = caps(("a", 16 * GB, 4), ("b", 16 * GB), ("c", 8 * GB), ("d", 16 * GB, (20, 28)))
    p = plan_by_memory(nodes, size)
    # [0,20) before d's range: a keeps 4, b and c share 16 by memory (2:1).
    assert layout(p) == [("a", 0, 4), ("b", 4, 15), ("c", 15, 20), ("d", 20, 28)]
    assert_valid(p, nodes, size)
    nodes = caps(("a", 16 * GB, (0, 10)), ("b", 16 * GB, (10, 19)), ("c", 16 * GB, (19, 28)))
    assert layout(plan_by_memory(nodes, size)) == [("a", 0, 10), ("b", 10, 19), ("c", 19, 28)]


@pytest.mark.parametrize("nodes,match", [
    (caps(("a", GB, (0, 10)), ("b", GB, (12, 28))), r"layers \[10,12\) are held by no node"),
    (caps(("a", GB, (0, 10)), ("b", GB, (9, 28))), r"b: pinned layers \[9,28\) overlap layers before 10"),
    (caps(("a", GB, (0, 30))), r"a: pinned layers \[0,30\) are outside the model's 28 layers"),
    (caps(("a", GB, (0, 10))), r"layers \[10,28\) are held by no node"),
    (caps(("a", GB, 10), ("b", GB, 10)), r"add up to 20, but layers \[0,28\) are 28"),
    (caps(("a", GB, 0), ("b", GB)), "at least 1"),
    (caps(("a", 100 * MB, 5), ("b", 16 * GB)), r"a is pinned to 5 layer\(s\) needing 262144000 bytes "
     r"\(0.24 GiB\) but has 104857600 free: short by 157286400 bytes"),
    (caps(("a", GB), ("a", GB)), "duplicate"),
    (caps(("a", -1)), "negative"),
    ([], "no nodes"),
])
def test_impossible_pins_say_why(nodes, match) -> None:
    with pytest.raises(PlacementError, match=match):
        plan_by_memory(nodes, ModelSize(n_layers=28, layer_bytes=50 * MB))


def fits_somehow(nodes: list[NodeCapacity], size: ModelSize) -> bool:
    """Brute force: any subset of nodes (ring order kept), any split with >= 1 layer each."""
    n = size.n_layers
    for k in range(1, min(len(nodes), n) + 1):
        for subset in itertools.combinations(nodes, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = (0, *cuts, n)
                if all(size.stage_bytes(bounds[i], bounds[i + 1]) <= c.free_bytes
                       for i, c in enumerate(subset)):
                    return True
    return False


@pytest.mark.parametrize("seed", range(300))
def test_refuses_exactly_when_nothing_fits(seed: int) -> None:
    rng = random.Random(seed)
    n_nodes = rng.randint(1, 4)
    size = ModelSize(n_layers=rng.randint(n_nodes, 8), layer_bytes=rng.randint(1, 4) * 10,
                     embed_bytes=rng.choice([0, 15, 40]), head_bytes=rng.choice([0, 5, 30]),
                     tied=rng.random() < 0.5)
    nodes = [NodeCapacity(NodeId(f"n{i}"), rng.randint(0, 160)) for i in range(n_nodes)]
    try:
        p = plan_by_memory(nodes, size)
    except PlacementError:
        assert not fits_somehow(nodes, size), (nodes, size)
        return
    assert_valid(p, nodes, size)
    # With no node at its cap the split is exactly proportional to free memory.
    kept = [c for c in nodes if c.node not in p.excluded]
    room = {c.node: c.free_bytes for c in kept}
    if all(size.fixed_bytes(True, True) + (x.n_layers + 1) * size.layer_bytes <= room[x.node] for x in p.placements):
        assert [x.n_layers for x in p.placements] == split_counts(size.n_layers, [c.free_bytes for c in kept])


# A DeepSeek-like model: 3 dense layers of 60 MB, then 21 MoE layers of 400 MB (10 GB in all,
# with a 300 MB untied embedding on the first stage and a 300 MB head on the last).
MOE = ModelSize(n_layers=24, layer_bytes=400 * MB, embed_bytes=300 * MB, head_bytes=300 * MB,
                layers=(60 * MB,) * 3 + (400 * MB,) * 21)


def test_layers_of_different_sizes_place_by_their_bytes() -> None:
    # Neither node holds the model (about 9 GiB). By memory the first would get 13 layers and
    # the second 11 MoE layers + head (4.6 GiB) in its 4.5: by bytes the first takes 14 (the 3
    # small ones: 4.8 GiB in 5), the second 10 (4.2 GiB), the only cut that fits.
    nodes = caps(("a", 5 * GB), ("b", 4608 * MB))
    assert all(c.free_bytes < MOE.stage_bytes(0, 24) for c in nodes)
    p = plan_by_memory(nodes, MOE)
    assert_valid(p, nodes, MOE)
    assert layout(p) == [("a", 0, 14), ("b", 14, 24)]
    # Counted as 24 of the largest layers it would not fit these nodes at all.
    assert 24 * 400 * MB + 600 * MB > sum(c.free_bytes for c in nodes)


def test_a_tied_head_weighs_on_the_last_stage() -> None:
    untied = ModelSize(n_layers=4, layer_bytes=100 * MB, embed_bytes=300 * MB, head_bytes=300 * MB,
                       layers=(100 * MB,) * 4)
    tied = dataclasses.replace(untied, head_bytes=MB, tied=True)  # the head is the embedding
    assert tied.stage_bytes(2, 4) == 200 * MB + MB + 300 * MB == untied.stage_bytes(2, 4) + MB
    assert tied.stage_bytes(0, 4) == untied.stage_bytes(0, 4) - 299 * MB  # held once when one stage


def fits_somehow_by_layer(nodes: list[NodeCapacity], size: ModelSize) -> bool:
    n = size.n_layers
    for k in range(1, min(len(nodes), n) + 1):
        for subset in itertools.combinations(nodes, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = (0, *cuts, n)
                if all(size.stage_bytes(bounds[i], bounds[i + 1]) <= c.free_bytes for i, c in enumerate(subset)):
                    return True
    return False


@pytest.mark.parametrize("seed", range(300))
def test_layers_of_different_sizes_refuse_exactly_when_nothing_fits(seed: int) -> None:
    rng = random.Random(seed)
    n_nodes = rng.randint(1, 4)
    n = rng.randint(n_nodes, 8)
    sizes = tuple(rng.randint(1, 6) * 10 for _ in range(n))
    size = ModelSize(n_layers=n, layer_bytes=max(sizes), layers=sizes, embed_bytes=rng.choice([0, 15, 40]),
                     head_bytes=rng.choice([0, 5, 30]), tied=rng.random() < 0.5)
    nodes = [NodeCapacity(NodeId(f"n{i}"), rng.randint(0, 200)) for i in range(n_nodes)]
    try:
        p = plan_by_memory(nodes, size)
    except PlacementError as e:
        assert not fits_somehow_by_layer(nodes, size), (nodes, size, str(e))
        return
    assert_valid(p, nodes, size)
