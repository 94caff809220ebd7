"""Pure ring planning: which node runs which contiguous range of layers, in which order.

No sockets, no clocks: the gateway feeds it the membership it sees and gets a plan back, so the
rules are unit-tested exhaustively and the same inputs always give the same ring.

KV room at plan time: each stage's free memory - its weights - RUNTIME_HEADROOM_BYTES is its KV
room, in tokens of KV; the ring holds the least of them (`ring_kv_tokens`), which admission
(admission.py) then shares out per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from zmqinfer.model.size import KV_COPY_FACTOR, ModelSize
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
    layer). Pinned counts and ranges are kept exactly; unpinned nodes fill the gaps between
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
        ctx.check(c, end - start, start == 0, end == n)
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

    @property
    def per_layer(self) -> int:
        return self.size.layer_bytes + self.kv_tokens * self.size.kv_bytes_per_token

    def need(self, layers: int, first: bool, last: bool) -> int:
        return self.overhead + self.size.stage_bytes(layers, first, last, self.kv_tokens)

    def room(self, c: NodeCapacity, first: bool, last: bool) -> tuple[int, int]:
        """(layers it can hold, bytes left over after them); layers is -1 if even the fixed
        part (runtime, embedding, head) does not fit."""
        usable = c.free_bytes - self.need(0, first, last)
        return (usable // self.per_layer, usable % self.per_layer) if usable >= 0 else (-1, usable)

    def check(self, c: NodeCapacity, layers: int, first: bool, last: bool) -> None:
        need = self.need(layers, first, last)
        if need > c.free_bytes:
            raise PlacementError(
                f"{c.node} is pinned to {layers} layer(s) needing {need} bytes "
                f"({need / _GIB:.2f} GiB) but has {c.free_bytes} free: short by "
                f"{need - c.free_bytes} bytes")

    def fill(self, start: int, end: int, members: list[NodeCapacity],
             counts: dict[NodeId, tuple[int, int]], excluded: dict[NodeId, str]) -> None:
        """Place layers [start, end) on `members` (unpinned or count-pinned), in order."""
        total = end - start
        if total > 0 and not members:
            raise PlacementError(f"layers [{start},{end}) are held by no node: pinned ranges leave "
                                 "a gap with no unpinned node between them in ring order")
        active = self._sit_out(start, end, members, excluded)
        if not active:
            if total == 0:
                return
            best = max(members, key=lambda c: c.free_bytes)
            need = self.need(total, start == 0, end == self.size.n_layers)
            raise PlacementError(
                f"no node can hold even one layer of [{start},{end}): the best, {best.node}, has "
                f"{best.free_bytes} bytes free; holding them all needs {need}: short by "
                f"{need - best.free_bytes} bytes")
        role = self._roles(start, end, active)
        caps = {c.node: self.room(c, *role[c.node]) for c in active}
        free = [c for c in active if c.pinned is None]
        fixed = {c.node: c.pinned for c in active if isinstance(c.pinned, int)}
        rest = total - sum(fixed.values())
        for c in active:
            if c.node in fixed:
                self.check(c, fixed[c.node], *role[c.node])
        if rest < 0 or (not free and rest != 0):
            raise PlacementError(f"pinned layer counts {sorted(fixed.values())} add up to "
                                 f"{sum(fixed.values())}, but layers [{start},{end}) are {total}")
        room = sum(caps[c.node][0] for c in free)
        if room < rest:
            # The least memory that makes it fit, added to one node: the one whose spare bytes
            # (less than a layer) come closest to the next layer.
            best = max(free, key=lambda c: caps[c.node][1])
            short = (rest - room) * self.per_layer - caps[best.node][1]
            raise PlacementError(
                f"the model does not fit: {rest} layer(s) of [{start},{end}) for "
                f"{', '.join(c.node for c in free)}, which have room for {room}; short by {short} "
                f"bytes ({short / _GIB:.2f} GiB): {best.node} would need that much more free "
                f"memory, or add a node (a layer needs {self.per_layer} bytes)")
        fixed.update(_water_fill(free, {n: cap for n, (cap, _) in caps.items()}, rest))
        cursor = start
        for c in active:
            counts[c.node] = (cursor, cursor + fixed[c.node])
            cursor += fixed[c.node]
        assert cursor == end, (cursor, end)

    def _roles(self, start: int, end: int, active: list[NodeCapacity]) -> dict[NodeId, tuple[bool, bool]]:
        """(first, last) per node: the embedding goes to whoever ends up first, the head to
        whoever ends up last."""
        first, last = start == 0, end == self.size.n_layers
        return {c.node: (first and c is active[0], last and c is active[-1]) for c in active}

    def _sit_out(self, start: int, end: int, members: list[NodeCapacity],
                 excluded: dict[NodeId, str]) -> list[NodeCapacity]:
        """The members that take part: drop (and say why) unpinned nodes that cannot hold one
        layer, and the smallest ones while there are more nodes than layers."""
        total, active = end - start, list(members)
        for _ in range(len(members) + 1):  # each round drops at least one node or stops
            role = self._roles(start, end, active)
            free = [c for c in active if c.pinned is None]
            rest = total - sum(c.pinned for c in active if isinstance(c.pinned, int))
            drop = [c for c in free if self.room(c, *role[c.node])[0] < 1]
            for c in drop:
                excluded[c.node] = (f"cannot hold one layer: {c.free_bytes} bytes free, one layer "
                                    f"there needs {self.need(1, *role[c.node])}")
            if not drop and len(free) > max(rest, 0):
                # More nodes than layers: the one with the least memory sits this ring out,
                # preferably not one at an end, whose embedding/head would move to a neighbour.
                inner = [c for c in free if not any(role[c.node])] or free
                c = min(reversed(inner), key=lambda x: x.free_bytes)
                drop = [c]
                excluded[c.node] = f"not needed: {total} layer(s) [{start},{end}) for {len(free)} nodes"
            if not drop:
                break
            active = [c for c in active if c not in drop]
        return active


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


def ring_kv_tokens(placements: Sequence[Placement], capacity: Sequence[NodeCapacity],
                   size: ModelSize) -> int | None:
    """Tokens of KV cache (per sequence position, summed over sequences) the whole ring can
    hold: the least over its stages. None when the model's KV size is unknown (no limit)."""
    if size.kv_bytes_per_token <= 0 or not placements:
        return None
    free = {c.node: c.free_bytes for c in capacity}
    n = size.n_layers
    tokens = []
    for p in placements:
        weights = size.stage_bytes(p.n_layers, p.start == 0, p.end == n)
        room = free.get(p.node, 0) - weights - RUNTIME_HEADROOM_BYTES
        tokens.append(max(0, room) // (KV_COPY_FACTOR * size.kv_bytes_per_token * p.n_layers))
    return min(tokens)
