"""A node process: PULL -> stage -> PUSH (or DEALER back to the gateway), plus its control loop.

    control DEALER --heartbeat--> gateway         (every HEARTBEAT_INTERVAL_S; doubles as READY)
    control DEALER <--assign----- gateway         load layers [start, end), connect the next hop
    data PULL --Forward--> mlx thread --Forward--> next node | --Sampled--> gateway results
    data PULL --Release--> free caches, pass it on

All mlx work runs on one dedicated thread (mlx streams belong to the thread that made them);
the asyncio loop only moves frames, so heartbeats and pings are answered while a long prefill
computes. The data plane (dataplane.py) reads the epoch, the assignment and the loaded shard
that this control plane sets.

SIGTERM drains: the node tells the gateway it is leaving (Bye, draining), keeps serving while the
gateway re-plans the ring without it, and exits once the gateway's beats carry an epoch it is
not part of (or DRAIN_TIMEOUT_S passes). A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import psutil
import structlog
import zmq
import zmq.asyncio

from zmqinfer.liveness import HEARTBEAT_INTERVAL_S, Liveness
from zmqinfer.node.accelerator import GpuSampler
from zmqinfer.node.awake import SleepGuard
from zmqinfer.node.beat import KV_HEADROOM_BYTES, Report, device_name
from zmqinfer.node.dataplane import DataPlane
from zmqinfer.node.loading import cap_kv, load_shard
from zmqinfer.node.memory import pin_mmap_threshold
from zmqinfer.node.options import NodeOptions
from zmqinfer.node.simulated import DEVICE_PREFIX
from zmqinfer.node.worker import Worker
from zmqinfer.protocol import sockets
from zmqinfer.protocol.codec import encode
from zmqinfer.protocol.inbox import Inbox
from zmqinfer.protocol.keys import GATEWAY, ClusterAuth
from zmqinfer.protocol.wire import (
    Assign,
    Bye,
    Epoch,
    GatewayBeat,
    Loaded,
    Message,
    Ping,
    Pong,
)

log = structlog.get_logger()
T = TypeVar("T")

CONTROL_SEND_TIMEOUT_S = 2.0  # a control message older than this is no longer worth sending
# How often idle KV caches are swept (stage.IDLE_CACHE_SECONDS says when one is idle).
EXPIRE_EVERY_S = 30.0
# SIGTERM: how long the node keeps serving while the gateway re-plans without it.
DRAIN_TIMEOUT_S = 30.0
# The goodbye on the way out: a gateway that does not take it in this long notices the silence.
BYE_TIMEOUT_S = 0.5
# A gateway silent this long is gone, not restarting: free the KV caches of its requests (the
# shard stays loaded: a gateway that comes back re-plans onto it without reloading).
GATEWAY_GONE_S = 30.0


def gateway_gone(silent_s: float, sequences: int) -> bool:
    """Free a silent gateway's caches: any time after GATEWAY_GONE_S, not only inside a window
    the beat loop (whose sends wait up to CONTROL_SEND_TIMEOUT_S with no gateway) skips over."""
    return silent_s > GATEWAY_GONE_S and sequences > 0


class Node:
    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        self.log = log.bind(node=opts.name)
        self.ctx = sockets.context()
        keys = opts.keys
        # Curve: the ZAP handler is bound before the data port, so no handshake goes unchecked.
        self.auth = ClusterAuth(self.ctx, keys.directory) if keys is not None else None
        if self.auth is not None:
            self.auth.bind()
        else:
            self.log.warning("ZeroMQ traffic is neither encrypted nor authenticated: anyone who reaches "
                             "the data port can feed or free this node's work (see `zmqinfer keys`)")
        # With Curve the gateway knows us by key, so our routing ids are unique per process: a
        # peer claiming our name cannot take our connection over (ROUTER_HANDOVER).
        self.route = opts.name if keys is None else f"{opts.name}#{secrets.token_hex(6)}"
        self.control = sockets.control_dealer(
            self.ctx, self.route, f"tcp://{opts.gateway_host}:{opts.control_port}",
            keys.toward(GATEWAY) if keys is not None else None)
        self.assignment: Assign | None = None
        self.epoch = Epoch(0)
        self.loaded = False
        self.worker = Worker()
        self._mlx_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self.data = DataPlane(self, self.ctx, self.route, self._mlx_thread)  # binds the data port
        self._stopping = asyncio.Event()
        self._draining = False
        self._drain_deadline = 0.0
        # A simulated node is a device of its own, whichever machine it runs on (planner.py).
        self._device = (f"{DEVICE_PREFIX} {opts.name} ({opts.simulate.text()} ms)" if opts.simulate is not None
                        else device_name())
        self.gateway = Liveness[str]()  # the gateway's beats
        self.gateway_epoch = Epoch(0)  # the epoch the gateway's ring runs now
        self.presence: Any = None  # presence.NodePresence while advertising
        self.error: str | None = None  # why the node stopped on its own (exit status 1)
        self.awake = SleepGuard(not opts.allow_sleep, self.log)  # a Mac that sleeps leaves the ring
        self.control_in = Inbox("control", self.log)
        self.gpu = GpuSampler()  # accelerator utilisation / memory for the heartbeat
        self.report = Report(opts, self._device, self.worker, self.data, self.gpu, self.auth)

    async def _mlx(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._mlx_thread, fn, *args)

    # ---- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        self.log.info("node started", data_port=self.opts.data_port,
                      gateway=f"{self.opts.gateway_host}:{self.opts.control_port}", device=self._device)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._beat()), tg.create_task(self._control_loop()),
                         tg.create_task(self.data.run()), tg.create_task(self._sweep()),
                         tg.create_task(self.gpu.run())]
                if self.auth is not None:
                    tasks.append(tg.create_task(self.auth.run()))
                if self.opts.advertise:  # registering takes seconds: beats must not wait for it
                    tasks.append(tg.create_task(self._advertise()))
                await self._stopping.wait()
                for t in tasks:
                    t.cancel()
        finally:
            await self._say_bye()
            await self.awake.close()
            if self.presence is not None:
                await self.presence.close()
            self._close()

    def stop(self) -> None:
        self._stopping.set()

    def _on_sigterm(self) -> None:
        if self._draining or not self.loaded:
            self._stopping.set()  # a second SIGTERM, or nothing to hand over: go now
            return
        self._draining = True  # the beat loop tells the gateway, and watches for the end
        self._drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
        self.log.info("draining: the gateway re-plans without this node, then it stops",
                      timeout_s=DRAIN_TIMEOUT_S)

    async def _say_bye(self) -> None:
        try:
            async with asyncio.timeout(BYE_TIMEOUT_S):
                await self.send_control(Bye(self.opts.name, "shutdown"))
        except (TimeoutError, zmq.ZMQError):
            self.log.info("gateway did not take the goodbye; it will notice the silence")
        self.log.info("node stopped")

    async def _advertise(self) -> None:
        from zmqinfer.mdns.discovery import DuplicateNodeId
        from zmqinfer.mdns.presence import NodePresence

        presence = NodePresence(self.opts.interfaces)
        try:
            await presence.start(self.report.ad(psutil.virtual_memory()))
        except DuplicateNodeId as e:  # two nodes with one id would corrupt each other's ring
            self.error = str(e)
            self.log.error("another node already uses this id: stopping", error=str(e))
            self._stopping.set()
            return
        self.presence = presence  # from now on every beat updates the ad

    def _close(self) -> None:
        self._mlx_thread.shutdown(wait=True, cancel_futures=True)
        self.control.close(linger=0)
        self.data.close()
        if self.auth is not None:
            self.auth.stop()  # its ZAP socket too: term() waits for every socket of the context
        self.ctx.term()

    # ---- control plane ----------------------------------------------------------------------

    async def send_control(self, msg: Message) -> None:
        """Best effort under a deadline: with no gateway connected the message is dropped (and
        logged); the gateway learns the state again from the next heartbeat."""
        try:
            async with asyncio.timeout(CONTROL_SEND_TIMEOUT_S):
                await self.control.send_multipart(encode(msg))
        except TimeoutError:
            self.log.warning("gateway not reachable: control message dropped", kind=msg.KIND)

    async def _beat(self) -> None:
        while True:
            beat, vm = self.report.heartbeat(self.epoch, self.loaded)
            await self.send_control(beat)
            if self._draining:  # every beat: a Bye lost on the way must not strand the drain
                await self.send_control(Bye(self.opts.name, "draining (SIGTERM)", draining=True))
            if self.presence is not None:
                await self.presence.update(self.report.ad(vm))
            await self._watch_gateway()
            self.awake.update(self.worker.sequences > 0)  # never waits for the backend
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _watch_gateway(self) -> None:
        """Node-side liveness of the gateway: drain's end, and freeing a dead gateway's caches."""
        silent = self.gateway.silent_for("gateway")
        if self._draining:
            # Done once the ring runs an epoch without us, or there is no gateway to hand over to.
            done = self.gateway_epoch != self.epoch or not self.gateway.alive("gateway")
            if done or time.monotonic() > self._drain_deadline:
                self.log.info("drained" if done else "drain timed out: stopping anyway",
                              ring_epoch=self.gateway_epoch, gateway_alive=self.gateway.alive("gateway"))
                self._stopping.set()
        if gateway_gone(silent, self.worker.sequences):
            self.log.warning("gateway silent: freeing its requests' caches", silent_s=round(silent, 1))
            await self._mlx(self.worker.drop_sequences)

    async def _sweep(self) -> None:
        """Free KV caches whose Release never came. Its own task: it waits for the mlx thread,
        which may be busy for seconds with a long prefill, and beats must never wait for that."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            if expired := await self._mlx(self.worker.expire_idle):
                self.log.warning("expired idle sequences", seqs=expired)

    async def _control_loop(self) -> None:
        while True:
            frames = await sockets.recv(self.control, sockets.CONTROL_FRAMES)
            if (msg := self.control_in.read(frames)) is None:
                continue
            match msg:
                case GatewayBeat():
                    if not self.gateway.alive("gateway"):
                        self.log.info("gateway heard", epoch=msg.epoch)
                    self.gateway.heard("gateway")
                    self.gateway_epoch = msg.epoch
                case Assign():
                    if self._draining:
                        continue  # leaving: the gateway's next plan will not count on us
                    self.gateway.heard("gateway")
                    self.gateway_epoch = msg.epoch
                    await self._assign(msg)
                case Ping():
                    await self.send_control(Pong(msg.nonce, self.opts.name))
                case _:
                    self.control_in.drop(f"unexpected {msg.KIND}")

    async def _assign(self, a: Assign) -> None:
        same = self.assignment is not None and self.loaded and (
            (a.model, a.start, a.end, a.next_hop, a.next_node, a.result_port)
            == (self.assignment.model, self.assignment.start, self.assignment.end,
                self.assignment.next_hop, self.assignment.next_node, self.assignment.result_port))
        self.epoch, self.loaded = a.epoch, False  # from now on older epochs are stale
        self.log.info("assigned", epoch=a.epoch, layers=f"[{a.start},{a.end})", model=a.model,
                      next_hop=a.next_hop or "gateway")
        t0 = time.monotonic()
        if same:
            await self._mlx(self.worker.drop_sequences)
        else:
            try:
                await self._mlx(self._load, a)
                self.data.connect_out(a)  # Curve: fails when the next node's key is not trusted here
            except Exception as e:  # any load failure is reported to the gateway, not fatal here
                self.log.error("load failed", error=str(e))
                await self.send_control(Loaded(
                    epoch=a.epoch, node=self.opts.name, ok=False, detail=f"{type(e).__name__}: {e}",
                    fingerprint="", shard_bytes=0, rss_bytes=psutil.Process().memory_info().rss,
                    load_seconds=0.0))
                return
        self.assignment, self.loaded = a, True
        rss = psutil.Process().memory_info().rss
        limited = self.opts.memory_limit is not None  # a limit to keep: freed buffers go back
        assert self.worker.stage is not None
        cap = await self._mlx(cap_kv, self.worker.stage, self.report.kv_budget(rss), KV_HEADROOM_BYTES if limited else None)
        self.log.info("kv cache capped", tokens=cap)
        self.log.info("loaded", epoch=a.epoch, shard_bytes=self.worker.shard_bytes, rss_bytes=rss,
                      seconds=round(time.monotonic() - t0, 2))
        await self.send_control(Loaded(
            epoch=a.epoch, node=self.opts.name, ok=True, detail="", fingerprint=self.worker.fingerprint,
            shard_bytes=self.worker.shard_bytes, rss_bytes=rss, load_seconds=time.monotonic() - t0,
            kv=self.worker.stage.kv, rollback=self.worker.stage.rollback))


    def _load(self, a: Assign) -> None:
        """On the mlx thread: the old shard goes first (memory is the limit), then the new one."""
        self.worker.unload()
        self.worker.install(load_shard(a.model, a.start, a.end, self.opts.simulate))


async def run_node(opts: NodeOptions) -> int:
    """The node's exit status: 0 after a requested stop, 1 when it had to stop by itself."""
    if opts.memory_limit is not None:  # a limit to keep: freed KV caches leave (node/heap.py)
        pin_mmap_threshold()
    node = Node(opts)
    await node.run()
    return 1 if node.error else 0
