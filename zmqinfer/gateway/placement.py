"""Pure ring planning: which node runs which contiguous range of layers, in which order.

No sockets, no clocks: the gateway feeds it the membership it sees and gets a plan back, so the
rules are unit-tested exhaustively and the same inputs always give the same ring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

from zmqinfer.wire import PROTOCOL_VERSION, NodeId

if TYPE_CHECKING:
    from zmqinfer.config import NodeSpec
    from zmqinfer.mdns.adverts import NodeAd
    from zmqinfer.mdns.discovery import Discovered

PROTOCOL = PROTOCOL_VERSION.decode()


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


# ---- placement by free memory -----------------------------------------------------------------

Pin = tuple[int, int] | int | None  # a [start, end) range, a layer count, or free
_GIB = float(1 << 30)


@dataclass(frozen=True)
class ModelSize:
    """What a stage costs in bytes, read from the weight files' headers (`model.model_size`)."""

    n_layers: int
    layer_bytes: int  # one transformer layer's weights (the largest, should they differ)
    embed_bytes: int = 0  # token embedding: held by the first stage, and by the last when tied
    head_bytes: int = 0  # final norm + lm_head (only the norm when tied): the last stage
    tied: bool = False
    shared_bytes: int = 0  # tensors that belong to no layer, embedding or head: every stage
    kv_bytes_per_token: int = 0  # one layer's K+V cache for one token

    def stage_bytes(self, n: int, first: bool, last: bool, kv_tokens: int = 0) -> int:
        """Weights (+ KV reserve) of a stage holding `n` layers, first and/or last."""
        extra = self.shared_bytes + (self.embed_bytes if first else 0)
        if last:
            extra += self.head_bytes + (self.embed_bytes if self.tied and not first else 0)
        return extra + n * (self.layer_bytes + kv_tokens * self.kv_bytes_per_token)


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
        first, last = start == 0, end == self.size.n_layers
        active = list(members)
        for _ in range(len(members) + 1):  # each round drops at least one node or stops
            # The embedding goes to whoever ends up first, the head to whoever ends up last.
            role = {c.node: (first and c is active[0], last and c is active[-1]) for c in active}
            caps = {c.node: self.room(c, *role[c.node]) for c in active}
            free = [c for c in active if c.pinned is None]
            rest = total - sum(c.pinned for c in active if isinstance(c.pinned, int))
            drop = [c for c in free if caps[c.node][0] < 1]
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
        if not active:
            if total == 0:
                return
            best = max(members, key=lambda c: c.free_bytes)
            need = self.need(total, first, last)
            raise PlacementError(
                f"no node can hold even one layer of [{start},{end}): the best, {best.node}, has "
                f"{best.free_bytes} bytes free; holding them all needs {need}: short by "
                f"{need - best.free_bytes} bytes")
        fixed = {c.node: c.pinned for c in active if isinstance(c.pinned, int)}
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
        # Water-filling: split by free memory; a node over its cap is fixed at the cap and the
        # rest re-split among the others. Each round fixes at least one node.
        share = {c.node: 0 for c in free}
        todo = list(free)
        while todo:
            left = rest - sum(fixed.get(c.node, 0) for c in free)
            split = split_counts(left, [max(c.free_bytes, 1) for c in todo])
            over = [c for c, k in zip(todo, split) if k > caps[c.node][0]]
            if not over:
                share.update({c.node: k for c, k in zip(todo, split)})
                break
            for c in over:
                fixed[c.node] = caps[c.node][0]
            todo = [c for c in todo if c not in over]
        cursor = start
        for c in active:
            k = fixed[c.node] if c.node in fixed else share[c.node]
            counts[c.node] = (cursor, cursor + k)
            cursor += k
        assert cursor == end, (cursor, end)


# ---- membership: static nodes + discovered nodes ---------------------------------------------

def refusal(ad: NodeAd, protocol: str = PROTOCOL, fingerprint: str = "") -> str | None:
    """Why the gateway must not use this node, or None. An empty fingerprint on either side
    means "not known yet" (a node learns its model from its assignment) and is not a refusal."""
    if ad.protocol != protocol:
        return f"speaks protocol {ad.protocol!r}, this gateway speaks {protocol!r}"
    if ad.fingerprint and fingerprint and ad.fingerprint != fingerprint:
        return f"serves model {ad.fingerprint}, this gateway serves {fingerprint}"
    return None


@dataclass(frozen=True)
class Candidate:
    """One row of the merged membership table."""

    name: NodeId
    address: str | None  # an IP literal; None: use the address its control connection comes from
    data_port: int
    found_by: Literal["mdns", "static"]  # where `address` (or the node itself) came from
    detail: str  # e.g. "nodes.toml address", "mdns ad", "mini2.local via mdns"
    listed: bool  # named in nodes.toml
    ad: NodeAd | None = None
    refused: str | None = None  # why it may not join; None = may join
    # Every address the source gave, best first (`address` is the first): the gateway uses the
    # first one the node's own heartbeat confirms (membership.Member.address).
    addresses: tuple[str, ...] = ()


def merge_members(static: Sequence[NodeSpec], discovered: Mapping[NodeId, Discovered], *,
                  resolved_hosts: Mapping[str, str] | None = None, protocol: str = PROTOCOL,
                  fingerprint: str = "") -> list[Candidate]:
    """nodes.toml first (file order = ring order), then nodes only mDNS knows, by name.

    Address precedence: the node's own mDNS ad, then its `host` resolved via mDNS
    (`resolved_hosts[host]`), then its static `address`; the static address is the fallback
    for networks that block multicast. Gateways' ads are not members."""
    hosts = resolved_hosts or {}
    out: list[Candidate] = []
    by: Literal["mdns", "static"]
    for spec in static:
        d = discovered.get(spec.name)
        if d is not None:
            addr, by, detail = d.addresses[0], "mdns", "mdns ad"
        elif spec.host and spec.host in hosts:
            addr, by, detail = hosts[spec.host], "mdns", f"{spec.host} via mdns"
        elif spec.address:
            addr, by, detail = spec.address, "static", "nodes.toml address"
        else:
            addr, by = None, "static"
            detail = f"{spec.host} not resolved yet" if spec.host else "address of its control connection"
        ad = d.ad if d is not None else None
        out.append(Candidate(spec.name, addr, ad.data_port if ad else spec.port, by, detail, True,
                             ad, refusal(ad, protocol, fingerprint) if ad else None,
                             d.addresses if d is not None else (addr,) if addr else ()))
    listed = {s.name for s in static}
    for node in sorted(set(discovered) - listed):
        d = discovered[node]
        if d.ad.role != "node":
            continue
        out.append(Candidate(node, d.addresses[0], d.ad.data_port, "mdns", "mdns ad", False, d.ad,
                             refusal(d.ad, protocol, fingerprint), d.addresses))
    return out
