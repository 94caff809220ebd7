"""What the gateway says about its cluster: `/cluster/status` (one typed snapshot of the ring,
its nodes, its requests and its security), `/cluster/ping` (a control round trip to every node,
then an empty Forward through every stage and back), and the hop latency `/metrics` shows.

Reads only: ring state is the ring's and the planner's, requests are the scheduler's. Pongs and
probe results arrive on the gateway's control and result loops, which hand them here
(`on_pong`, `on_probe`); every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

import zmq

from zmqinfer.clusterstatus import (
    ClusterPing,
    ClusterStatus,
    ModelInfo,
    NodePing,
    SecurityStatus,
    Throughput,
)
from zmqinfer.gateway.admission import groups
from zmqinfer.gateway.api.auth import ApiGuard
from zmqinfer.gateway.errors import RingUnavailable
from zmqinfer.gateway.membership import Membership
from zmqinfer.gateway.planner import Planner
from zmqinfer.gateway.ring import Ring
from zmqinfer.gateway.scheduler import Scheduler
from zmqinfer.protocol.codec import tokens_to_wire
from zmqinfer.protocol.keys import ClusterAuth
from zmqinfer.protocol.wire import NO_GROUP, Forward, Message, NodeId, Ping

PING_TIMEOUT_S = 1.0  # a control round trip on a LAN takes milliseconds
PROBE_TIMEOUT_S = 5.0  # an empty Forward through every stage, queued behind real steps
# Control-plane round trips to each node this often (hop latency): a ping costs microseconds.
HOP_PING_EVERY_S = 2.0


class ClusterView:
    def __init__(self, model_id: str, n_layers: int, ring: Ring, members: Membership,
                 scheduler: Scheduler, planner: Planner, guard: ApiGuard, auth: ClusterAuth | None,
                 send_control: Callable[[NodeId, Message], Awaitable[None]],
                 throughput: Callable[[], Throughput]) -> None:
        self.model_id, self.n_layers = model_id, n_layers
        self.ring, self.members, self.scheduler, self.planner = ring, members, scheduler, planner
        self.guard, self.auth = guard, auth
        self._send_control, self._throughput = send_control, throughput
        self.model_info: ModelInfo | None = None  # set by the gateway from the model's files
        self._nonces = itertools.count(1)
        self._pongs: dict[int, asyncio.Future[float]] = {}
        self._probes: dict[int, asyncio.Future[float]] = {}
        self.stale_drops = 0  # results of an older epoch, dropped (the result loop counts them)

    def status(self) -> ClusterStatus:
        ring = self.ring
        ready = ring.ready.is_set()
        nodes = self.members.rows(ring.placement, ring.epoch)
        for row in nodes:
            if row["name"] in ring.excluded:
                row["excluded"] = ring.excluded[NodeId(row["name"])]
            member = self.members.members.get(NodeId(row["name"]))
            if member is not None and member.beat is not None:
                row["refused_by_node"] = member.beat.refused
        security: SecurityStatus = (self.auth.status() if self.auth is not None else  # type: ignore[assignment]
                                    {"curve": False, "trusted": [], "refused_handshakes": 0,
                                     "refused_messages": 0, "refused_peers": {}})
        security["api"] = self.guard.describe()
        s, planner = self.scheduler, self.planner
        return {"ready": ready, "reason": "" if ready else ring.reason, "model": self.model_id,
                "n_layers": self.n_layers, "epoch": ring.epoch, "active_requests": s.active,
                "running_requests": s.running, "waiting_requests": s.waiting,
                "ring": {"replans": planner.replans, "replayed_requests": planner.replayed,
                         "micro_batches_in_flight": s.in_flight, "stale_epoch_drops": self.stale_drops},
                "throughput": self._throughput(),
                "devices": ring.n_devices, "groups": groups(ring.n_devices) if ready else 0,
                "decode_steps": s.decode_steps, "queued_requests": s.queued, "kv_tokens": ring.kv_tokens,
                "replans": planner.history[-5:], "nodes": nodes, "security": security,
                "prefix_cache": s.prefixes.status(planner.size.kv_bytes_per_token * self.n_layers),
                "speculation": s.spec.status(),
                **({"model_info": self.model_info} if self.model_info is not None else {})}  # type: ignore[typeddict-item]

    async def ping(self) -> ClusterPing:
        async def one(name: NodeId) -> NodePing:
            m = self.members.members[name]
            out: NodePing = {"name": name, "address": m.address}
            try:
                out["control_ms"] = round(await self.ping_node(name), 3)
            except (TimeoutError, zmq.ZMQError):
                out["error"] = f"no answer from {m.where()} within {PING_TIMEOUT_S:.0f}s"
            return out

        nodes = await asyncio.gather(*(one(n) for n in self.members.order))
        result: ClusterPing = {"nodes": list(nodes), "ring_ms": None}
        if not self.ring.ready.is_set():
            result["ring_error"] = f"the ring is not ready: {self.ring.reason}"
            return result
        try:
            result["ring_ms"] = round(await self.probe(), 3)
        except (TimeoutError, RingUnavailable) as e:
            result["ring_error"] = str(e) or f"the probe did not come back within {PROBE_TIMEOUT_S:.0f}s"
        return result

    async def ping_node(self, name: NodeId) -> float:
        """A control round trip to `name`, in milliseconds (TimeoutError past PING_TIMEOUT_S)."""
        nonce = next(self._nonces)
        fut = self._pongs[nonce] = asyncio.get_running_loop().create_future()
        try:
            t0 = time.perf_counter()
            await self._send_control(name, Ping(nonce))
            async with asyncio.timeout(PING_TIMEOUT_S):
                await fut
            return (time.perf_counter() - t0) * 1000
        finally:
            self._pongs.pop(nonce, None)

    async def probe(self) -> float:
        """An empty Forward through every stage and back: the ring's bare round trip (ms)."""
        step = self.scheduler.next_step()
        fut = self._probes[step] = asyncio.get_running_loop().create_future()
        try:
            t0 = time.perf_counter()
            await self.ring.send(Forward(epoch=self.ring.epoch, step=step, chunks=(), group=NO_GROUP,
                                         tokens=tokens_to_wire([])))
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await fut
            return (time.perf_counter() - t0) * 1000
        finally:
            self._probes.pop(step, None)

    def on_pong(self, nonce: int) -> None:
        if (fut := self._pongs.get(nonce)) and not fut.done():
            fut.set_result(0.0)

    def on_probe(self, step: int) -> bool:
        """Whether `step` is a probe's (then it is answered here, not by the scheduler)."""
        if (fut := self._probes.get(step)) is None:
            return False
        if not fut.done():
            fut.set_result(0.0)
        return True

    async def measure_hops(self, every: float = HOP_PING_EVERY_S) -> None:
        """Hop latency: a control round trip to every live node. Owned by the gateway's
        TaskGroup; a node that does not answer has no hop latency."""
        while True:
            for name in list(self.members.order):
                m = self.members.members[name]
                if not self.members.alive(m):
                    m.hop_s = None
                    continue
                try:
                    m.hop_s = await self.ping_node(name) / 1000
                except (TimeoutError, zmq.ZMQError):
                    m.hop_s = None
            await asyncio.sleep(every)
