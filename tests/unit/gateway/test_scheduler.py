"""Scheduler rules over an in-memory ring (the one place fakes are allowed): credits are never
exceeded, a group has one step in flight, sequences join and leave between steps, long prompts
don't starve anyone, and a cancelled request frees its slot and its caches."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from zmqinfer.gateway.admission import PREFILL_BATCH
from zmqinfer.gateway.admission import groups as sched_groups
from zmqinfer.gateway.errors import RingUnavailable
from zmqinfer.gateway.kvroom import KVRoom
from zmqinfer.gateway.scheduler import Scheduler
from zmqinfer.gateway.sequences import MIN_CHUNK, PREFILL_CHUNK, Seq
from zmqinfer.protocol.wire import (
    Epoch,
    Forward,
    Release,
    Sample,
    Sampled,
    SamplingParams,
    SeqId,
)

EOS = 0


class MemoryRing:
    """Records what the scheduler sends and answers when the test says so. Token t at position p
    is p % 97 + 1, so an answer is deterministic and never EOS unless asked."""

    def __init__(self, n_stages: int = 3) -> None:
        self.epoch = Epoch(1)
        self.n_stages = self.n_devices = n_stages  # a device per stage
        self.kv: KVRoom | None = None
        self.rollback = False  # no speculation: these tests are about plain decode steps
        self.sent: list[Forward | Release] = []
        self.unanswered: list[Forward] = []
        self.max_in_flight = 0

    async def wait_ready(self, timeout: float) -> None:
        return None

    async def send(self, msg: Forward | Release) -> None:
        self.sent.append(msg)
        if isinstance(msg, Forward):
            self.unanswered.append(msg)
            self.max_in_flight = max(self.max_in_flight, len(self.unanswered))
            groups = [m.group for m in self.unanswered if m.group >= 0]
            assert len(groups) == len(set(groups)), "a group has two steps in flight"

    def answer(self, sched: Scheduler, eos_for: set[int] = frozenset()) -> int:
        """Answer every Forward in flight, oldest first; returns how many."""
        n = len(self.unanswered)
        for fwd in self.unanswered:
            samples = tuple(Sample(c.seq, EOS if c.seq in eos_for else (c.start + 1) % 97 + 1, -0.5)
                            for c in fwd.chunks if c.sample)
            sched.on_sampled(Sampled(fwd.epoch, fwd.step, samples))
        self.unanswered = []
        return n

    def forwards(self) -> list[Forward]:
        return [m for m in self.sent if isinstance(m, Forward)]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def running(sched: Scheduler):
    async with asyncio.TaskGroup() as tg:
        pump = tg.create_task(sched.pump())
        try:
            yield
        finally:
            pump.cancel()


async def collect(gen, into: list[int]) -> None:
    async for s in gen:
        into.append(s.token)


async def drive(ring: MemoryRing, sched: Scheduler, tasks: list[asyncio.Task], rounds: int = 500,
                eos_for: set[int] = frozenset()) -> None:
    for _ in range(rounds):
        await settle()
        if all(t.done() for t in tasks):
            return
        ring.answer(sched, eos_for)
    raise AssertionError("requests did not finish")


async def test_tokens_flow_and_positions_advance() -> None:
    ring, sched = MemoryRing(), None
    sched = Scheduler(ring, {EOS})
    out: list[int] = []
    async with running(sched):
        t = asyncio.create_task(collect(sched.generate([5, 6, 7], SamplingParams(), 4), out))
        await drive(ring, sched, [t])
    assert out == [4, 5, 6, 7]  # token after position p is (p+1) % 97 + 1, starting at p=2
    fwds = ring.forwards()
    assert [c.length for c in fwds[0].chunks] == [2] and not fwds[0].chunks[0].sample
    assert fwds[0].chunks[0].params is not None  # params ride on the first chunk only
    decode = [f.chunks[0] for f in fwds[1:]]
    assert [c.start for c in decode] == [2, 3, 4, 5] and all(c.params is None for c in decode)
    assert isinstance(ring.sent[-1], Release)


@pytest.mark.parametrize(("cached", "rest", "stages", "chunks"), [
    (2400, 300, 3, [100, 100, 100]),  # a cached turn's new tokens: a chunk per stage, pipelined
    (2400, 300, 1, [256, 44]),
    (2400, 40, 3, [MIN_CHUNK, 40 - MIN_CHUNK]),  # a short turn: not cut below MIN_CHUNK
    (2400, 3 * PREFILL_CHUNK + 10, 3, [PREFILL_CHUNK] * 3 + [10]),  # PREFILL_CHUNK at most
    (0, 300, 3, [256, 44]),  # a cold prompt is cut as mlx-lm cuts it
    (PREFILL_CHUNK - 1, 300, 3, [256, 44]),  # a short held context (a template's head) too
])
def test_a_prefill_after_a_long_cached_prefix_is_cut_into_a_chunk_per_stage(
        cached: int, rest: int, stages: int, chunks: list[int]) -> None:
    seq = Seq(SeqId(1), Epoch(1), 1, SamplingParams(), list(range(cached + rest + 1)))
    seq.restart(Epoch(1), stages=stages)
    assert seq.prefill[0][0] == 0
    seq.restart(Epoch(1), cached=cached, stages=stages)
    assert [len(t) for _, t in seq.prefill] == chunks
    assert [a for a, _ in seq.prefill] == [cached + sum(chunks[:i]) for i in range(len(chunks))]


async def test_credits_are_never_exceeded_and_long_prompts_share() -> None:
    ring = MemoryRing(n_stages=2)
    sched = Scheduler(ring, {EOS})
    outs: list[list[int]] = [[] for _ in range(6)]
    # Two long prompts and four one-token prompts (which need no prefill chunk at all).
    prompts = [list(range(1, 3 * PREFILL_CHUNK + 2)), list(range(1, 2 * PREFILL_CHUNK + 2))] + [[7]] * 4
    async with running(sched):
        tasks = [asyncio.create_task(collect(sched.generate(p, SamplingParams(), 5), o))
                 for p, o in zip(prompts, outs)]
        await drive(ring, sched, tasks)
    assert all(len(o) == 5 for o in outs)
    groups = sched_groups(2)
    assert ring.max_in_flight <= groups + 2  # every group once + the prefill credits (1 per stage)
    prefill = [f.chunks[0].seq for f in ring.forwards() if not f.chunks[0].sample]
    # Round robin: the two long prompts' chunks alternate instead of one going first entirely.
    assert prefill[:4] == [1, 2, 1, 2]
    # Short requests were not held behind the long prompts' prefill: they started decoding
    # while the first long prompt still had chunks to send.
    first_decode = next(i for i, f in enumerate(ring.forwards()) if f.chunks and f.chunks[0].sample)
    last_long_prefill = max(i for i, f in enumerate(ring.forwards())
                            if not f.chunks[0].sample and f.chunks[0].seq == 1)
    assert first_decode < last_long_prefill


async def test_short_prompts_waiting_together_share_a_prefill_message() -> None:
    """Prompts waiting for a credit go out together (at most PREFILL_BATCH, padded size within
    PREFILL_CHUNK), a later chunk beside first ones; a long prompt's full chunk travels alone,
    and a request alone in the ring gets a message of its own (as mlx-lm prefills it)."""
    ring = MemoryRing(n_stages=1)  # one prefill credit: the rest wait and are packed
    sched = Scheduler(ring, {EOS})
    short = [[5 + i] * (10 + i) for i in range(12)]
    prompts = [short[0], list(range(1, PREFILL_CHUNK + 40))] + short[1:]
    outs: list[list[int]] = [[] for _ in prompts]
    async with running(sched):
        tasks = [asyncio.create_task(collect(sched.generate(prompts[0], SamplingParams(), 3), outs[0]))]
        await settle()  # decided alone; the others arrive while it holds the credit
        tasks += [asyncio.create_task(collect(sched.generate(p, SamplingParams(), 3), o))
                  for p, o in zip(prompts[1:], outs[1:])]
        await drive(ring, sched, tasks)
    assert all(len(o) == 3 for o in outs)
    prefills = [f for f in ring.forwards() if not any(c.sample for c in f.chunks)]
    assert len(prefills[0].chunks) == 1  # the first request was alone when it was decided
    sizes = [len(f.chunks) for f in prefills]
    assert max(sizes) == PREFILL_BATCH, sizes  # eleven short prompts waited: a full batch went
    for f in prefills:
        lengths = [c.length for c in f.chunks]
        assert len({c.seq for c in f.chunks}) == len(f.chunks)
        if len(f.chunks) > 1:
            assert max(lengths) * len(lengths) <= PREFILL_CHUNK
            # a sequence's parameters ride on its first chunk only
            assert all((c.params is not None) == (c.start == 0) for c in f.chunks)
        assert f.tokens.shape == (sum(lengths),)  # one token row per chunk token, in chunk order
    long_chunks = [f for f in prefills if any(c.length >= PREFILL_CHUNK for c in f.chunks)]
    assert long_chunks and all(len(f.chunks) == 1 for f in long_chunks)
    # the long prompt's last 39 tokens (a chunk at PREFILL_CHUNK) went beside short prompts
    tail = next(f for f in prefills if any(c.start == PREFILL_CHUNK for c in f.chunks))
    assert len(tail.chunks) > 1
    assert sum(len(f.chunks) for f in prefills) == 12 + 2  # every chunk sent once


async def test_sequences_join_and_leave_between_steps() -> None:
    ring = MemoryRing(n_stages=1)  # 1 group
    sched = Scheduler(ring, {EOS})
    outs: list[list[int]] = [[] for _ in range(5)]
    async with running(sched):
        tasks = [asyncio.create_task(collect(sched.generate([9, 9], SamplingParams(), n), o))
                 for n, o in zip([2, 6, 6, 6, 6], outs)]
        await drive(ring, sched, tasks)
    assert [len(o) for o in outs] == [2, 6, 6, 6, 6]
    steps = [f for f in ring.forwards() if f.chunks and f.chunks[0].sample]
    sizes = [len(f.chunks) for f in steps]
    assert max(sizes) >= 2, "sequences were never batched"
    seq1_steps = [f for f in steps if any(c.seq == 1 for c in f.chunks)]
    assert len(seq1_steps) == 2  # it left its group after its last token
    releases = [m for m in ring.sent if isinstance(m, Release)]
    assert sorted(s for r in releases for s in r.seqs) == [1, 2, 3, 4, 5]


async def test_eos_ends_a_sequence() -> None:
    ring = MemoryRing()
    sched = Scheduler(ring, {EOS})
    out: list[int] = []
    async with running(sched):
        t = asyncio.create_task(collect(sched.generate([1, 2], SamplingParams(), 50), out))
        await drive(ring, sched, [t], eos_for={1})
    assert out == [EOS]


async def test_cancelled_request_frees_its_slot_and_caches() -> None:
    ring = MemoryRing(n_stages=1)
    sched = Scheduler(ring, {EOS})
    keep: list[int] = []
    async with running(sched):
        gen = sched.generate([1, 2, 3], SamplingParams(), 100)
        other = asyncio.create_task(collect(sched.generate([4, 5], SamplingParams(), 8), keep))
        first = await asyncio.wait_for(anext_after_answers(ring, sched, gen), 5)
        gone = first.seq
        await gen.aclose()  # the client went away
        assert sched.active == 1
        await drive(ring, sched, [other])
    assert len(keep) == 8
    releases = [s for m in ring.sent if isinstance(m, Release) for s in m.seqs]
    assert gone in releases
    after = ring.sent.index(next(m for m in ring.sent if isinstance(m, Release) and gone in m.seqs))
    assert not any(c.seq == gone for f in ring.sent[after:] if isinstance(f, Forward) for c in f.chunks)


async def anext_after_answers(ring: MemoryRing, sched: Scheduler, gen):
    task = asyncio.create_task(gen.__anext__())
    while not task.done():
        await settle()
        ring.answer(sched)
    return task.result()


async def test_a_broken_ring_fails_live_requests_at_once() -> None:
    ring = MemoryRing()
    sched = Scheduler(ring, {EOS})
    async with running(sched):
        gen = sched.generate([1, 2], SamplingParams(), 10)
        task = asyncio.create_task(gen.__anext__())
        await settle()
        sched.fail_all("node1 stopped sending heartbeats")
        with pytest.raises(RingUnavailable, match="node1"):
            await asyncio.wait_for(task, 5)
        await gen.aclose()
