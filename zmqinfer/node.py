"""A node process: PULL -> stage -> PUSH (or DEALER back to the gateway), plus its control loop.

    control DEALER --heartbeat--> gateway         (every HEARTBEAT_INTERVAL_S; doubles as READY)
    control DEALER <--assign----- gateway         load layers [start, end), connect the next hop
    data PULL --Forward--> mlx thread --Forward--> next node | --Sampled--> gateway results
    data PULL --Release--> free caches, pass it on

All mlx work runs on one dedicated thread (mlx streams belong to the thread that made them);
the asyncio loop only moves frames, so heartbeats and pings are answered while a long prefill
computes. Messages of an epoch other than the node's current one are dropped unread.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import psutil
import structlog
import zmq
import zmq.asyncio

from . import sockets
from .wire import (Assign, Bye, Epoch, Forward, Heartbeat, Loaded, Message, NodeId, Ping, Pong,
                   Release, Sampled, StepFailed, WireError, decode, encode)
from .worker import Worker

log = structlog.get_logger()
T = TypeVar("T")

# Paranoid Pirate: beats every 0.5 s and a gateway that misses 3..5 of them declares us dead.
HEARTBEAT_INTERVAL_S = 0.5
CONTROL_SEND_TIMEOUT_S = 2.0  # a control message older than this is no longer worth sending
# How often idle KV caches are swept (stage.IDLE_CACHE_SECONDS says when one is idle).
EXPIRE_EVERY_S = 30.0
# A hop that cannot take a message for this long is treated as down; the step fails loudly
# (StepFailed to the gateway) instead of waiting forever behind a dead peer.
SEND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NodeOptions:
    name: NodeId
    gateway_host: str  # an IP address: never a name
    control_port: int
    data_port: int
    bind: str = "0.0.0.0"
    interfaces: tuple[str, ...] = ()  # IPs to advertise (and browse) on; () = every interface
    advertise: bool = True  # register _zmqinfer._tcp over mDNS
    memory_limit: int | None = None  # bytes this node offers for layers at most (tests, shared hosts)


def device_name() -> str:
    import mlx.core as mx  # only for the device kind; no mlx work happens here

    kind = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return f"{kind} ({platform.system()} {platform.machine()}, {os.cpu_count()} cores)"


class Node:
    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        self.log = log.bind(node=opts.name)
        self.ctx = sockets.context()
        self.control = sockets.control_dealer(
            self.ctx, opts.name, f"tcp://{opts.gateway_host}:{opts.control_port}")
        self.pull = sockets.data_pull(self.ctx, f"tcp://{opts.bind}:{opts.data_port}")
        self.out: zmq.asyncio.Socket | None = None
        self.assignment: Assign | None = None
        self.epoch = Epoch(0)
        self.loaded = False
        self.worker = Worker()
        self._mlx_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self._stopping = asyncio.Event()
        self._device = device_name()

    async def _mlx(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._mlx_thread, fn, *args)

    # ---- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self.log.info("node started", data_port=self.opts.data_port,
                      gateway=f"{self.opts.gateway_host}:{self.opts.control_port}", device=self._device)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._beat()), tg.create_task(self._control_loop()),
                         tg.create_task(self._data_loop()), tg.create_task(self._sweep())]
                await self._stopping.wait()
                for t in tasks:
                    t.cancel()
        finally:
            await self._say_bye()
            self._close()

    def stop(self) -> None:
        self._stopping.set()

    async def _say_bye(self) -> None:
        try:
            await asyncio.wait_for(self._send_control(Bye(self.opts.name, "shutdown")), 0.5)
        except (TimeoutError, zmq.ZMQError):
            self.log.info("gateway did not take the goodbye; it will notice the silence")
        self.log.info("node stopped")

    def _close(self) -> None:
        self._mlx_thread.shutdown(wait=True, cancel_futures=True)
        for s in (self.control, self.pull, self.out):
            if s is not None:
                s.close(linger=0)
        self.ctx.term()

    # ---- control plane ----------------------------------------------------------------------

    async def _send_control(self, msg: Message) -> None:
        """Best effort under a deadline: with no gateway connected the message is dropped (and
        logged); the gateway learns the state again from the next heartbeat."""
        try:
            await asyncio.wait_for(self.control.send_multipart(encode(msg)), CONTROL_SEND_TIMEOUT_S)
        except TimeoutError:
            self.log.warning("gateway not reachable: control message dropped", kind=msg.KIND)

    async def _beat(self) -> None:
        proc = psutil.Process()
        while True:
            vm = psutil.virtual_memory()
            beat = Heartbeat(
                node=self.opts.name, data_port=self.opts.data_port, mem_total=vm.total,
                mem_free=vm.available, device=self._device, pid=os.getpid(), epoch=self.epoch,
                loaded=self.loaded, rss_bytes=proc.memory_info().rss,
                busy_seconds=self.worker.busy_seconds, sequences=self.worker.sequences)
            await self._send_control(beat)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _sweep(self) -> None:
        """Free KV caches whose Release never came. Its own task: it waits for the mlx thread,
        which may be busy for seconds with a long prefill, and beats must never wait for that."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            if expired := await self._mlx(self.worker.expire_idle):
                self.log.warning("expired idle sequences", seqs=expired)

    async def _control_loop(self) -> None:
        while True:
            frames = await self.control.recv_multipart(copy=False)
            try:
                msg = decode(frames)
            except WireError as e:
                self.log.warning("dropped control message", error=str(e))
                continue
            match msg:
                case Assign():
                    await self._assign(msg)
                case Ping():
                    await self._send_control(Pong(msg.nonce, self.opts.name))
                case _:
                    self.log.warning("unexpected control message", kind=msg.KIND)

    async def _assign(self, a: Assign) -> None:
        same = self.assignment is not None and self.loaded and (
            (a.model, a.start, a.end, a.next_hop, a.result_port)
            == (self.assignment.model, self.assignment.start, self.assignment.end,
                self.assignment.next_hop, self.assignment.result_port))
        self.epoch, self.loaded = a.epoch, False  # from now on older epochs are stale
        self.log.info("assigned", epoch=a.epoch, layers=f"[{a.start},{a.end})", model=a.model,
                      next_hop=a.next_hop or "gateway")
        t0 = time.monotonic()
        if same:
            await self._mlx(self.worker.drop_sequences)
        else:
            try:
                await self._mlx(self.worker.load, a.model, a.start, a.end)
            except Exception as e:  # any load failure is reported to the gateway, not fatal here
                self.log.error("load failed", error=str(e))
                await self._send_control(Loaded(a.epoch, self.opts.name, False, f"{type(e).__name__}: {e}",
                                                "", 0, psutil.Process().memory_info().rss, 0.0))
                return
            self._connect_out(a)
        self.assignment, self.loaded = a, True
        rss = psutil.Process().memory_info().rss
        self.log.info("loaded", epoch=a.epoch, shard_bytes=self.worker.shard_bytes, rss_bytes=rss,
                      seconds=round(time.monotonic() - t0, 2))
        await self._send_control(Loaded(a.epoch, self.opts.name, True, "", self.worker.fingerprint,
                                        self.worker.shard_bytes, rss, time.monotonic() - t0))

    def _connect_out(self, a: Assign) -> None:
        if self.out is not None:
            self.out.close(linger=0)
        if a.next_hop is not None:
            self.out = sockets.data_push(self.ctx, a.next_hop)
        else:
            self.out = sockets.results_dealer(
                self.ctx, self.opts.name, f"tcp://{self.opts.gateway_host}:{a.result_port}")

    # ---- data plane -------------------------------------------------------------------------

    async def _data_loop(self) -> None:
        while True:
            frames = await self.pull.recv_multipart(copy=False)
            try:
                msg = decode(frames)
            except WireError as e:
                self.log.warning("dropped data message", error=str(e))
                continue
            if not isinstance(msg, (Forward, Release)):
                self.log.warning("unexpected data message", kind=msg.KIND)
                continue
            if msg.epoch != self.epoch or not self.loaded:
                self.log.debug("dropped stale message", kind=msg.KIND, epoch=msg.epoch, current=self.epoch)
                continue
            if isinstance(msg, Release):
                await self._mlx(self.worker.release, msg.seqs)
                if self.assignment is not None and self.assignment.next_hop is not None:
                    await self._send_out(msg, msg.seqs, -1)
                continue
            try:
                out, failures = await self._mlx(self.worker.run, msg)
            except Exception as e:  # a bug must cost this step, not the node and every request on it
                self.log.exception("step crashed", step=msg.step)
                seqs = tuple(c.seq for c in msg.chunks)
                await self._send_control(StepFailed(msg.epoch, msg.step, self.opts.name, seqs,
                                                    f"internal error: {type(e).__name__}: {e}"))
                continue
            for seqs, reason in failures:
                self.log.warning("chunk failed", step=msg.step, seqs=list(seqs), reason=reason)
                await self._send_control(StepFailed(msg.epoch, msg.step, self.opts.name, seqs, reason))
            await self._send_out(out, tuple(c.seq for c in msg.chunks), msg.step)

    async def _send_out(self, msg: Forward | Sampled | Release, seqs: tuple, step: int) -> None:
        assert self.out is not None
        try:
            await asyncio.wait_for(self.out.send_multipart(encode(msg), copy=False), SEND_TIMEOUT_S)
        except TimeoutError:
            where = self.assignment.next_hop if self.assignment and self.assignment.next_hop else "gateway"
            reason = f"{self.opts.name}: could not send to {where} within {SEND_TIMEOUT_S:.0f}s"
            self.log.error("send timed out", to=where, step=step)
            if step >= 0:
                await self._send_control(StepFailed(self.epoch, step, self.opts.name, seqs, reason))


async def run_node(opts: NodeOptions) -> None:
    await Node(opts).run()
