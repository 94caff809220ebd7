"""The gateway process: the only writer of ring state, and the API's backend.

    control ROUTER  <- Heartbeat / Loaded / Pong / StepFailed / Bye from every node
                    -> GatewayBeat (every beat) / Assign / Ping
    planner         membership (nodes.toml + mDNS + heartbeats) -> plan by memory -> Assign
    data PUSH       -> node 0: Forward / Release from the scheduler
    results ROUTER  <- Sampled from the last node -> scheduler (or a waiting ring probe)
    aiohttp         the HTTP API (api/) over the scheduler and the cluster view (status.py)

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
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import structlog
import zmq
from aiohttp import web
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from zmqinfer.config import GatewaySpec, NodeSpec
from zmqinfer.gateway.api.auth import ApiGuard
from zmqinfer.gateway.api.http import RingBackend
from zmqinfer.gateway.api.server import make_app
from zmqinfer.gateway.membership import Member, Membership
from zmqinfer.gateway.metrics import Metrics
from zmqinfer.gateway.planner import Planner, Served
from zmqinfer.gateway.ring import Ring
from zmqinfer.gateway.scheduler import Scheduler
from zmqinfer.gateway.status import PING_TIMEOUT_S, ClusterView
from zmqinfer.liveness import HEARTBEAT_INTERVAL_S, Liveness
from zmqinfer.model.resolve import layer_count, model_fingerprint, read_config
from zmqinfer.model.facts import model_info
from zmqinfer.model.shards import model_size
from zmqinfer.protocol import sockets
from zmqinfer.protocol.codec import encode
from zmqinfer.protocol.inbox import Inbox
from zmqinfer.protocol.keys import ClusterAuth, CurveKeys
from zmqinfer.protocol.wire import (
    Bye,
    GatewayBeat,
    Heartbeat,
    Loaded,
    Message,
    NodeId,
    Pong,
    Sampled,
    StepFailed,
)

log = structlog.get_logger()

# SIGTERM: requests in flight get this long to finish; the rest end with a clean error event.
SHUTDOWN_GRACE_S = 20.0
SHUTDOWN_POLL_S = 0.1  # how often shutdown looks whether the last request has finished
LAST_EVENT_S = 0.5  # then the failed ones' handlers get this long to write their error event


class Gateway:
    def __init__(self, spec: GatewaySpec, model: str, model_path: Path, nodes: list[NodeSpec],
                 counts: Sequence[int | None] | None = None, guard: ApiGuard | None = None,
                 on_ready: Callable[[list[Any]], None] | None = None,
                 model_id: str | None = None, discovery: bool = False,
                 interfaces: tuple[str, ...] = (), keys: CurveKeys | None = None) -> None:
        if not nodes and not discovery:
            raise ValueError("no nodes configured: list them as [[node]] entries in nodes.toml "
                             "(or let the gateway find them over mDNS)")
        self.spec, self.model, self.model_path = spec, model, model_path
        self.model_id = model_id or model  # the name clients see in /v1/models
        self.guard = guard or ApiGuard.from_keys({})
        cfg = read_config(model_path)
        self.n_layers = layer_count(cfg)
        self.context_length = int(cfg.get("max_position_embeddings", 4096))
        self.fingerprint = model_fingerprint(model_path)
        self.tokenizer: TokenizerWrapper = load_tokenizer(model_path)
        self.vocab = len(self.tokenizer)  # sampled tokens must be below it
        self.liveness: Liveness[NodeId] = Liveness()
        self.members = Membership(nodes, self.liveness, counts)
        self.discovery, self.interfaces = discovery, interfaces
        self.ctx = sockets.context()
        # Curve: the ZAP handler is bound before any socket, so no handshake goes unchecked.
        self.keys, self.auth = keys, ClusterAuth(self.ctx, keys.directory) if keys else None
        if self.auth is not None:
            self.auth.bind()
        else:
            log.warning("ZeroMQ traffic is neither encrypted nor authenticated: anyone who reaches the "
                        "control and result ports can steer the ring (make a cluster directory with "
                        "`zmqinfer keys init` and pass --keys)")
        self.ring = Ring(self.ctx, lambda n: self.members.members[n].where(), "", keys)
        if self.auth is not None:
            auth = self.auth
            self.members.ad_trusted = lambda d: auth.ad_trusted(d.ad.node_id, d.ad.pubkey)
        self.scheduler = Scheduler(self.ring, set(self.tokenizer.eos_token_ids), prefix_cache=spec.prefix_cache,
                                   speculation=spec.speculation)
        self.control = sockets.control_router(self.ctx, f"tcp://{spec.bind}:{spec.control_port}", keys)
        self.results = sockets.results_router(self.ctx, f"tcp://{spec.bind}:{spec.result_port}", keys)
        self.planner = Planner(self.ring, self.members, self.scheduler, self.send_control,
                               Served(model, self.n_layers, self.fingerprint, spec.result_port),
                               model_size(model_path), discovery=discovery, on_ready=on_ready)
        self.ring.reason = self.planner.waiting_for()
        self._routes: dict[NodeId, bytes] = {}  # Curve: node -> routing id its key spoke from
        self.control_in, self.results_in = Inbox("control", log), Inbox("results", log)
        self.cluster = ClusterView(self.model_id, self.n_layers, self.ring, self.members, self.scheduler,
                                   self.planner, self.guard, self.auth, self.send_control,
                                   lambda: self.metrics.throughput())
        self.cluster.model_info = model_info(model_path)
        self.metrics = Metrics(self.model_id, self.cluster.status, self.context_length)
        self.scheduler.on_queued = self.metrics.on_queued
        # The API's backend: the scheduler generates, the cluster view reports.
        self.backend = RingBackend(self.model_id, self.tokenizer, self.context_length, self.cluster.model_info,
                                   self.scheduler.generate, self.cluster.status, self.cluster.ping)

    # ---- loops ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        runner = web.AppRunner(make_app(self.backend, guard=self.guard, metrics=self.metrics,
                                        aliases=self.spec.aliases),
                               handler_cancellation=True)
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
                         tg.create_task(self._beat()), tg.create_task(self.cluster.measure_hops())]
                if self.auth is not None:
                    tasks.append(tg.create_task(self.auth.run()))
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
            if self.auth is not None:
                self.auth.stop()  # its ZAP socket too: term() waits for every socket of the context
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
                    control_port=self.spec.control_port, role="gateway",
                    pubkey=self.keys.public.decode() if self.keys else None)
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
            await asyncio.sleep(SHUTDOWN_POLL_S)
        if self.scheduler.active:
            self.scheduler.fail_all("the gateway is shutting down")
            await asyncio.sleep(LAST_EVENT_S)

    async def send_control(self, name: NodeId, msg: Message) -> None:
        """Raises zmq.ZMQError (EHOSTUNREACH: not connected) or TimeoutError; never waits long."""
        async with asyncio.timeout(PING_TIMEOUT_S):
            await self.control.send_multipart([self._route(name), *encode(msg)])

    def _route(self, name: NodeId) -> bytes:
        """The routing id to reach `name`: with Curve, the one its key last spoke from."""
        return self._routes.get(name, name.encode())

    async def _beat(self) -> None:
        """GatewayBeat to every node heard from lately: they know we are alive, and which epoch
        runs (a draining node leaves once the ring runs without it)."""
        while True:
            for m in self.members.members.values():
                if self.liveness.alive(m.name):
                    try:  # a full pipe (frozen node) must not delay the others' beats
                        await self.control.send_multipart([self._route(m.name), *encode(GatewayBeat(self.ring.epoch))],
                                                          flags=zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass  # gone or frozen: its own silence is what the planner acts on
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _control_loop(self) -> None:
        while True:
            frames = await sockets.recv(self.control, sockets.ROUTER_CONTROL_FRAMES)
            ident = frames[0].bytes.decode(errors="replace")
            if (msg := self.control_in.read(frames[1:], peer=ident[:64])) is None:
                continue
            if self.auth is not None:
                # Identity is the key, never the routing id (anyone may claim one). The node's
                # route is learnt from its authenticated messages: it is what we send to.
                key = self.auth.peer(frames[1])
                claimed = getattr(msg, "node", None)
                if key is None or (claimed is not None and claimed != key):
                    self.auth.refuse(str(claimed or ident), key, "control message whose key is not the node's own")
                    continue
                name = NodeId(key)
                self._routes[name] = frames[0].bytes
            else:
                name = NodeId(ident)
            if isinstance(msg, Heartbeat):
                peer = str(frames[1].get("Peer-Address"))  # libzmq's metadata: always a string
                if self.members.on_beat(name, msg, peer) is None:
                    self.control_in.drop("heartbeat from a node neither in nodes.toml nor found over mDNS",
                                         node=ident[:64], peer=peer)
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
                self.cluster.on_pong(msg.nonce)
            case StepFailed():
                self.scheduler.on_step_failed(msg)
            case Bye():
                log.info("node leaving", node=m.name, reason=msg.reason, draining=msg.draining)
                self.members.on_bye(m, msg.reason, msg.draining)
            case _:
                log.debug("ignored control message", node=m.name, kind=msg.KIND)

    async def _results_loop(self) -> None:
        while True:
            frames = await sockets.recv(self.results, sockets.ROUTER_RESULT_FRAMES)
            if (msg := self.results_in.read(frames[1:])) is None:
                continue
            if self.auth is not None and getattr(msg, "epoch", None) != self.ring.epoch:
                continue  # an old ring's straggler (or a forgery of one): dropped, no refusal
            last = self.ring.placement[-1].node if self.ring.placement else None
            if self.auth is not None and not self.auth.admit(frames[1], last, "result"):
                continue
            if not isinstance(msg, Sampled):
                self.results_in.drop(f"unexpected {msg.KIND}")
                continue
            if any(s.token >= self.vocab for s in msg.samples):  # nothing could decode it
                self.results_in.drop("a sampled token outside the tokenizer's vocabulary")
                continue
            if self.cluster.on_probe(msg.step):
                continue
            if msg.epoch != self.ring.epoch:
                self.cluster.stale_drops += 1  # an old ring's straggler; counted for /metrics
                continue
            if not self.scheduler.awaiting(msg.step):
                self.results_in.drop("a result for a step not in flight", step=msg.step)
                continue
            self.scheduler.on_sampled(msg)
