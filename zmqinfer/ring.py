"""Pure ring planning: which node runs which contiguous range of layers, in which order.

No sockets, no clocks: the gateway feeds it the membership it sees and gets a plan back, so the
rules are unit-tested exhaustively and the same inputs always give the same ring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .wire import NodeId


class PlacementError(ValueError):
    """No valid placement; the message names what is missing."""


@dataclass(frozen=True)
class Placement:
    node: NodeId
    start: int
    end: int  # exclusive

    @property
    def n_layers(self) -> int:
        return self.end - self.start


def split_counts(n_layers: int, weights: Sequence[float]) -> list[int]:
    """Layer counts proportional to `weights` (largest remainder; ties go to the earlier node),
    each at least 1. Three equal nodes and 28 layers give 10-9-9."""
    if not weights:
        raise PlacementError("no nodes to place layers on")
    if any(w <= 0 for w in weights):
        raise PlacementError(f"node weights must be positive, got {list(weights)}")
    if n_layers < len(weights):
        raise PlacementError(f"{len(weights)} nodes but the model has only {n_layers} layers: "
                             "every node needs at least one")
    total = float(sum(weights))
    exact = [n_layers * w / total for w in weights]
    counts = [max(1, int(e)) for e in exact]
    # Hand out (or take back) the remainder by largest fractional part, deterministically.
    while sum(counts) < n_layers:
        i = max(range(len(counts)), key=lambda j: (exact[j] - counts[j], -j))
        counts[i] += 1
    while sum(counts) > n_layers:
        i = max((j for j in range(len(counts)) if counts[j] > 1),
                key=lambda j: (counts[j] - exact[j], j))
        counts[i] -= 1
    return counts


def plan(n_layers: int, nodes: Sequence[NodeId], counts: Sequence[int | None] | None = None,
         weights: Sequence[float] | None = None) -> list[Placement]:
    """Contiguous ranges over `nodes` in ring order.

    `counts[i]` pins node i's layer count (None = share the rest by weight); all pinned means
    they must add up to the model exactly.
    """
    if not nodes:
        raise PlacementError("no nodes to place layers on")
    if len(set(nodes)) != len(nodes):
        raise PlacementError(f"duplicate node ids in {list(nodes)}")
    counts = list(counts) if counts is not None else [None] * len(nodes)
    weights = list(weights) if weights is not None else [1.0] * len(nodes)
    if len(counts) != len(nodes) or len(weights) != len(nodes):
        raise PlacementError(f"{len(nodes)} nodes but {len(counts)} layer counts / {len(weights)} weights")
    if any(c is not None and c < 1 for c in counts):
        raise PlacementError(f"layer counts must be at least 1, got {counts}")
    pinned = sum(c for c in counts if c is not None)
    free = [i for i, c in enumerate(counts) if c is None]
    if not free:
        if pinned != n_layers:
            raise PlacementError(f"layer counts {counts} add up to {pinned}, the model has {n_layers}")
    else:
        rest = n_layers - pinned
        if rest < len(free):
            if not pinned:
                raise PlacementError(f"{len(nodes)} nodes but the model has only {n_layers} layers: "
                                     "every node needs at least one")
            raise PlacementError(f"pinned layer counts leave {rest} layers for {len(free)} other nodes")
        for i, c in zip(free, split_counts(rest, [weights[i] for i in free])):
            counts[i] = c
    out, start = [], 0
    for node, c in zip(nodes, counts):
        assert c is not None
        out.append(Placement(node, start, start + c))
        start += c
    return out
