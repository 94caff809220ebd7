"""The gateway process: the only writer of ring state, and the API's backend.

    control ROUTER  <- Heartbeat / Loaded / Pong / StepFailed / Bye from every node
                    -> GatewayBeat (every beat) / Assign / Ping
    planner         membership (nodes.toml + mDNS + heartbeats) -> plan by memory -> Assign
    data PUSH       -> node 0: Forward / Release from the scheduler
    results ROUTER  <- Sampled from the last node -> scheduler (or a waiting ring probe)
    aiohttp         the OpenAI API (api.py) on top of `Gateway` as its Backend

Failure (DESIGN §4): a ring member that stops beating, restarts or freezes takes the ring down
at once; the scheduler parks every live request, the planner bumps the epoch and assigns the
layers over the nodes still alive, and the parked requests replay on the new ring. A node that
joins (or comes back) or asks to leave gets a planned re-plan: new steps stop, the ring drains,
then the same park / assign / replay. When the live nodes cannot hold the model, every request
gets a 503 naming the shortfall, and the ring comes back by itself when capacity returns.
Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, AsyncGenerator, Callable

import structlog
import zmq
from aiohttp import web
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from zmqinfer import sockets
from zmqinfer.clusterstatus import ClusterPing, ClusterStatus, NodePing
from zmqinfer.config import GatewaySpec, NodeSpec
from zmqinfer.gateway.api import make_app
from zmqinfer.gateway.membership import Member, Membership
from zmqinfer.gateway.planner import Planner, Served
from zmqinfer.gateway.ring import Ring
from zmqinfer.gateway.scheduler import RingUnavailable, Scheduler
from zmqinfer.liveness import HEARTBEAT_INTERVAL_S, Liveness
from zmqinfer.model.resolve import model_fingerprint, read_config
from zmqinfer.model.shards import model_size
from zmqinfer.tensors import tokens_to_wire
from zmqinfer.wire import (
    NO_GROUP,
    Bye,
    Forward,
    GatewayBeat,
    Heartbeat,
    Loaded,
    Message,
    NodeId,
    Ping,
    Pong,
    Sample,
    Sampled,
    SamplingParams,
    StepFailed,
    WireError,
    decode,
    encode,
)

log = structlog.get_logger()

PING_TIMEOUT_S = 1.0
PROBE_TIMEOUT_S = 5.0
# SIGTERM: requests in flight get this long to finish; the rest end with a clean error event.
SHUTDOWN_GRACE_S = 20.0


class Gateway:
    def __init__(self, spec: GatewaySpec, model: str, model_path: Path, nodes: list[NodeSpec],
                 counts: Sequence[int | None] | None = None, api_keys: frozenset[str] = frozenset(),
                 on_ready: Callable[[list[Any]], None] | None = None,
                 model_id: str | None = None, discovery: bool = False,
                 interfaces: tuple[str, ...] = ()) -> None:
        if not nodes and not discovery:
            raise ValueError("no nodes configured: list them as [[node]] entries in nodes.toml "
                             "(or let the gateway find them over mDNS)")
        self.spec, self.model, self.model_path = spec, model, model_path
        self.model_id = model_id or model  # the name clients see in /v1/models
        self.api_keys = api_keys
        cfg = read_config(model_path)
        self.n_layers = int(cfg["num_hidden_layers"])
        self.context_length = int(cfg.get("max_position_embeddings", 4096))
        self.fingerprint = model_fingerprint(model_path)
        self.tokenizer: TokenizerWrapper = load_tokenizer(model_path)
        self.liveness: Liveness[NodeId] = Liveness()
        self.members = Membership(nodes, self.liveness, counts)
        self.discovery, self.interfaces = discovery, interfaces
        self.ctx = sockets.context()
        self.ring = Ring(self.ctx, lambda n: self.members.members[n].where(), "")
        self.scheduler = Scheduler(self.ring, set(self.tokenizer.eos_token_ids))
        self.control = sockets.control_router(self.ctx, f"tcp://{spec.bind}:{spec.control_port}")
        self.results = sockets.results_router(self.ctx, f"tcp://{spec.bind}:{spec.result_port}")
        self.planner = Planner(self.ring, self.members, self.scheduler, self.send_control,
                               Served(model, self.n_layers, self.fingerprint, spec.result_port),
                               model_size(model_path), discovery=discovery, on_ready=on_ready)
        self.ring.reason = self.planner.waiting_for()
        self._nonces = itertools.count(1)
        self._pongs: dict[int, asyncio.Future[float]] = {}
        self._probes: dict[int, asyncio.Future[float]] = {}

    # ---- Backend for the API ----------------------------------------------------------------

    def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int,
                 request_id: str) -> AsyncGenerator[Sample, None]:
        return self.scheduler.generate(prompt, params, max_tokens, request_id)

    def cluster_status(self) -> ClusterStatus:
        ring = self.ring
        ready = ring.ready.is_set()
        nodes = self.members.rows(ring.placement, ring.epoch)
        for row in nodes:
            if row["name"] in ring.excluded:
                row["excluded"] = ring.excluded[NodeId(row["name"])]
        return {"ready": ready, "reason": "" if ready else ring.reason, "model": self.model_id,
                "n_layers": self.n_layers, "epoch": ring.epoch, "active_requests": self.scheduler.active,
                "queued_requests": self.scheduler.queued, "kv_tokens": ring.kv_tokens,
                "replans": self.planner.history[-5:], "nodes": nodes}

    async def cluster_ping(self) -> ClusterPing:
        async def one(name: NodeId) -> NodePing:
            m = self.members.members[name]
            out: NodePing = {"name": name, "address": m.address}
            try:
                out["control_ms"] = round(await self._ping(name), 3)
            except (TimeoutError, zmq.ZMQError):
                out["error"] = f"no answer from {m.where()} within {PING_TIMEOUT_S:.0f}s"
            return out

        nodes = await asyncio.gather(*(one(n) for n in self.members.order))
        result: ClusterPing = {"nodes": list(nodes), "ring_ms": None}
        if not self.ring.ready.is_set():
            result["ring_error"] = f"the ring is not ready: {self.ring.reason}"
            return result
        try:
            result["ring_ms"] = round(await self._probe(), 3)
        except (TimeoutError, RingUnavailable) as e:
            result["ring_error"] = str(e) or f"the probe did not come back within {PROBE_TIMEOUT_S:.0f}s"
        return result

    async def _ping(self, name: NodeId) -> float:
        nonce = next(self._nonces)
        fut = self._pongs[nonce] = asyncio.get_running_loop().create_future()
        try:
            t0 = time.perf_counter()
            await self.send_control(name, Ping(nonce))
            async with asyncio.timeout(PING_TIMEOUT_S):
                await fut
            return (time.perf_counter() - t0) * 1000
        finally:
            self._pongs.pop(nonce, None)

    async def _probe(self) -> float:
        """An empty Forward through every stage and back: the ring's bare round trip."""
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

    # ---- loops ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        runner = web.AppRunner(make_app(self, api_keys=self.api_keys), handler_cancellation=True)
        await runner.setup()
        directory = None
        try:
            await web.TCPSite(runner, self.spec.bind, self.spec.port).start()
            log.info("gateway listening", api=f"http://{self.spec.bind}:{self.spec.port}/v1",
                     control=self.spec.control_port, results=self.spec.result_port)
            if self.discovery:
                directory = await self._start_directory()
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._control_loop()), tg.create_task(self._results_loop()),
                         tg.create_task(self.planner.run(directory)), tg.create_task(self.scheduler.pump()),
                         tg.create_task(self._beat())]
                await stop.wait()
                await self._finish_requests()
                for t in tasks:
                    t.cancel()
        finally:
            if directory is not None:
                await directory.close()
            await runner.cleanup()
            self.ring.close()
            for s in (self.control, self.results):
                s.close(linger=0)
            self.ctx.term()

    async def _start_directory(self) -> Any:
        """mDNS: browse for nodes, resolve nodes.toml `.local` hosts, advertise this gateway.
        Without it the static nodes still work, so a failure is reported, not fatal."""
        from zmqinfer.mdns.adverts import NodeAd
        from zmqinfer.mdns.discovery import DiscoveryError
        from zmqinfer.mdns.presence import GatewayDirectory

        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:54] or "host"
        ad = NodeAd(node_id=NodeId(f"gateway-{host}"), data_port=self.spec.result_port, mem_total=0,
                    mem_free=0, device="gateway", fingerprint=self.fingerprint,
                    control_port=self.spec.control_port, role="gateway")
        directory = GatewayDirectory([n.host for n in self.members.static if n.host], self.interfaces, ad)
        try:
            await directory.start()
        except DiscoveryError as e:
            log.error("mdns discovery is off: only nodes.toml addresses are used", reason=str(e))
            await directory.close()
            return None
        return directory

    async def _finish_requests(self) -> None:
        """Shutdown: no new requests; those in flight get SHUTDOWN_GRACE_S to finish, then the
        rest end with a clean error (their streams get an error event, not a reset)."""
        self.ring.closing = True
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        if self.scheduler.active:
            log.info("finishing requests in flight", requests=self.scheduler.active)
        while self.scheduler.active and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.scheduler.active:
            self.scheduler.fail_all("the gateway is shutting down")
            await asyncio.sleep(0.5)  # let the handlers write their last event

    async def send_control(self, name: NodeId, msg: Message) -> None:
        """Raises zmq.ZMQError (EHOSTUNREACH: not connected) or TimeoutError; never waits long."""
        async with asyncio.timeout(PING_TIMEOUT_S):
            await self.control.send_multipart([name.encode(), *encode(msg)])

    async def _beat(self) -> None:
        """GatewayBeat to every node heard from lately: they know we are alive, and which epoch
        runs (a draining node leaves once the ring runs without it)."""
        while True:
            for m in self.members.members.values():
                if self.liveness.alive(m.name):
                    try:  # a full pipe (frozen node) must not delay the others' beats
                        await self.control.send_multipart([m.name.encode(), *encode(GatewayBeat(self.ring.epoch))],
                                                          flags=zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass  # gone or frozen: its own silence is what the planner acts on
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _control_loop(self) -> None:
        while True:
            frames = await self.control.recv_multipart(copy=False)
            ident = frames[0].bytes.decode(errors="replace")
            try:
                msg = decode(frames[1:])
            except WireError as e:
                log.warning("dropped control message", peer=ident, error=str(e))
                continue
            name = NodeId(ident)
            if isinstance(msg, Heartbeat):
                peer = str(frames[1].get("Peer-Address"))  # libzmq's metadata: always a string
                if self.members.on_beat(name, msg, peer) is None:
                    log.warning("heartbeat from a node neither in nodes.toml nor found over mDNS",
                                node=ident, peer=peer)
                continue
            m = self.members.members.get(name)
            if m is None:
                continue
            self._on_control(m, msg)

    def _on_control(self, m: Member, msg: Message) -> None:
        match msg:
            case Loaded() if msg.epoch == self.ring.epoch:
                self.members.on_loaded(m, msg)
                self.planner.changed.set()
            case Pong():
                if (fut := self._pongs.get(msg.nonce)) and not fut.done():
                    fut.set_result(0.0)
            case StepFailed():
                self.scheduler.on_step_failed(msg)
            case Bye():
                log.info("node leaving", node=m.name, reason=msg.reason, draining=msg.draining)
                self.members.on_bye(m, msg.reason, msg.draining)
            case _:
                log.debug("ignored control message", node=m.name, kind=msg.KIND)

    async def _results_loop(self) -> None:
        while True:
            frames = await self.results.recv_multipart(copy=False)
            try:
                msg = decode(frames[1:])
            except WireError as e:
                log.warning("dropped result message", error=str(e))
                continue
            if not isinstance(msg, Sampled):
                log.warning("unexpected result message", kind=msg.KIND)
                continue
            if (fut := self._probes.get(msg.step)) is not None:
                if not fut.done():
                    fut.set_result(0.0)
                continue
            self.scheduler.on_sampled(msg)
