"""Issue 10 (scheduler half) over the in-memory ring of test_scheduler.py: every step is answered
or reclaimed, a failed step replays its sequences (bounded), deadlines count from the ring's work
rather than from arrival, admission is bounded (429 when the queue is full) and respects the KV
budget, and a Release that could not be sent is sent again."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.gateway.test_scheduler import (
    EOS,
    MemoryRing,
    collect,
    drive,
    running,
    settle,
)
from zmqinfer.gateway.errors import Overloaded, RingUnavailable
from zmqinfer.gateway.kvroom import KVRoom
from zmqinfer.gateway.scheduler import MAX_REPLAYS, Scheduler
from zmqinfer.gateway.sequences import PREFILL_CHUNK
from zmqinfer.protocol.wire import (
    Forward,
    NodeId,
    Release,
    Sampled,
    SamplingParams,
    StepFailed,
)

TEST_DEADLINE_S = 20.0  # every test here ends well within this, or fails


def expected(prompt_len: int, n: int) -> list[int]:
    """MemoryRing's answer: the token after position p is (p + 1) % 97 + 1."""
    return [(p + 1) % 97 + 1 for p in range(prompt_len - 1, prompt_len - 1 + n)]


def fail(ring: MemoryRing, sched: Scheduler, fwd: Forward, reason: str = "boom") -> None:
    """What a node does when it cannot run a step at all: StepFailed for all of it, no answer."""
    ring.unanswered.remove(fwd)
    sched.on_step_failed(StepFailed(fwd.epoch, fwd.step, NodeId("node1"),
                                    tuple(c.seq for c in fwd.chunks), reason))


def releases(ring: MemoryRing) -> list[int]:
    return [s for m in ring.sent if isinstance(m, Release) for s in m.seqs]


async def test_a_failed_step_replays_its_sequence_and_frees_its_group() -> None:
    ring = MemoryRing(n_stages=1)
    sched = Scheduler(ring, {EOS})
    out: list[int] = []
    async with asyncio.timeout(TEST_DEADLINE_S), running(sched):
        t = asyncio.create_task(collect(sched.generate([5, 6, 7], SamplingParams(), 4), out))
        await settle()
        ring.answer(sched)  # the prefill chunk
        await settle()
        decode = ring.unanswered[-1]
        assert decode.chunks[0].sample
        fail(ring, sched, decode)
        await drive(ring, sched, [t])
        t.result()
    assert out == expected(3, 4)  # nothing lost, nothing repeated
    assert sched.in_flight == 0 and not any(g.in_flight for g in sched._lanes.groups.values())
    old = decode.chunks[0].seq
    assert old in releases(ring)  # the failed attempt's caches are freed along the ring
    replay = [f for f in ring.forwards() if f.step > decode.step]
    assert replay[0].chunks[0].start == 0 and replay[0].chunks[0].seq != old  # prefilled again, fresh id
    assert replay[0].chunks[0].params is not None  # the new id's first chunk carries the params


async def test_an_unanswered_step_is_reclaimed_at_its_deadline() -> None:
    ring = MemoryRing(n_stages=1)
    sched = Scheduler(ring, {EOS}, step_timeout_s=0.2)
    first: list[int] = []
    later: list[int] = []
    async with asyncio.timeout(TEST_DEADLINE_S), running(sched):
        t = asyncio.create_task(collect(sched.generate([5, 6, 7], SamplingParams(), 3), first))
        await settle()
        ring.answer(sched)
        await settle()
        lost = ring.unanswered.pop()  # the decode step vanished in the ring: nobody answers it
        u = asyncio.create_task(collect(sched.generate([8, 9], SamplingParams(), 3), later))
        await asyncio.sleep(0.4)  # past the step's deadline: reclaimed, the group is free again
        assert lost.step not in sched._steps_out.acks
        await drive(ring, sched, [t, u])
        t.result(), u.result()
        sched.on_sampled(Sampled(lost.epoch, lost.step, ()))  # a late answer changes nothing
    assert first == expected(3, 3) and later == expected(2, 3)


async def test_a_sequence_that_keeps_failing_fails_with_a_clear_error() -> None:
    ring = MemoryRing(n_stages=1)
    sched = Scheduler(ring, {EOS})
    async with asyncio.timeout(TEST_DEADLINE_S), running(sched):
        gen = sched.generate([1, 2, 3], SamplingParams(), 5)
        task = asyncio.create_task(anext(gen))
        while not task.done():
            await settle()
            for fwd in list(ring.unanswered):
                fail(ring, sched, fwd, "out of memory")
        with pytest.raises(RingUnavailable, match=f"out of memory.*failed {MAX_REPLAYS + 1} times"):
            task.result()
        await gen.aclose()
    attempts = {c.seq for f in ring.forwards() for c in f.chunks}  # each try under a fresh id
    assert len(attempts) == MAX_REPLAYS + 1
    assert sched.active == 0 and sched.in_flight == 0


async def test_a_queued_prompt_waits_its_turn_without_timing_out() -> None:
    """8 prompts of 4 chunks each through a ring far slower than one step timeout: every request
    waits longer than STEP_TIMEOUT_S for its first token, none times out (the ring answers)."""
    ring = MemoryRing(n_stages=2)
    sched = Scheduler(ring, {EOS}, step_timeout_s=0.3, prefill_s_per_token=0.0)
    n = 8
    outs: list[list[int]] = [[] for _ in range(n)]
    prompt = list(range(1, 4 * PREFILL_CHUNK + 2))
    async with asyncio.timeout(TEST_DEADLINE_S), running(sched):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = [asyncio.create_task(collect(sched.generate(prompt, SamplingParams(), 2), o)) for o in outs]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.05)  # one step answered every 50 ms: 32 chunks take ~1.6 s
            if ring.unanswered:  # answer the oldest step only
                rest, ring.unanswered = ring.unanswered[1:], ring.unanswered[:1]
                ring.answer(sched)
                ring.unanswered = rest + ring.unanswered
        for t in tasks:
            t.result()  # no RingTimeout
    assert all(o == expected(len(prompt), 2) for o in outs)
    assert loop.time() - t0 > 3 * 0.3  # the queue really was longer than a step timeout


async def test_admission_respects_the_kv_budget_and_429s_when_the_queue_is_full() -> None:
    ring = MemoryRing(n_stages=1)
    ring.kv = KVRoom.of_tokens(600)  # room for two sequences of 10 + 100 tokens (a 256-position step each), not three
    sched = Scheduler(ring, {EOS}, max_queued=2)
    outs: list[list[int]] = [[] for _ in range(4)]
    async with asyncio.timeout(TEST_DEADLINE_S), running(sched):
        tasks = [asyncio.create_task(collect(sched.generate(list(range(1, 11)), SamplingParams(), 100), o))
                 for o in outs]
        await settle()
        assert sched.queued == 2
        with pytest.raises(Overloaded, match="limit 2") as e:  # a fifth: the queue is full
            await anext(sched.generate([1, 2], SamplingParams(), 10))
        assert e.value.retry_after > 0
        with pytest.raises(RingUnavailable, match="holds 600"):  # one that could never fit
            await anext(sched.generate(list(range(1, 600)), SamplingParams(), 100))
        most = 0
        for _ in range(2000):
            await settle()
            if all(t.done() for t in tasks):
                break
            started = {c.seq for f in ring.forwards() for c in f.chunks}
            most = max(most, len(started - set(releases(ring))))  # holding caches in the ring
            ring.answer(sched)
        for t in tasks:
            t.result()
    assert all(len(o) == 100 for o in outs)
    assert most <= 2  # never more sequences in the ring than the budget holds


async def test_a_joining_sequence_goes_to_the_group_it_pads_least() -> None:
    ring = MemoryRing(n_stages=2)
    sched = Scheduler(ring, {EOS})
    async with asyncio.timeout(TEST_DEADLINE_S), running(sched):
        longs = [asyncio.create_task(collect(sched.generate([1, 2], SamplingParams(), 400), []))]
        await settle()
        ring.answer(sched)
        shorts = [asyncio.create_task(collect(sched.generate([3, 4], SamplingParams(), 10), []))
                  for _ in range(2)]
        await settle()
        ring.answer(sched)
        await settle()
        groups = {c.seq: f.group for f in ring.unanswered for c in f.chunks if c.sample}
        for t in longs + shorts:
            t.cancel()
    # The long one has a group to itself: neither short one is padded to 400 tokens (with a
    # spare group beside the two devices' ones, the shorts may take one group each).
    assert groups[1] not in (groups[2], groups[3])


async def test_a_release_that_could_not_be_sent_is_sent_again() -> None:
    class FlakyRing(MemoryRing):
        fail_releases = 1

        async def send(self, msg: Forward | Release) -> None:
            if isinstance(msg, Release) and self.fail_releases:
                self.fail_releases -= 1
                raise RingUnavailable("first hop did not accept data within 5s")
            await super().send(msg)

    ring = FlakyRing(n_stages=1)
    sched = Scheduler(ring, {EOS})
    async with asyncio.timeout(TEST_DEADLINE_S), running(sched):
        t = asyncio.create_task(collect(sched.generate([1, 2], SamplingParams(), 2), []))
        await drive(ring, sched, [t])
        for _ in range(5):  # the next decision round retries it
            await settle()
            sched._wake.set()
    assert ring.fail_releases == 0 and releases(ring) == [1]
