"""The ring as the gateway runs it: the one owner of ring state.

    epoch, placement, excluded     which nodes hold which layers, in the epoch they were assigned
    ready / reason                 whether requests may run, and if not, why (shown in /health)
    push                           the PUSH socket to the first node: only `send` writes on it

The scheduler drives it through `wait_ready` and `send` (its `RingPort`); the planner changes it
through `take_down`, `new_epoch`, `bring_up` and `unplaceable`. Nothing else writes these fields.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import zmq.asyncio

from zmqinfer.gateway.errors import RingUnavailable
from zmqinfer.gateway.kvroom import KVRoom
from zmqinfer.gateway.placement import Placement
from zmqinfer.protocol import sockets
from zmqinfer.protocol.codec import encode
from zmqinfer.protocol.keys import CurveKeys
from zmqinfer.protocol.wire import Epoch, Forward, NodeId, Release

# A ring being rebuilt (detection + loading) makes new requests wait this long, not READY_WAIT_S.
REPLAN_READY_WAIT_S = 60.0


class Ring:
    def __init__(self, ctx: zmq.asyncio.Context, where: Callable[[NodeId], str], reason: str,
                 keys: CurveKeys | None = None) -> None:
        self._ctx, self._where = ctx, where  # where(node): "name (address)" for error messages
        self._keys = keys  # Curve: the first node's trusted key is the server key of the PUSH
        self.epoch = Epoch(0)
        self.placement: list[Placement] = []
        self.n_devices = 0  # distinct devices among the stages (planner.py says which are one)
        self.excluded: dict[NodeId, str] = {}  # nodes left out of the current ring, and why
        self.ready = asyncio.Event()
        self.reason = reason
        self.no_capacity = False  # the live nodes cannot hold the model: requests fail at once
        self.rebuilding = False  # a ring existed and is being rebuilt: requests wait for it
        self.closing = False  # the gateway is shutting down: no new requests
        self.kv: KVRoom | None = None  # the KV cache its stages hold (kvroom.py); None: no limit known
        self.rollback = False  # every stage said its caches can drop rejected drafts (speculation)
        self._push: zmq.asyncio.Socket | None = None

    @property
    def kv_tokens(self) -> int | None:
        """The most positions one sequence alone may hold; None: no limit."""
        return self.kv.longest() if self.kv is not None else None

    @property
    def n_stages(self) -> int:
        return len(self.placement)

    # ---- the scheduler's side ---------------------------------------------------------------

    async def wait_ready(self, timeout: float) -> None:
        if self.closing:
            raise RingUnavailable("the gateway is shutting down")
        if self.no_capacity:
            raise RingUnavailable(self.reason)  # no use waiting: only a returning node helps
        if self.rebuilding:
            timeout = max(timeout, REPLAN_READY_WAIT_S)
        try:
            async with asyncio.timeout(timeout):
                await self.ready.wait()
        except TimeoutError:
            raise RingUnavailable(f"the ring is not ready: {self.reason}") from None
        if self.closing:
            raise RingUnavailable("the gateway is shutting down")

    async def send(self, msg: Forward | Release) -> None:
        push = self._push
        if not self.ready.is_set() or push is None or msg.epoch != self.epoch:
            raise RingUnavailable(f"the ring is not ready: {self.reason}")
        try:
            if not await sockets.send(push, encode(msg), sockets.FIRST_HOP_SEND_TIMEOUT_S):
                raise RingUnavailable("the ring was re-planned while this step waited")
        except TimeoutError:
            first = self._where(self.placement[0].node)
            raise RingUnavailable(f"{first} did not accept data within {sockets.FIRST_HOP_SEND_TIMEOUT_S:.0f}s") from None

    # ---- the planner's side -----------------------------------------------------------------

    def take_down(self, reason: str) -> None:
        """Stop serving: requests in flight park (the planner tells the scheduler), new ones wait."""
        self.ready.clear()
        self.reason, self.rebuilding = reason, True

    def new_epoch(self) -> Epoch:
        """A plan that fits was made: the epoch it will be assigned in."""
        self.no_capacity = False
        # Wall-clock milliseconds, so a restarted gateway never reuses an epoch that stale
        # messages from its previous life could still carry.
        self.epoch = Epoch(max(self.epoch + 1, int(time.time() * 1000)))
        return self.epoch

    def unplaceable(self, reason: str) -> None:
        self.reason, self.no_capacity = reason, True

    def bring_up(self, placement: list[Placement], excluded: dict[NodeId, str], first_data: str,
                 n_devices: int, kv: KVRoom | None = None,
                 rollback: bool = False) -> None:
        """Every stage of this epoch has loaded: connect to the first one's data port and serve."""
        curve = self._keys.toward(placement[0].node) if self._keys is not None else None
        old, self._push = self._push, sockets.data_push(self._ctx, first_data, curve)
        if old is not None:
            old.close(linger=0)
        self.placement, self.excluded = placement, dict(excluded)
        self.n_devices, self.kv, self.rollback = n_devices, kv, rollback
        self.ready.set()
        self.reason, self.rebuilding = "", False

    def close(self) -> None:
        if self._push is not None:
            self._push.close(linger=0)
            self._push = None
