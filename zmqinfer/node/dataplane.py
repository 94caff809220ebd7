"""A node's data plane: PULL -> checks -> the mlx thread -> the next hop (or the gateway).

    data PULL --Forward--> checks --> mlx thread (queued) --> next node PUSH | gateway results DEALER
    data PULL --Release--> free caches (queued) --> passed on

Every message is read, checked and queued for the mlx thread as soon as it arrives; a second task
sends the results on in arrival order. So the mlx thread finds its next step waiting when it
finishes one, instead of idling while the event loop sends the last result and decodes the next
message. Messages of an epoch other than the node's current one are dropped unread (after a
re-plan, or waking from SIGSTOP, nothing stale is computed or passed on), and so is a result
whose epoch was replaced while it waited in the queue.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import zmq
import zmq.asyncio

from zmqinfer.node import inbound
from zmqinfer.node.options import NodeOptions
from zmqinfer.node.worker import Worker
from zmqinfer.protocol import sockets
from zmqinfer.protocol.codec import encode
from zmqinfer.protocol.inbox import Inbox
from zmqinfer.protocol.keys import GATEWAY, ClusterAuth
from zmqinfer.protocol.wire import (
    Assign,
    Epoch,
    Forward,
    Message,
    Release,
    Sampled,
    SeqId,
    StepFailed,
)

# Data messages queued for the mlx thread at most: enough that it never waits for the event
# loop between steps (every group of the ring, and a prefill per stage), few enough that a
# re-plan has little old work to run through.
QUEUED_STEPS = 8

_Queued = tuple[Forward | Release, "asyncio.Future[Any]"]


class NodeState(Protocol):
    """What the data plane reads of its node (node/process.py), which the control plane sets."""

    opts: NodeOptions
    log: Any
    epoch: Epoch  # the ring this node serves: other epochs are stale
    loaded: bool
    assignment: Assign | None
    auth: ClusterAuth | None  # None: plaintext
    worker: Worker

    async def send_control(self, msg: Message) -> None: ...


class DataPlane:
    def __init__(self, node: NodeState, ctx: zmq.asyncio.Context, route: str, mlx: ThreadPoolExecutor) -> None:
        """Binds the data port: with Curve, only after the node's ZAP handler is bound."""
        self.node, self._ctx, self._route, self._mlx = node, ctx, route, mlx
        opts = node.opts
        self.pull = sockets.data_pull(ctx, f"tcp://{opts.bind}:{opts.data_port}", opts.keys)
        self.out: zmq.asyncio.Socket | None = None
        self.inbox = Inbox("data", node.log)
        self.stale_drops = 0  # data messages of another epoch dropped unread

    def close(self) -> None:
        for s in (self.pull, self.out):
            if s is not None:
                s.close(linger=0)

    def connect_out(self, a: Assign) -> None:
        """Where results go from now on: the next node's PULL, or the gateway's results port."""
        if self.out is not None:
            self.out.close(linger=0)
        keys = self.node.opts.keys
        if a.next_hop is not None:
            curve = keys.toward(a.next_node) if keys is not None and a.next_node is not None else None
            if keys is not None and curve is None:
                raise ValueError("Curve is on but the assignment names no next node to trust")
            self.out = sockets.data_push(self._ctx, a.next_hop, curve)
        else:
            self.out = sockets.results_dealer(
                self._ctx, self._route, f"tcp://{self.node.opts.gateway_host}:{a.result_port}",
                keys.toward(GATEWAY) if keys is not None else None)

    async def run(self) -> None:
        """Read, check and queue each data message for the mlx thread at once; `_data_out` sends
        the results in order. So the mlx thread finds its next step waiting when it finishes one,
        instead of idling while this loop sends the last result and reads the next message."""
        results: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=QUEUED_STEPS)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._data_out(results))
            while True:
                frames = await sockets.recv(self.pull, sockets.DATA_FRAMES)
                if (msg := self._admit(frames)) is None:
                    continue
                loop = asyncio.get_running_loop()
                done = (loop.run_in_executor(self._mlx, self.node.worker.release, msg.seqs, msg.keep, msg.drop)
                        if isinstance(msg, Release) else loop.run_in_executor(self._mlx, self.node.worker.run, msg))
                # Waits when QUEUED_STEPS are queued: then the PULL socket fills, and the
                # previous stage's sends wait in turn (backpressure, never an unbounded queue).
                await results.put((msg, done))

    def _admit(self, frames: list[zmq.Frame]) -> Forward | Release | None:
        """The message, if it is one this node should run now; else None (counted, logged)."""
        if (msg := self.inbox.read(frames)) is None:
            return None
        if not isinstance(msg, (Forward, Release)):
            self.inbox.drop(f"unexpected {msg.KIND}")
            return None
        if msg.epoch != self.node.epoch or not self.node.loaded:
            self.stale_drops += 1
            self.node.log.debug("dropped stale message", kind=msg.KIND, epoch=msg.epoch, current=self.node.epoch)
            return None
        # Only the previous stage's key (the gateway's for the first) may feed or free work;
        # checked after the epoch, so the old ring's stragglers of a re-plan are not counted.
        prev = (self.node.assignment.prev_node or GATEWAY) if self.node.assignment is not None else None
        if self.node.auth is not None and not self.node.auth.admit(frames[0], prev, "data message"):
            return None
        if isinstance(msg, Forward) and self.node.worker.stage is not None and (
                why := inbound.problem(msg, self.node.worker.stage)) is not None:
            self.inbox.drop(why, step=msg.step)  # never let mlx index with it (segfault)
            return None
        return msg

    async def _data_out(self, results: asyncio.Queue[_Queued]) -> None:
        """Each queued message's result, in arrival order, on to the next hop (or the gateway)."""
        while True:
            msg, done = await results.get()
            if isinstance(msg, Release):
                try:
                    await done
                except Exception:  # as for a step: a bug costs these caches, not the node
                    self.node.log.exception("release crashed", seqs=list(msg.seqs))
                a = self.node.assignment
                if msg.epoch == self.node.epoch and a is not None and a.next_hop is not None:
                    await self._send_out(msg, msg.seqs, None)  # the next stages free theirs
                continue
            try:
                out, failures = await done
            except Exception as e:  # a bug must cost this step, not the node and every request on it
                self.node.log.exception("step crashed", step=msg.step)
                seqs = tuple(c.seq for c in msg.chunks)
                await self._step_failed(msg.epoch, msg.step, seqs, f"internal error: {type(e).__name__}: {e}")
                continue
            for seqs, reason in failures:
                self.node.log.warning("chunk failed", step=msg.step, seqs=list(seqs), reason=reason)
                await self._step_failed(msg.epoch, msg.step, seqs, reason)
            if msg.epoch != self.node.epoch:  # re-assigned while it was queued: its ring is gone
                self.stale_drops += 1
                continue
            await self._send_out(out, tuple(c.seq for c in msg.chunks), msg.step)

    async def _step_failed(self, epoch: Epoch, step: int, seqs: tuple[SeqId, ...], reason: str) -> None:
        await self.node.send_control(StepFailed(epoch=epoch, step=step, node=self.node.opts.name, seqs=seqs,
                                            reason=reason))

    async def _send_out(self, msg: Forward | Sampled | Release, seqs: tuple[SeqId, ...],
                        step: int | None) -> None:
        """`step`: the Forward's step, to report a failed send; None for a Release."""
        assert self.out is not None
        try:
            if not await sockets.send(self.out, encode(msg), sockets.NEXT_HOP_SEND_TIMEOUT_S):
                self.node.log.debug("dropped a stale message: re-assigned while sending", step=step)
        except TimeoutError:
            where = self.node.assignment.next_hop if self.node.assignment and self.node.assignment.next_hop else "gateway"
            reason = f"{self.node.opts.name}: could not send to {where} within {sockets.NEXT_HOP_SEND_TIMEOUT_S:.0f}s"
            self.node.log.error("send timed out", to=where, step=step)
            if step is not None:
                await self._step_failed(self.node.epoch, step, seqs, reason)
