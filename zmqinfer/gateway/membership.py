"""The gateway's membership table: every node it knows, how it was found, and whether it is alive.

    nodes.toml (static)  ─┐
    mDNS ads (discovery) ─┼─ merge_members ─> Member rows, in ring order
    heartbeats           ─┘   (Liveness: alive / since when)

A node may join when nodes.toml lists it or mDNS found it (and did not refuse it: protocol or
model mismatch), and only at an address its own heartbeat lists (`Member.unconfirmed`). `usable()` is what a plan may use right now; `capacity()` is how much memory
each usable node offers for layers. Pure bookkeeping on the gateway's loop: no sockets.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from zmqinfer.clusterstatus import NodeStatus, NodeUsage
from zmqinfer.config import NodeSpec
from zmqinfer.gateway.placement import NodeCapacity, Placement
from zmqinfer.liveness import Liveness
from zmqinfer.mdns.adverts import PROTOCOL, NodeAd, refusal
from zmqinfer.mdns.discovery import Discovered
from zmqinfer.protocol.wire import Epoch, Heartbeat, Loaded, NodeId

# Free memory moves by megabytes every beat; planning on raw numbers would move a layer back and
# forth between equal machines. Rounded down to this, equal machines get equal shares.
MEMORY_QUANTUM = 16 << 20
# A refusal reason lists the node's own addresses; a machine has a handful. More is noise in
# `status` (and the list comes from the node: bound what we repeat of it).
MAX_ADDRESSES_SHOWN = 8


def _is_ipv4(value: str) -> bool:
    try:
        return bool(ipaddress.IPv4Address(value))
    except ValueError:
        return False


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


@dataclass
class Member:
    name: NodeId
    spec: NodeSpec | None  # None: known only from mDNS
    found: Candidate | None = None  # the latest merge row: address, found_by, refused
    peer_address: str | None = None  # where its control connection comes from
    beat: Heartbeat | None = None
    loaded: Loaded | None = None  # its answer to the current epoch's Assign
    shard_bytes: int = 0  # the shard it holds now (its memory comes back when it is re-planned)
    busy_fraction: float = 0.0
    tokens_per_s: float = 0.0  # token rows computed per second between its last two beats
    step_s: float | None = None  # mean compute time per Forward between its last two beats
    hop_s: float | None = None  # control-plane round trip (gateway/metrics.py measures it)
    left: str | None = None  # why it said Bye; None while it is a member in good standing
    draining: bool = False
    # Why its last load failed, and the beat it failed under: it gets layers again only once
    # a beat shows something new (another process, port, memory or device).
    load_failed: tuple[str, tuple[object, ...]] | None = None

    @property
    def claimed(self) -> tuple[str, ...]:
        """Where discovery or nodes.toml says it is, best first; else its control peer."""
        if self.found is not None and self.found.addresses:
            return self.found.addresses
        if self.found is not None and self.found.address:
            return (self.found.address,)
        static = (self.spec.address if self.spec else None) or self.peer_address
        return (static,) if static else ()

    @property
    def address(self) -> str | None:
        """The data address the ring uses: the first claimed one the node's own heartbeat lists
        (before its first beat, or when none matches, the first claimed one, for display)."""
        claimed = self.claimed
        own = self.beat.addresses if self.beat is not None else ()
        return next((a for a in claimed if a in own), claimed[0] if claimed else None)

    @property
    def found_by(self) -> Literal["mdns", "static"]:
        return self.found.found_by if self.found is not None else "static"

    @property
    def refused(self) -> str | None:
        if self.found is not None and self.found.refused is not None:
            return self.found.refused
        return self.unconfirmed()

    def unconfirmed(self) -> str | None:
        """Why its data address cannot be trusted, or None. Machines cloned from one image (one
        host name) have made mDNS answer with another machine's address: only an address the
        node itself reports is wired into the ring, never a neighbour's by mistake."""
        if self.beat is None:
            return None  # nothing to compare yet (and not usable without a beat anyway)
        claimed = self.claimed
        if not claimed:
            return "no data address known (not advertised, not in nodes.toml)"
        if any(a in self.beat.addresses for a in claimed):
            return None
        own = [a for a in self.beat.addresses[:MAX_ADDRESSES_SHOWN] if _is_ipv4(a)]
        source = self.found.detail if self.found is not None else "its control connection"
        return (f"cannot confirm its data address: {source} says {', '.join(claimed)}, "
                f"the node reports {', '.join(own) or 'no address'}")

    def where(self) -> str:
        return f"{self.name} ({self.address or 'address unknown'})"


def _news(beat: Heartbeat) -> tuple[object, ...]:
    """What in a beat would make a failed load worth retrying: the process, its port, its
    memory, its device. Free memory and counters move every beat and say nothing new."""
    return (beat.pid, beat.data_port, beat.mem_total, beat.device)


class Membership:
    def __init__(self, static: Sequence[NodeSpec], liveness: Liveness[NodeId],
                 counts: Sequence[int | None] | None = None) -> None:
        self.static = list(static)
        self.live = liveness
        self.members: dict[NodeId, Member] = {n.name: Member(n.name, n) for n in static}
        self.order: list[NodeId] = [n.name for n in static]
        # Pins: nodes.toml `layers` (a count or a range), overridden by --layers counts.
        self.pins: dict[NodeId, tuple[int, int] | int | None] = {
            n.name: (c if c is not None else n.pin)
            for n, c in zip(static, counts if counts is not None else [None] * len(static))}
        # Curve: an mDNS ad is only a hint; one for a name whose advertised key is not the trusted
        # key of that name is dropped before it can move the node's address (a rogue's ad would
        # otherwise redirect hidden states). Set by the gateway; returns whether the ad may count.
        self.ad_trusted: Callable[[Discovered], bool] | None = None
        self.merge({}, {})

    def merge(self, discovered: Mapping[NodeId, Discovered], resolved_hosts: Mapping[str, str],
              fingerprint: str = "") -> None:
        """Fold in what mDNS knows now. Nodes it no longer sees keep their row (a heartbeat is
        what makes them alive); their address stays the last one known."""
        if self.ad_trusted is not None:
            discovered = {n: d for n, d in discovered.items() if d.ad.role != "node" or self.ad_trusted(d)}
        for c in merge_members(self.static, discovered, resolved_hosts=resolved_hosts,
                               fingerprint=fingerprint):
            m = self.members.get(c.name)
            if m is None:
                m = self.members[c.name] = Member(c.name, None)
                self.order.append(c.name)
            if c.address is not None or m.found is None:
                m.found = c

    # ---- control-plane events -------------------------------------------------------------

    def on_beat(self, name: NodeId, beat: Heartbeat, peer_address: str | None) -> Member | None:
        """A heartbeat; None when the node is neither listed nor advertised (ignored)."""
        m = self.members.get(name)
        if m is None:
            return None
        alive = self.live.alive(name)
        if m.beat is not None and alive and beat.pid == m.beat.pid:
            dt = self.live.silent_for(name)
            if dt > 0:
                busy = beat.busy_seconds - m.beat.busy_seconds
                m.busy_fraction = min(1.0, max(0.0, busy / dt))
                m.tokens_per_s = max(0.0, (beat.tokens - m.beat.tokens) / dt)
                steps = beat.steps - m.beat.steps
                m.step_s = busy / steps if steps > 0 else None
        if m.beat is not None and beat.pid != m.beat.pid:
            m.shard_bytes = 0  # a new process holds nothing yet
        if beat.epoch == 0:
            m.shard_bytes = 0
        if m.left is not None and not m.draining:
            m.left = None  # it came back after saying goodbye
        if m.load_failed is not None and _news(beat) != m.load_failed[1]:
            m.load_failed = None  # restarted or changed: worth another try
        m.beat, m.peer_address = beat, peer_address or m.peer_address
        self.live.heard(name)
        return m

    def on_loaded(self, m: Member, msg: Loaded) -> None:
        m.loaded = msg
        if m.beat is not None:  # a beat sent before the Assign may still be the latest one
            m.beat = dataclasses.replace(m.beat, epoch=msg.epoch, loaded=msg.ok)
        m.shard_bytes = msg.shard_bytes if msg.ok else 0
        self.live.heard(m.name)  # loading can starve beats on a busy machine; Loaded is a beat too

    def refuse_load(self, m: Member, reason: str) -> None:
        """Its load failed: leave it out of plans until its beat shows something new."""
        if m.beat is not None:
            m.load_failed = (reason, _news(m.beat))

    def load_refusals(self) -> dict[NodeId, str]:
        """Alive nodes left out because their load failed, with the reason (for status)."""
        return {m.name: f"{m.load_failed[0]} (tried again when it restarts)"
                for m in self.members.values() if m.load_failed is not None and self.alive(m)}

    def on_bye(self, m: Member, reason: str, draining: bool) -> None:
        m.left, m.draining = reason, draining
        if not draining:
            self.live.forget(m.name)

    # ---- what a plan may use --------------------------------------------------------------

    def alive(self, m: Member) -> bool:
        return m.left is None and self.live.alive(m.name) and m.beat is not None

    def usable(self) -> list[Member]:
        """Alive, not refused, not leaving, not failing to load: in ring order."""
        return [m for n in self.order if self.alive(m := self.members[n]) and m.refused is None
                and m.load_failed is None]

    def expected(self) -> list[Member]:
        """What a first plan waits for: every listed node and every unrefused advertised one."""
        return [m for n in self.order if (m := self.members[n]).refused is None
                and (m.spec is not None or m.found is not None)]

    def capacity(self, members: Sequence[Member]) -> list[NodeCapacity]:
        """Free memory per node for placement: what it has free plus the shard it would drop.
        Pins hold only while every pinned node is in the plan (a ring short of a pinned node
        cannot keep the others' counts and still cover the model)."""
        names = {m.name for m in members}
        pinned = [n for n, p in self.pins.items() if p is not None]
        keep = all(n in names for n in pinned)
        out = []
        for m in members:
            assert m.beat is not None
            free = m.beat.mem_free + m.shard_bytes
            out.append(NodeCapacity(m.name, free - free % MEMORY_QUANTUM,
                                    self.pins.get(m.name) if keep else None))
        return out

    # ---- reporting ------------------------------------------------------------------------

    def health(self, m: Member, epoch: Epoch) -> str:
        if m.refused is not None:
            return f"refused: {m.refused}"
        if m.beat is None:
            return "has not registered (no heartbeat yet)"
        if m.draining and self.live.alive(m.name):
            return f"draining ({m.left})"
        if m.left is not None:
            return f"left ({m.left})"
        if not self.live.alive(m.name):
            return f"stopped sending heartbeats {self.live.silent_for(m.name):.1f}s ago"
        if m.load_failed is not None:
            return f"left out: {m.load_failed[0]}"
        if m.beat.epoch != epoch:
            return "restarted (serves no epoch)" if m.beat.epoch == 0 else f"serves epoch {m.beat.epoch}"
        return "ok" if m.beat.loaded else "loading"

    def describe(self, members: Sequence[Member], epoch: Epoch) -> str:
        return "; ".join(f"{m.where()} {self.health(m, epoch)}" for m in members)

    def rows(self, placement: Sequence[Placement], epoch: Epoch) -> list[NodeStatus]:
        layers = {p.node: [p.start, p.end] for p in placement}
        out: list[NodeStatus] = []
        for name in self.order:
            m = self.members[name]
            b = m.beat
            silent = self.live.silent_for(name)
            out.append({
                "name": name, "address": m.address, "found_by": m.found_by,
                "detail": m.found.detail if m.found else "nodes.toml", "refused": m.refused,
                "data_port": b.data_port if b else (m.spec.port if m.spec else None),
                "layers": layers.get(name), "alive": self.alive(m),
                "health": self.health(m, epoch),
                "last_heartbeat_s": None if b is None or silent == float("inf") else round(silent, 2),
                "device": b.device if b else None, "pid": b.pid if b else None,
                "rss_bytes": b.rss_bytes if b else None,
                "shard_bytes": m.shard_bytes or None,
                "mem_total": b.mem_total if b else None, "mem_free": b.mem_free if b else None,
                "busy_fraction": round(m.busy_fraction, 3), "busy_seconds": b.busy_seconds if b else 0.0,
                "sequences": b.sequences if b else 0,
                **_usage(m),
            })
        return out



def _usage(m: Member) -> NodeUsage:
    """The heartbeat's usage fields of a /cluster/status row (NodeStatus)."""
    b = m.beat
    return {
        "layers_held": b.layers if b else 0, "kv_bytes": b.kv_bytes if b else 0,
        "tokens_per_s": round(m.tokens_per_s, 2),
        "step_s": None if m.step_s is None else round(m.step_s, 6),
        "busy_seconds": round(b.busy_seconds, 6) if b else 0.0, "steps": b.steps if b else 0,
        "tokens": b.tokens if b else 0,
        "gpu_utilization": b.gpu_utilization if b else None,
        "accel_memory_bytes": b.accel_memory_bytes if b else None,
        "hop_latency_s": None if m.hop_s is None else round(m.hop_s, 6),
        "stale_drops": b.stale_drops if b else 0,
    }
