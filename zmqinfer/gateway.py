"""The gateway process: the only writer of ring state, and the API's backend.

    control ROUTER  <- Heartbeat / Loaded / Pong / StepFailed / Bye from every node
    planner         all configured nodes beating -> epoch+1, plan layers, Assign each, await Loaded
    data PUSH       -> node 0: Forward / Release from the scheduler
    results ROUTER  <- Sampled from the last node -> scheduler (or a waiting ring probe)
    aiohttp         the OpenAI API (api.py) on top of `Gateway` as its Backend

A ring member that stops beating (or restarts: its beat then carries epoch 0) takes the ring
down at once: every live request hears why instead of timing out, and the planner re-plans as
soon as all nodes beat again. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import structlog
import zmq
from aiohttp import web
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from . import sockets
from .api import make_app
from .config import GatewaySpec, NodeSpec
from .model import model_fingerprint
from .node import HEARTBEAT_INTERVAL_S
from .ring import Placement, PlacementError, plan
from .scheduler import RingUnavailable, Scheduler
from .tensors import tokens_to_wire
from .wire import (Assign, Bye, Epoch, Forward, Heartbeat, Loaded, Message, NodeId, Ping, Pong,
                   Release, Sample, Sampled, SamplingParams, StepFailed, WireError, decode, encode)

log = structlog.get_logger()

HEARTBEAT_LIVENESS = 4  # beats missed before a node is dead: 3..5 is reasonable (2 s at 0.5 s)
PLAN_TICK_S = 0.2  # how often the planner looks at membership
LOAD_TIMEOUT_S = 600.0  # a node converting or reading a large model from disk can take minutes
SEND_TIMEOUT_S = 5.0  # node 0 not taking data for this long means it is gone
PING_TIMEOUT_S = 1.0
PROBE_TIMEOUT_S = 5.0


@dataclass
class Member:
    spec: NodeSpec
    peer_address: str | None = None  # where its control connection came from
    beat: Heartbeat | None = None
    last_beat: float = -math.inf
    loaded: Loaded | None = None
    busy_fraction: float = 0.0
    said_bye: bool = False

    @property
    def address(self) -> str | None:
        return self.spec.address or self.peer_address

    def where(self) -> str:
        return f"{self.spec.name} ({self.address or 'address unknown'})"

    def alive(self, now: float) -> bool:
        return not self.said_bye and now - self.last_beat <= HEARTBEAT_LIVENESS * HEARTBEAT_INTERVAL_S


class Gateway:
    def __init__(self, spec: GatewaySpec, model: str, model_path: Path, nodes: list[NodeSpec],
                 counts: list[int | None] | None = None, api_keys: frozenset[str] = frozenset(),
                 on_ready: Callable[[list[Placement]], None] | None = None,
                 model_id: str | None = None) -> None:
        if not nodes:
            raise ValueError("no nodes configured: list them as [[node]] entries in nodes.toml")
        self.spec, self.model, self.model_path = spec, model, model_path
        self.model_id = model_id or model  # the name clients see in /v1/models
        self.members = {n.name: Member(n) for n in nodes}
        self.order = [n.name for n in nodes]
        self.counts = counts if counts is not None else [n.layers for n in nodes]
        self.api_keys = api_keys
        self.on_ready = on_ready
        cfg = json.loads((model_path / "config.json").read_text())
        self.n_layers = int(cfg["num_hidden_layers"])
        self.context_length = int(cfg.get("max_position_embeddings", 4096))
        self.fingerprint = model_fingerprint(model_path)
        self.tokenizer: TokenizerWrapper = load_tokenizer(model_path)
        self.epoch = Epoch(0)
        self.placement: list[Placement] = []
        self.reason = self._describe(list(self.members.values()), time.monotonic())
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()  # a Loaded arrived (the planner waits on it)
        self.scheduler = Scheduler(self, set(self.tokenizer.eos_token_ids))
        self.ctx = sockets.context()
        self.control = sockets.control_router(self.ctx, f"tcp://{spec.bind}:{spec.control_port}")
        self.results = sockets.results_router(self.ctx, f"tcp://{spec.bind}:{spec.result_port}")
        self.push: zmq.asyncio.Socket | None = None
        self._nonces = itertools.count(1)
        self._pongs: dict[int, asyncio.Future[float]] = {}
        self._probes: dict[int, asyncio.Future[float]] = {}

    # ---- the Ring the scheduler drives --------------------------------------------------------

    @property
    def n_stages(self) -> int:
        return len(self.placement)

    async def wait_ready(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise RingUnavailable(f"the ring is not ready: {self.reason}") from None

    async def send(self, msg: Forward | Release) -> None:
        if not self._ready.is_set() or self.push is None or msg.epoch != self.epoch:
            raise RingUnavailable(f"the ring is not ready: {self.reason}")
        try:
            await asyncio.wait_for(self.push.send_multipart(encode(msg), copy=False), SEND_TIMEOUT_S)
        except TimeoutError:
            first = self.members[self.placement[0].node]
            raise RingUnavailable(f"{first.where()} did not accept data within {SEND_TIMEOUT_S:.0f}s") from None

    # ---- Backend for the API ----------------------------------------------------------------

    def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int,
                 request_id: str) -> AsyncIterator[Sample]:
        return self.scheduler.generate(prompt, params, max_tokens, request_id)

    def cluster_status(self) -> dict[str, Any]:
        now = time.monotonic()
        layers = {p.node: [p.start, p.end] for p in self.placement}
        nodes = []
        for name in self.order:
            m = self.members[name]
            b = m.beat
            nodes.append({
                "name": name, "address": m.address,
                "data_port": b.data_port if b else m.spec.port,
                "layers": layers.get(name), "alive": m.alive(now),
                "health": _health(m, now, self.epoch),
                "last_heartbeat_s": None if b is None else round(now - m.last_beat, 2),
                "device": b.device if b else None, "pid": b.pid if b else None,
                "rss_bytes": b.rss_bytes if b else None,
                "shard_bytes": m.loaded.shard_bytes if m.loaded and m.loaded.ok else None,
                "mem_total": b.mem_total if b else None, "mem_free": b.mem_free if b else None,
                "busy_fraction": round(m.busy_fraction, 3), "sequences": b.sequences if b else 0,
            })
        return {"ready": self._ready.is_set(), "reason": "" if self._ready.is_set() else self.reason,
                "model": self.model_id, "n_layers": self.n_layers, "epoch": self.epoch,
                "active_requests": self.scheduler.active, "nodes": nodes}

    async def cluster_ping(self) -> dict[str, Any]:
        async def one(name: NodeId) -> dict[str, Any]:
            m = self.members[name]
            out: dict[str, Any] = {"name": name, "address": m.address}
            try:
                out["control_ms"] = round(await self._ping(name), 3)
            except (TimeoutError, zmq.ZMQError):
                out["error"] = f"no answer from {m.where()} within {PING_TIMEOUT_S:.0f}s"
            return out

        nodes = await asyncio.gather(*(one(n) for n in self.order))
        result: dict[str, Any] = {"nodes": nodes, "ring_ms": None}
        if not self._ready.is_set():
            result["ring_error"] = f"the ring is not ready: {self.reason}"
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
            await self._send_control(name, Ping(nonce))
            await asyncio.wait_for(fut, PING_TIMEOUT_S)
            return (time.perf_counter() - t0) * 1000
        finally:
            self._pongs.pop(nonce, None)

    async def _probe(self) -> float:
        """An empty Forward through every stage and back: the ring's bare round trip."""
        step = self.scheduler.next_step()
        fut = self._probes[step] = asyncio.get_running_loop().create_future()
        try:
            t0 = time.perf_counter()
            await self.send(Forward(self.epoch, step, (), -1, tokens_to_wire([])))
            await asyncio.wait_for(fut, PROBE_TIMEOUT_S)
            return (time.perf_counter() - t0) * 1000
        finally:
            self._probes.pop(step, None)

    # ---- loops ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        runner = web.AppRunner(make_app(self, api_keys=self.api_keys), handler_cancellation=True)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.spec.bind, self.spec.port).start()
            log.info("gateway listening", api=f"http://{self.spec.bind}:{self.spec.port}/v1",
                     control=self.spec.control_port, results=self.spec.result_port)
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._control_loop()), tg.create_task(self._results_loop()),
                         tg.create_task(self._planner()), tg.create_task(self.scheduler.pump())]
                await stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            await runner.cleanup()
            for s in (self.control, self.results, self.push):
                if s is not None:
                    s.close(linger=0)
            self.ctx.term()

    async def _send_control(self, name: NodeId, msg: Message) -> None:
        """Raises zmq.ZMQError (EHOSTUNREACH: not connected) or TimeoutError; never waits long."""
        await asyncio.wait_for(self.control.send_multipart([name.encode(), *encode(msg)]), PING_TIMEOUT_S)

    async def _control_loop(self) -> None:
        while True:
            frames = await self.control.recv_multipart(copy=False)
            ident = frames[0].bytes.decode(errors="replace")
            try:
                msg = decode(frames[1:])
            except WireError as e:
                log.warning("dropped control message", peer=ident, error=str(e))
                continue
            m = self.members.get(NodeId(ident))
            if m is None:
                log.warning("message from a node that is not configured", node=ident, kind=msg.KIND)
                continue
            match msg:
                case Heartbeat():
                    now = time.monotonic()
                    if m.beat is not None and now > m.last_beat and msg.pid == m.beat.pid:
                        dt = now - m.last_beat
                        m.busy_fraction = min(1.0, max(0.0, (msg.busy_seconds - m.beat.busy_seconds) / dt))
                    m.beat, m.last_beat, m.said_bye = msg, now, False
                    m.peer_address = frames[1].get("Peer-Address")
                case Loaded() if msg.epoch == self.epoch:
                    m.loaded = msg
                    if m.beat is not None:  # a beat sent before the Assign may still be the latest
                        m.beat = dataclasses.replace(m.beat, epoch=msg.epoch, loaded=msg.ok)
                        m.last_beat = time.monotonic()
                    self._changed.set()
                case Pong():
                    if (fut := self._pongs.get(msg.nonce)) and not fut.done():
                        fut.set_result(0.0)
                case StepFailed():
                    self.scheduler.on_step_failed(msg)
                case Bye():
                    log.info("node left", node=ident, reason=msg.reason)
                    m.said_bye = True
                case _:
                    log.debug("ignored control message", node=ident, kind=msg.KIND)

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

    async def _planner(self) -> None:
        while True:
            await asyncio.sleep(PLAN_TICK_S)
            now = time.monotonic()
            if self._ready.is_set():
                broken = [self.members[p.node] for p in self.placement
                          if not self.members[p.node].alive(now)
                          or self.members[p.node].beat.epoch != self.epoch]
                if broken:
                    self._take_down(self._describe(broken, now))
                continue
            missing = [m for m in self.members.values() if not m.alive(now)]
            if missing:
                self.reason = self._describe(missing, now)
                continue
            await self._assign_all()

    def _describe(self, members: list[Member], now: float) -> str:
        return "; ".join(f"{m.where()} {_health(m, now, self.epoch)}" for m in members)

    def _take_down(self, reason: str) -> None:
        self._ready.clear()
        self.reason = reason
        log.warning("ring down", epoch=self.epoch, reason=reason)
        self.scheduler.fail_all(f"the ring lost a node mid-request: {reason}")

    async def _assign_all(self) -> None:
        try:
            placement = plan(self.n_layers, self.order, self.counts)
        except PlacementError as e:
            self.reason = f"no placement fits: {e}"
            return
        # Wall-clock milliseconds, so a restarted gateway never reuses an epoch that stale
        # messages from its previous life could still carry.
        self.epoch = Epoch(max(self.epoch + 1, int(time.time() * 1000)))
        epoch = self.epoch
        log.info("assigning", epoch=epoch, layers={p.node: f"[{p.start},{p.end})" for p in placement})
        for m in self.members.values():
            m.loaded = None
        for i, p in enumerate(placement):
            nxt = self.members[placement[i + 1].node] if i + 1 < len(placement) else None
            hop = f"tcp://{nxt.address}:{nxt.beat.data_port}" if nxt is not None else None
            try:
                await self._send_control(p.node, Assign(epoch, self.model, p.start, p.end, self.n_layers,
                                                        hop, self.spec.result_port))
            except (zmq.ZMQError, TimeoutError) as e:
                self.reason = f"cannot reach {self.members[p.node].where()}: {e or 'send timed out'}"
                return
        self.reason = f"nodes are loading their layers (epoch {epoch})"
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            ms = [self.members[p.node] for p in placement]
            failed = [m for m in ms if m.loaded is not None and not m.loaded.ok]
            if failed:
                self.reason = "; ".join(f"{m.where()} could not load its layers: {m.loaded.detail}" for m in failed)
                return
            wrong = [m for m in ms if m.loaded is not None and m.loaded.fingerprint != self.fingerprint]
            if wrong:
                self.reason = "; ".join(f"{m.where()} loaded a different model (fingerprint "
                                        f"{m.loaded.fingerprint}, gateway has {self.fingerprint})" for m in wrong)
                return
            if all(m.loaded is not None for m in ms):
                break
            now = time.monotonic()
            dead = [m for m in ms if not m.alive(now)]
            if dead or now > deadline:
                self.reason = self._describe(dead, now) or f"nodes did not load within {LOAD_TIMEOUT_S:.0f}s"
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), PLAN_TICK_S)
            except TimeoutError:
                pass
        first = self.members[placement[0].node]
        if self.push is not None:
            self.push.close(linger=0)
        self.push = sockets.data_push(self.ctx, f"tcp://{first.address}:{first.beat.data_port}")
        self.placement = placement
        self._ready.set()
        self.reason = ""
        log.info("ring ready", epoch=epoch, layers={p.node: f"[{p.start},{p.end})" for p in placement})
        if self.on_ready is not None:
            self.on_ready(placement)


def _health(m: Member, now: float, epoch: Epoch) -> str:
    if m.beat is None:
        return "has not registered (no heartbeat yet)"
    if m.said_bye:
        return "left (said bye)"
    if not m.alive(now):
        return f"stopped sending heartbeats {now - m.last_beat:.1f}s ago"
    if m.beat.epoch != epoch:
        return "restarted (serves no epoch)" if m.beat.epoch == 0 else f"serves epoch {m.beat.epoch}"
    return "ok" if m.beat.loaded else "loading"
