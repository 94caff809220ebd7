"""The planner over a real Ring, Membership and Scheduler, with the nodes' control-plane answers
played by the test: a node that cannot load is left out at once (not retried over the same plan)
and tried again only when it restarts; a lost Loaded does not stall the plan when the node's
beat says it loaded; every plan keeps KV and runtime room beside the weights, and the ring's KV
budget reaches the scheduler."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest
import zmq.asyncio

from tests.unit.gateway.test_membership import Clock, beat, spec
from zmqinfer.gateway.membership import MEMORY_QUANTUM, Membership
from zmqinfer.gateway.placement import (
    KV_RESERVE_TOKENS,
    RUNTIME_HEADROOM_BYTES,
    ModelSize,
)
from zmqinfer.gateway.planner import Planner, Served
from zmqinfer.gateway.ring import Ring
from zmqinfer.gateway.scheduler import Scheduler
from zmqinfer.liveness import Liveness
from zmqinfer.model.size import KV_COPY_FACTOR
from zmqinfer.protocol.wire import Assign, KVProfile, Loaded, Message, NodeId

FP = "cd" * 8
MIB = 1 << 20
SIZE = ModelSize(n_layers=6, layer_bytes=10 * MIB, kv_bytes_per_token=1024)
PLAN_DEADLINE_S = 10.0  # each expected plan comes within this, or the test fails

Answer = Callable[[NodeId, Assign], "Message | None"]


def loaded(node: NodeId, a: Assign, *, ok: bool = True, detail: str = "", fp: str = FP) -> Loaded:
    return Loaded(a.epoch, node, ok, detail, fp if ok else "", 10 * MIB, 80 * MIB, 0.1)


class Cluster:
    """The gateway's side for real; each node's answer to an Assign is `answer(node, assign)`."""

    def __init__(self, names: list[str], free: int = 1 << 30) -> None:
        self.clock = Clock()
        self.members = Membership([spec(n, "127.0.0.1") for n in names], Liveness(2.0, self.clock))
        self.ctx = zmq.asyncio.Context()
        self.ring = Ring(self.ctx, lambda n: n, "")
        self.sched = Scheduler(self.ring, {0})
        self.assigns: list[tuple[NodeId, Assign]] = []
        self.answer: Answer = lambda n, a: loaded(n, a)
        self.planner = Planner(self.ring, self.members, self.sched, self.send,
                               Served("m", SIZE.n_layers, FP, 9999), SIZE)
        self.pids = {NodeId(n): 100 for n in names}
        self.free = free
        self.beat_all()

    def beat_all(self) -> None:
        for n, pid in self.pids.items():
            m = self.members.members[n]
            epoch, ok = (m.beat.epoch, m.beat.loaded) if m.beat else (0, False)
            self.members.on_beat(n, beat(n, pid=pid, epoch=epoch, loaded=ok, free=self.free,
                                         addresses=("127.0.0.1",)), "127.0.0.1")

    async def send(self, node: NodeId, msg: Message) -> None:
        assert isinstance(msg, Assign)
        self.assigns.append((node, msg))
        answer = self.answer(node, msg)
        if isinstance(answer, Loaded):
            asyncio.get_running_loop().call_soon(self._deliver, node, answer)

    def _deliver(self, node: NodeId, msg: Loaded) -> None:  # what gateway/process.py does
        if msg.epoch == self.ring.epoch:
            self.members.on_loaded(self.members.members[node], msg)
            self.planner.changed.set()

    async def until(self, what: Callable[[], bool], seconds: float = PLAN_DEADLINE_S) -> None:
        async with asyncio.timeout(seconds):
            while not what():
                self.clock.now += 0.2
                self.beat_all()
                await self.planner.tick()
                await asyncio.sleep(0)  # a turn for the deadline (and deliveries) even if tick never waits

    def serving(self) -> list[str]:
        return [p.node for p in self.ring.placement] if self.ring.ready.is_set() else []


@pytest.fixture
async def cluster() -> AsyncIterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(*a: object, **kw: object) -> Cluster:
        made.append(Cluster(*a, **kw))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for c in made:
        c.ring.close()
        c.ctx.term()


async def test_a_node_that_cannot_load_is_left_out_at_once_and_retried_when_it_restarts(cluster) -> None:
    c = cluster(["a", "b", "c"])
    missing = "ModelNotFound: layers [4, 6) need model-00002.safetensors"
    c.answer = lambda n, a: loaded(n, a, ok=False, detail=missing) if n == "c" else loaded(n, a)
    await c.until(lambda: c.serving() == ["a", "b"])
    status = c.ring.excluded
    assert "model-00002.safetensors" in status[NodeId("c")]
    assert "left out" in c.members.health(c.members.members[NodeId("c")], c.ring.epoch)
    tries = sum(1 for n, _ in c.assigns if n == "c")
    # Many ticks later (well past any retry timer), with the same process beating: not retried.
    for _ in range(100):
        c.clock.now += 0.2
        c.beat_all()
        await c.planner.tick()
    assert sum(1 for n, _ in c.assigns if n == "c") == tries == 1
    assert c.serving() == ["a", "b"]
    # It restarts (a new pid) with its files in place: it rejoins.
    c.pids[NodeId("c")] = 101
    c.answer = lambda n, a: loaded(n, a)
    await c.until(lambda: c.serving() == ["a", "b", "c"])
    assert NodeId("c") not in c.ring.excluded


async def test_a_wrong_model_is_left_out_with_its_fingerprint(cluster) -> None:
    c = cluster(["a", "b"])
    c.answer = lambda n, a: loaded(n, a, fp="ee" * 8) if n == "b" else loaded(n, a)
    await c.until(lambda: c.serving() == ["a"])
    assert "ee" * 8 in c.ring.excluded[NodeId("b")]


async def test_a_lost_loaded_is_replaced_by_the_beat_that_says_loaded(cluster) -> None:
    c = cluster(["a", "b"])

    def answer(n: NodeId, a: Assign) -> Loaded | None:
        if n == "b":  # its Loaded is lost; its beats say what it did
            m = c.members.members[n]
            assert m.beat is not None
            c.members.members[n].beat = dataclasses.replace(m.beat, epoch=a.epoch, loaded=True)
            return None
        return loaded(n, a)

    c.answer = answer
    real_beat_all = c.beat_all
    c.beat_all = lambda: None  # keep the replaced beat (no fresh beats overwrite it)
    try:
        async with asyncio.timeout(PLAN_DEADLINE_S):  # not LOAD_TIMEOUT_S (600 s)
            await c.planner.tick()
    finally:
        c.beat_all = real_beat_all
    assert c.serving() == ["a", "b"]


async def test_plans_keep_room_for_kv_and_runtime_and_the_ring_knows_its_kv_budget(cluster) -> None:
    weights = SIZE.stage_bytes(0, SIZE.n_layers)
    reserve = RUNTIME_HEADROOM_BYTES + KV_RESERVE_TOKENS * SIZE.kv_bytes_per_token * SIZE.n_layers
    # One node whose memory holds the weights but not the reserve: no ring, the shortfall named.
    tight = cluster(["a"], free=weights + reserve - 4 * MEMORY_QUANTUM)
    await tight.planner.tick()
    assert not tight.serving() and "short by" in tight.ring.reason
    # With room for the reserve and more: a ring whose KV budget counts what is left.
    roomy = cluster(["a"], free=weights + reserve + 64 * MIB)
    await roomy.until(lambda: roomy.serving() == ["a"])
    cap = roomy.members.capacity(roomy.members.usable())[0].free_bytes
    expect = (cap - weights - RUNTIME_HEADROOM_BYTES) // (KV_COPY_FACTOR * SIZE.kv_bytes_per_token * SIZE.n_layers)
    assert roomy.ring.kv_tokens == expect and expect >= KV_RESERVE_TOKENS


async def test_the_ring_admits_by_what_each_stage_measured_of_its_caches(cluster) -> None:
    """A stage that reports its caches when it loads (a sliding window, an SSM state) is counted
    by them; one that reports none (a simulated stage) by config.json's per-token estimate."""
    measured = KVProfile(windows=((512, 1024),), state_bytes=4096)
    c = cluster(["a", "b"], free=1 << 30)
    c.answer = lambda n, a: dataclasses.replace(loaded(n, a), kv=measured) if n == "a" else loaded(n, a)
    await c.until(lambda: c.serving() == ["a", "b"])
    assert c.ring.kv is not None
    by_node = dict(zip([p.node for p in c.ring.placement], (s.kv for s in c.ring.kv.stages)))
    assert by_node == {"a": measured, "b": KVProfile(token_bytes=SIZE.kv_bytes_per_token * 3)}
