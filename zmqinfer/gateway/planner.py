"""The gateway's planner: when to (re)build the ring, over which nodes, and how.

    every PLAN_TICK_S:
      ring up, a member dead / frozen / restarted  -> take down now (requests park), re-plan
      ring up, a node joins or asks to leave       -> pause new steps, drain, take down, re-plan
      ring down                                    -> plan_by_memory over the live nodes
                                                      -> epoch+1, Assign, await Loaded, resume

A re-plan bumps the epoch, so whatever the old ring still carries (a frozen node waking up, a
step in a dead node's socket) is dropped unread by everyone. Survivors load the layers the new
plan gives them. Requests parked by the scheduler replay on the new ring (scheduler.py).

A node that cannot load its layers (missing shard files, another model) is left out at once,
with its reason in /cluster/status, and the ring is re-planned over the others without waiting;
it is given layers again only once its heartbeat shows something new (membership.py). A Loaded
lost on the way is not waited for: a heartbeat saying "loaded, this epoch" counts too. Every
plan reserves KV cache and runtime headroom beside the weights (placement.py), and the ring's KV
budget goes to the scheduler's admission.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import structlog
import zmq

from zmqinfer.clusterstatus import Replan
from zmqinfer.gateway.membership import Member, Membership
from zmqinfer.gateway.placement import (
    KV_RESERVE_TOKENS,
    RUNTIME_HEADROOM_BYTES,
    MemoryPlan,
    ModelSize,
    NodeCapacity,
    Placement,
    PlacementError,
    plan_by_memory,
)
from zmqinfer.gateway.kvroom import ring_room
from zmqinfer.gateway.ring import Ring
from zmqinfer.liveness import DEAD_AFTER_S
from zmqinfer.protocol.wire import Assign, Epoch, Message, NodeId

if TYPE_CHECKING:
    from zmqinfer.mdns.presence import GatewayDirectory

log = structlog.get_logger()

PLAN_TICK_S = 0.2  # how often the planner looks at membership
LOAD_TIMEOUT_S = 600.0  # a node converting or reading a large model from disk can take minutes
# The first ring waits for every node it expects, but not forever: after this long it starts
# with the live ones (a node that comes later joins through a planned re-plan).
STARTUP_GRACE_S = 10.0
# With mDNS on, nodes are found one by one; the first plan waits until the set has been stable
# this long, so it is made once rather than once per node found.
SETTLE_S = 1.0
# A node must have been alive this long before it is given layers again: a flapping node
# (a laptop waking and sleeping) must not trigger a re-plan per flap.
REJOIN_SETTLE_S = 2 * DEAD_AFTER_S
# A planned re-plan waits at most this long for the steps in flight to come back.
DRAIN_WAIT_S = 10.0
DRAIN_POLL_S = 0.005  # how often a planned re-plan looks whether the ring has drained (a step is ms)
HISTORY = 20  # re-plans kept for /cluster/status


class Requests(Protocol):
    """What the planner needs from the scheduler: stop, park, replay or fail the requests."""

    @property
    def in_flight(self) -> int: ...
    def pause(self) -> None: ...
    def park(self) -> int: ...
    def resume(self) -> int: ...
    def fail_all(self, reason: str) -> None: ...


@dataclass(frozen=True)
class Served:
    """What every Assign carries about the model this gateway serves."""

    model: str  # the name nodes resolve (embedded default, directory or hub id)
    n_layers: int
    fingerprint: str
    result_port: int  # where the last stage sends its samples


SendControl = Callable[[NodeId, Message], Awaitable[None]]


class Planner:
    def __init__(self, ring: Ring, members: Membership, requests: Requests, send_control: SendControl,
                 served: Served, size: ModelSize, *, discovery: bool = False,
                 on_ready: Callable[[list[Placement]], None] | None = None) -> None:
        self.ring, self.members, self.requests = ring, members, requests
        self.send_control, self.served, self.size = send_control, served, size
        self.discovery, self.on_ready = discovery, on_ready
        self.changed = asyncio.Event()  # a Loaded arrived
        self.history: list[Replan] = []
        self.replans = 0  # rings built after the first: totals for /metrics (history is cut)
        self.replayed = 0  # requests resumed on those rings
        self._planned_over: set[NodeId] = set()  # live nodes the current plan considered
        self._down: dict[str, Any] | None = None  # the take-down being recovered from
        self._started = time.monotonic()
        self._usable: tuple[NodeId, ...] = ()
        self._usable_since = time.monotonic()
        self._warned_drain = False

    def waiting_for(self) -> str:
        """Why there is no ring yet: /health names the missing nodes from the start."""
        members = self.members
        return (members.describe(members.expected(), self.ring.epoch)
                or "no node has registered (none in nodes.toml, none found over mDNS)")

    async def run(self, directory: GatewayDirectory | None = None) -> None:
        """`directory`: mDNS, or None for nodes.toml only."""
        while True:
            await asyncio.sleep(PLAN_TICK_S)
            if directory is not None:
                self.members.merge(directory.discovered, directory.resolved_hosts, self.served.fingerprint)
            await self.tick()

    async def tick(self) -> None:
        members = self.members
        usable = members.usable()
        names = tuple(m.name for m in usable)
        if names != self._usable:
            self._usable, self._usable_since = names, time.monotonic()
        self._planned_over &= set(names)  # a node that died and returns is a joiner again
        if self.ring.ready.is_set():
            if not await self._needs_replan():
                return
            usable = members.usable()
        if not usable:
            self.ring.reason = self.waiting_for()
            return
        if not self._may_plan_first(usable):
            return
        await self._assign(usable)

    async def _needs_replan(self) -> bool:
        """Take the ring down when it must change (urgently for a lost member, after draining
        for a joiner or leaver): True when it is down now and a plan should follow."""
        members, live = self.members, self.members.live
        ring = [members.members[p.node] for p in self.ring.placement]
        broken = [m for m in ring if not live.alive(m.name) or m.beat is None
                  or m.beat.epoch != self.ring.epoch or (m.left is not None and not m.draining)]
        if broken:
            self._take_down(members.describe(broken, self.ring.epoch), broken)
            return True
        leaving = [m for m in ring if m.draining]
        joiners = [m for m in members.usable()
                   if m.name not in self._planned_over and live.alive_for(m.name) >= REJOIN_SETTLE_S]
        if not leaving and not joiners:
            return False
        try:  # never give up a working ring for one that cannot be built
            self._plan(members.capacity(members.usable()))
        except PlacementError as e:
            if not self._warned_drain:
                log.error("cannot re-plan without the leaving node(s); the ring stays as it is",
                          leaving=[m.name for m in leaving], reason=str(e))
                self._warned_drain = True
            return False
        self._warned_drain = False
        why = "; ".join([f"{m.where()} is leaving ({m.left})" for m in leaving]
                        + [f"{m.where()} joins" for m in joiners])
        log.info("planned re-plan: draining the ring", reason=why)
        self.requests.pause()
        deadline = time.monotonic() + DRAIN_WAIT_S
        while self.requests.in_flight and time.monotonic() < deadline and self.ring.ready.is_set():
            await asyncio.sleep(DRAIN_POLL_S)
        if self.ring.ready.is_set():
            self._take_down(why, [])
        return True

    def _may_plan_first(self, usable: list[Member]) -> bool:
        """Before the first ring: wait for every expected node (up to STARTUP_GRACE_S), and for
        mDNS to settle."""
        if self.ring.epoch != 0:
            return True
        now = time.monotonic()
        if self.discovery and now - self._usable_since < SETTLE_S:
            return False
        missing = [m for m in self.members.expected() if m not in usable]
        if missing and now - self._started < STARTUP_GRACE_S:
            self.ring.reason = self.members.describe(missing, self.ring.epoch)
            return False
        return True

    def _take_down(self, reason: str, dead: list[Member]) -> None:
        self.ring.take_down(reason)
        parked = self.requests.park()
        silent = {m.name: round(self.members.live.silent_for(m.name), 3) for m in dead}
        self._down = {"at": time.monotonic(), "reason": reason, "parked": parked,
                      "silent_s": silent, "old_epoch": self.ring.epoch}
        log.warning("ring down: re-planning", epoch=self.ring.epoch, reason=reason, parked=parked,
                    silent_s=silent or None)

    def _plan(self, capacity: list[NodeCapacity]) -> MemoryPlan:
        """Layers by memory, each stage keeping room for KV and runtime beside its weights."""
        return plan_by_memory(capacity, self.size, kv_tokens=KV_RESERVE_TOKENS,
                              overhead_bytes=RUNTIME_HEADROOM_BYTES)

    async def _assign(self, usable: list[Member]) -> None:
        members = self.members
        capacity = members.capacity(usable)
        try:
            plan = self._plan(capacity)
        except PlacementError as e:
            reason = f"the live nodes cannot hold the model: {e}"
            if reason != self.ring.reason:
                log.error("no placement fits", reason=reason, nodes=[m.name for m in usable])
            self.ring.unplaceable(reason)
            self.requests.fail_all(reason)
            return
        placement = plan.placements
        epoch = self.ring.new_epoch()
        layers = {p.node: f"[{p.start},{p.end})" for p in placement}
        log.info("assigning", epoch=epoch, layers=layers, excluded=plan.excluded or None)
        ring = [members.members[p.node] for p in placement]
        for m in ring:
            m.loaded = None
        for i, p in enumerate(placement):
            nxt = ring[i + 1] if i + 1 < len(ring) else None
            hop = f"tcp://{nxt.address}:{nxt.beat.data_port}" if nxt is not None and nxt.beat else None
            try:
                await self.send_control(p.node, Assign(
                    epoch=epoch, model=self.served.model, start=p.start, end=p.end,
                    n_layers=self.served.n_layers, next_hop=hop, result_port=self.served.result_port,
                    next_node=nxt.name if nxt is not None else None,
                    prev_node=ring[i - 1].name if i > 0 else None))
            except (zmq.ZMQError, TimeoutError) as e:
                self.ring.reason = f"cannot reach {ring[i].where()}: {e or 'send timed out'}"
                return
        self.ring.reason = f"nodes are loading their layers (epoch {epoch})"
        if not await self._await_loaded(ring, epoch):
            return
        first = ring[0]
        assert first.beat is not None  # usable members have beaten
        excluded = plan.excluded | members.load_refusals()
        self.ring.bring_up(placement, excluded, f"tcp://{first.address}:{first.beat.data_port}",
                           n_devices=len({_device(m) for m in ring}),
                           kv=ring_room(placement, capacity, self.size,
                                        {m.name: m.loaded.kv if m.loaded else None for m in ring}),
                           # A Loaded lost (its beat stood in) leaves speculation off: unknown.
                           rollback=all(m.loaded is not None and m.loaded.rollback for m in ring))
        self._planned_over = {m.name for m in usable}
        resumed = self.requests.resume()
        self._record(placement, resumed)
        log.info("ring ready", epoch=epoch, layers=layers, resumed=resumed)
        if self.on_ready is not None:
            self.on_ready(placement)

    async def _await_loaded(self, ring: list[Member], epoch: Epoch) -> bool:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            failed = {m.name: f"could not load its layers: {m.loaded.detail}"
                      for m in ring if m.loaded is not None and not m.loaded.ok}
            failed |= {m.name: f"loaded a different model (fingerprint {m.loaded.fingerprint}, "
                               f"gateway has {self.served.fingerprint})"
                       for m in ring if m.loaded is not None and m.loaded.ok
                       and m.loaded.fingerprint != self.served.fingerprint}
            if failed:
                # Planning the same ring again would fail the same way: leave these nodes out
                # until they show something new, and re-plan over the others at once.
                for m in ring:
                    if m.name in failed:
                        self.members.refuse_load(m, failed[m.name])
                self.ring.reason = "; ".join(f"{self.members.members[n].where()} {why}" for n, why in failed.items())
                log.error("ring not built: re-planning without the node(s) that failed",
                          reason=self.ring.reason)
                return False
            # A Loaded lost to a control-plane blip must not stall the plan: a beat that says
            # "loaded, this epoch" is the same news (only the fingerprint check needs Loaded).
            if all(m.loaded is not None or (m.beat is not None and m.beat.epoch == epoch and m.beat.loaded)
                   for m in ring):
                return True
            dead = [m for m in ring if not self.members.alive(m)]
            if dead or time.monotonic() > deadline:
                self.ring.reason = (self.members.describe(dead, self.ring.epoch)
                                    or f"nodes did not load within {LOAD_TIMEOUT_S:.0f}s")
                return False
            self.changed.clear()
            try:
                async with asyncio.timeout(PLAN_TICK_S):
                    await self.changed.wait()
            except TimeoutError:
                pass

    def _record(self, placement: list[Placement], resumed: int) -> None:
        if self.history or self._down is not None:
            self.replans += 1
        self.replayed += resumed
        entry: Replan = {"epoch": self.ring.epoch, "at": time.time(),
                         "layers": {p.node: [p.start, p.end] for p in placement},
                         "resumed_requests": resumed}
        if self._down is not None:
            entry["reason"], entry["silent_s"] = self._down["reason"], self._down["silent_s"]
            entry["down_s"] = round(time.monotonic() - self._down["at"], 3)
            self._down = None
        self.history = (self.history + [entry])[-HISTORY:]


def _device(m: Member) -> tuple[str | None, str]:
    """Which device a stage runs on: stages at one address with the same device description
    share one machine's cores. A pinned node names its cores, a simulated one itself."""
    return m.address, m.beat.device if m.beat is not None else ""
