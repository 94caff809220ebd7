"""Pure ring planning: which node runs which contiguous range of layers, in which order.

No sockets, no clocks: the gateway feeds it the membership it sees and gets a plan back, so the
rules are unit-tested exhaustively and the same inputs always give the same ring.

KV room at plan time: each stage's free memory - its weights - RUNTIME_HEADROOM_BYTES is its KV
room (kvroom.py), which admission (admission.py) then shares out per request.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Sequence

from zmqinfer.model.size import ModelSize
from zmqinfer.protocol.wire import NodeId

# KV every stage must have room for on top of its weights when the ring is planned: one long
# request (1024 tokens: a long chat turn). More is admitted when the memory is there; a node
# that cannot hold even this much does not get those layers.
KV_RESERVE_TOKENS = 1024
# What a stage needs beside weights and KV while it computes: mlx scratch buffers of one
# forward (a 256-token prefill chunk's attention scores are ~20 MB for a 2048-context 9-head
# model). The node's idle runtime is already out of its free memory. Kept at 32 MiB so that two
# nodes under test_failover's 560 MB limit still hold the embedded model (~7 MB to spare at the
# highest runtime measured there).
RUNTIME_HEADROOM_BYTES = 32 << 20


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


# ---- placement by free memory -----------------------------------------------------------------

Pin = tuple[int, int] | int | None  # a [start, end) range, a layer count, or free
_GIB = float(1 << 30)


@dataclass(frozen=True)
class NodeCapacity:
    node: NodeId
    free_bytes: int  # what the node reports as available (its heartbeat's mem_free)
    pinned: Pin = None  # nodes.toml `layers`: a count or a [start, end) range


@dataclass(frozen=True)
class MemoryPlan:
    placements: list[Placement]  # ring order, contiguous, covering every layer
    excluded: dict[NodeId, str]  # nodes left out of the ring, and why


def plan_by_memory(nodes: Sequence[NodeCapacity], size: ModelSize, *, kv_tokens: int = 0,
                   overhead_bytes: int = 0) -> MemoryPlan:
    """Assign contiguous layer ranges in ring order (the order of `nodes`).

    Unpinned nodes share the layers in proportion to their free memory, never beyond what it
    holds (a node's own runtime `overhead_bytes`, its weights, `kv_tokens` of KV cache per
    layer), each layer weighed by its own bytes (`ModelSize.layers`: an MoE layer outweighs a
    dense one). Pinned counts and ranges are kept exactly; unpinned nodes fill the gaps between
    pinned ranges in ring order. An unpinned node that cannot hold one layer (or is not needed
    because there are more nodes than layers) is excluded and the reason recorded. When the
    layers do not fit, PlacementError names the shortfall in bytes.
    """
    if not nodes:
        raise PlacementError("no nodes to place layers on")
    names = [c.node for c in nodes]
    if len(set(names)) != len(names):
        raise PlacementError(f"duplicate node ids in {names}")
    n = size.n_layers
    if n < 1 or size.layer_bytes < 1:
        raise PlacementError(f"a model needs layers of positive size, got {size}")
    if overhead_bytes < 0 or kv_tokens < 0:
        raise PlacementError("overhead_bytes and kv_tokens must not be negative")
    ctx = _Ctx(size, kv_tokens, overhead_bytes)
    counts: dict[NodeId, tuple[int, int]] = {}
    excluded: dict[NodeId, str] = {}
    group: list[NodeCapacity] = []
    cursor = 0
    for c in nodes:
        if c.free_bytes < 0:
            raise PlacementError(f"{c.node}: free memory cannot be negative ({c.free_bytes})")
        if isinstance(c.pinned, int) and c.pinned < 1:
            raise PlacementError(f"{c.node}: a pinned layer count must be at least 1, got {c.pinned}")
        if not isinstance(c.pinned, tuple):
            group.append(c)
            continue
        start, end = c.pinned
        if not 0 <= start < end <= n:
            raise PlacementError(f"{c.node}: pinned layers [{start},{end}) are outside the model's "
                                 f"{n} layers")
        if start < cursor:
            raise PlacementError(f"{c.node}: pinned layers [{start},{end}) overlap layers before "
                                 f"{cursor} held earlier in ring order")
        ctx.fill(cursor, start, group, counts, excluded)
        ctx.check(c, start, end)
        counts[c.node] = (start, end)
        cursor, group = end, []
    ctx.fill(cursor, n, group, counts, excluded)
    return MemoryPlan([Placement(c.node, *counts[c.node]) for c in nodes if c.node in counts],
                      excluded)


@dataclass
class _Ctx:
    size: ModelSize
    kv_tokens: int
    overhead: int

    def __post_init__(self) -> None:
        # Prefix sums of the layers' weights: ranges are priced many times over.
        sizes = self.size.layers or (self.size.layer_bytes,) * self.size.n_layers
        self._upto = [0, *itertools.accumulate(sizes)]

    def layers(self, start: int, end: int) -> int:
        """Weights and KV reserve of layers [start, end), each layer its own size."""
        return self._upto[end] - self._upto[start] + (end - start) * self.kv_tokens * self.size.kv_bytes_per_token

    def fixed(self, first: bool, last: bool) -> int:
        return self.overhead + self.size.fixed_bytes(first, last)

    def check(self, c: NodeCapacity, start: int, end: int) -> None:
        need = self.fixed(start == 0, end == self.size.n_layers) + self.layers(start, end)
        if need > c.free_bytes:
            raise PlacementError(
                f"{c.node} is pinned to {end - start} layer(s) needing {need} bytes "
                f"({need / _GIB:.2f} GiB) but has {c.free_bytes} free: short by "
                f"{need - c.free_bytes} bytes")

    def fill(self, start: int, end: int, members: list[NodeCapacity],
             counts: dict[NodeId, tuple[int, int]], excluded: dict[NodeId, str]) -> None:
        """Place layers [start, end) on `members` (unpinned or count-pinned), in order: counts
        in proportion to free memory, each capped at what it holds of layers of the average
        size; then each range moved to the nearest that fits by its layers' own bytes."""
        total = end - start
        if total > 0 and not members:
            raise PlacementError(f"layers [{start},{end}) are held by no node: pinned ranges leave "
                                 "a gap with no unpinned node between them in ring order")
        active = self._sit_out(start, end, members, excluded)
        if not active:
            if total == 0:
                return
            best = max(members, key=lambda c: c.free_bytes)
            need = self.fixed(start == 0, end == self.size.n_layers) + self.layers(start, end)
            raise PlacementError(
                f"no node can hold even one layer of [{start},{end}): the best, {best.node}, has "
                f"{best.free_bytes} bytes free; holding them all needs {need}: short by "
                f"{need - best.free_bytes} bytes")
        ends = _Ends(self, start, end, active)
        free = [c for c in active if c.pinned is None]
        fixed = {c.node: c.pinned for c in active if isinstance(c.pinned, int)}
        rest = total - sum(fixed.values())
        for i, c in enumerate(active):
            if c.node in fixed:  # where it sits if at an end of the ring; between, from the start
                at = end - fixed[c.node] if ends.last[i] else start
                self.check(c, at, at + fixed[c.node])
        if rest < 0 or (not free and rest != 0):
            raise PlacementError(f"pinned layer counts {sorted(fixed.values())} add up to "
                                 f"{sum(fixed.values())}, but layers [{start},{end}) are {total}")
        per_layer = max(1, self.layers(start, end) // total)
        caps = {c.node: max(0, c.free_bytes - self.fixed(ends.first[i], ends.last[i])) // per_layer
                for i, c in enumerate(active)}
        if not ends.possible():
            raise self._short(start, end, ends, rest, sum(caps[c.node] for c in free))
        fixed.update(_water_fill(free, caps, rest))
        cursor = start
        for i, c in enumerate(active):
            q = ends.nearest(i, cursor, cursor + fixed[c.node])
            if q is None:  # layers of different sizes: the others hold the rest without it
                excluded[c.node] = (f"not needed: the nodes before it hold [{start},{end})" if cursor == end
                                    else f"cannot hold what the others leave: {c.free_bytes} bytes "
                                         f"free, layer {cursor} there needs {ends.need(cursor, cursor + 1)}")
                continue
            counts[c.node] = (cursor, q)
            cursor = q
        assert cursor == end, (cursor, end)

    def _short(self, start: int, end: int, ends: _Ends, rest: int, room: int) -> PlacementError:
        """The refusal: how many layers of the average size the nodes hold (`room`), and the
        least memory that, added to the node whose spare bytes come closest to another layer,
        makes the layers fit (bisected: what fits only grows with memory; with layers of one
        size, no node needs less)."""
        free = [i for i, c in enumerate(ends.active) if c.pinned is None]
        if not free:
            return PlacementError(f"the pinned layer counts of {', '.join(c.node for c in ends.active)} "
                                  f"do not fit the sizes of layers [{start},{end}) where they fall")
        per_layer = max(1, self.layers(start, end) // (end - start))
        best = max(free, key=lambda i: (ends.active[i].free_bytes - self.fixed(ends.first[i], ends.last[i])) % per_layer
                   if ends.active[i].free_bytes >= self.fixed(ends.first[i], ends.last[i]) else -1)
        lo, hi = 1, self.fixed(True, True) + self.layers(start, end)
        while lo < hi:
            mid = (lo + hi) // 2
            more = [dataclasses.replace(c, free_bytes=c.free_bytes + mid) if j == best else c
                    for j, c in enumerate(ends.active)]
            lo, hi = (lo, mid) if _Ends(self, start, end, more).possible() else (mid + 1, hi)
        short = lo
        return PlacementError(
            f"the model does not fit: {rest} layer(s) of [{start},{end}) for "
            f"{', '.join(ends.active[i].node for i in free)}, which have room for {room}; short by "
            f"{short} bytes ({short / _GIB:.2f} GiB): {ends.active[best].node} would need that much "
            f"more free memory, or add a node (a layer needs {per_layer} bytes)")

    def _sit_out(self, start: int, end: int, members: list[NodeCapacity],
                 excluded: dict[NodeId, str]) -> list[NodeCapacity]:
        """The members that take part: drop (and say why) unpinned nodes that cannot hold one
        layer where they sit (the first, the first layer and the embedding; the last, the last
        layer and the head; one between, the smallest layer), and the smallest ones while there
        are more nodes than layers."""
        total, active = end - start, list(members)
        for _ in range(len(members) + 1):  # each round drops at least one node or stops
            ends = _Ends(self, start, end, active, table=False)
            free = [c for c in active if c.pinned is None]
            rest = total - sum(c.pinned for c in active if isinstance(c.pinned, int))
            one = {c.node: ends.one_layer(i) for i, c in enumerate(active)}
            drop = [c for c in free if one[c.node] > c.free_bytes]
            for c in drop:
                excluded[c.node] = (f"cannot hold one layer: {c.free_bytes} bytes free, one layer "
                                    f"there needs {one[c.node]}")
            if not drop and len(free) > max(rest, 0):
                # More nodes than layers: the one with the least memory sits this ring out,
                # preferably not one at an end, whose embedding/head would move to a neighbour.
                inner = [c for i, c in enumerate(active)
                         if c.pinned is None and not ends.first[i] and not ends.last[i]] or free
                c = min(reversed(inner), key=lambda x: x.free_bytes)
                drop = [c]
                excluded[c.node] = f"not needed: {total} layer(s) [{start},{end}) for {len(free)} nodes"
            if not drop:
                break
            active = [c for c in active if c not in drop]
        return active


class _Ends:
    """Where each of `active`'s ranges of [start, end) may end: it fits the node (its layers'
    own bytes, and the embedding or head that starting at 0 or ending at the last layer brings)
    and the nodes after it can still hold the rest, one layer at least each or none at all (an
    unpinned node whose memory fits no range the others leave sits out, which only layers of
    different sizes can do). A table filled from the last node back."""

    def __init__(self, ctx: _Ctx, start: int, end: int, active: list[NodeCapacity],
                 table: bool = True) -> None:
        self.ctx, self.start, self.end, self.active = ctx, start, end, active
        m, span = len(active), end - start
        self.first = [i == 0 and start == 0 for i in range(m)]
        self.last = [i == m - 1 and end == ctx.size.n_layers for i in range(m)]
        # ok[i][p - start]: nodes i.. can hold [p, end). A range fits less the more it holds
        # and the earlier it starts, so each node's furthest end only grows with its start and
        # one pass of two pointers finds them all (a plan is made on every change of members).
        self.ok = [[False] * (span + 1) for _ in range(m + 1)]
        self.ok[m][span] = True
        for i in range(m - 1, -1, -1) if table else ():
            after, soonest = self.ok[i + 1], [span + 1] * (span + 2)  # soonest q >= p with after[q]
            for r in range(span, -1, -1):
                soonest[r] = r if after[r] else soonest[r + 1]
            q = start
            for p in range(start, end + 1):
                q = max(q, p)
                while q < end and self.need(p, q + 1) <= active[i].free_bytes:
                    q += 1
                pin = active[i].pinned
                if isinstance(pin, int):
                    can = p + pin <= q and after[p + pin - start]
                else:
                    can = after[p - start] or soonest[min(p + 1 - start, span + 1)] <= q - start
                self.ok[i][p - start] = can

    def need(self, p: int, q: int) -> int:
        return self.ctx.fixed(p == 0, q == self.ctx.size.n_layers) + self.ctx.layers(p, q)

    def one_layer(self, i: int) -> int:
        """What node i needs to hold one layer where it sits."""
        if self.first[i] and not self.last[i]:
            layers = self.ctx.layers(self.start, self.start + 1)
        elif self.last[i] and not self.first[i]:
            layers = self.ctx.layers(self.end - 1, self.end)
        else:
            layers = min(self.ctx.layers(p, p + 1) for p in range(self.start, self.end))
        return self.ctx.fixed(self.first[i], self.last[i]) + layers

    def _ends(self, i: int, p: int) -> range:
        pin = self.active[i].pinned
        q = self.most(i, p)
        if isinstance(pin, int):
            return range(p + pin, p + pin + 1) if p + pin <= q else range(0)
        return range(p + 1, q + 1)

    def most(self, i: int, p: int) -> int:
        """The furthest end node i holds from p; p when not even one layer."""
        q = p
        while q < self.end and self.need(p, q + 1) <= self.active[i].free_bytes:
            q += 1
        return q

    def possible(self) -> bool:
        return self.ok[0][0]

    def nearest(self, i: int, p: int, target: int) -> int | None:
        """The end for node i starting at p nearest `target` (ties: the earlier); None when it
        holds no range the nodes after it leave."""
        good = [q for q in self._ends(i, p) if self.ok[i + 1][q - self.start]]
        return min(good, key=lambda q: (abs(q - target), q)) if good else None


def _water_fill(free: list[NodeCapacity], caps: dict[NodeId, int], rest: int) -> dict[NodeId, int]:
    """Split `rest` layers over `free` by free memory; a node over its cap is fixed at the cap
    and the rest re-split among the others. Each round fixes at least one node."""
    out: dict[NodeId, int] = {}
    todo = list(free)
    while todo:
        split = split_counts(rest - sum(out.values()), [max(c.free_bytes, 1) for c in todo])
        over = [c for c, k in zip(todo, split) if k > caps[c.node]]
        if not over:
            out.update({c.node: k for c, k in zip(todo, split)})
            break
        for c in over:
            out[c.node] = caps[c.node]
        todo = [c for c in todo if c not in over]
    return out
