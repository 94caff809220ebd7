"""The prefix cache through the scheduler, over the in-memory ring: a finished request's tokens
are kept on its Release, the next turn's first chunk starts from them, and a request that needs
the room evicts them at once instead of waiting (the stages hear it on the next Release)."""

from __future__ import annotations

import asyncio

from tests.unit.gateway.test_scheduler import EOS, MemoryRing, collect, drive, running, settle
from zmqinfer.gateway import prefixes
from zmqinfer.gateway.kvroom import KVRoom
from zmqinfer.gateway.scheduler import Scheduler
from zmqinfer.protocol.wire import Release, SamplingParams

PROMPT = list(range(1, 41))


async def turn(ring: MemoryRing, sched: Scheduler, prompt: list[int], max_tokens: int) -> tuple[list[int], int]:
    """One request to its end; its tokens and its cached prompt tokens."""
    out: list[int] = []

    async def run() -> int:
        scope = prefixes.enter("key:a")
        await collect(sched.generate(prompt, SamplingParams(), max_tokens), out)
        return scope.cached_tokens

    task = asyncio.create_task(run())
    await drive(ring, sched, [task])
    return out, task.result()


def releases(ring: MemoryRing) -> list[Release]:
    return [m for m in ring.sent if isinstance(m, Release)]


async def test_turn_two_starts_from_turn_one_and_a_needy_request_evicts_it() -> None:
    ring = MemoryRing()
    sched = Scheduler(ring, {EOS})
    async with running(sched):
        reply, cached = await turn(ring, sched, PROMPT, 3)
        assert cached == 0
        await settle()
        (keep,) = releases(ring)[-1].keep
        assert keep.length == len(PROMPT) + 3 - 1  # all but the last sampled token
        n = len(ring.forwards())
        second = PROMPT + reply + [7, 8, 9, 10]
        _, cached = await turn(ring, sched, second, 2)
        assert cached == keep.length
        first = ring.forwards()[n].chunks[0]
        assert (first.prefix, first.start, first.length) == (keep.prefix, keep.length, len(second) - 1 - keep.length)
        assert first.params is not None and all(c.prefix is None for f in ring.forwards()[n + 1:] for c in f.chunks)
        assert sched.prefixes.entries == 1  # turn 2's tokens replaced turn 1's (they extend them)
        # A request that needs the whole budget: the prefix gives way at once, no wait.
        ring.kv = KVRoom.of_tokens(512)
        task = asyncio.create_task(collect(sched.generate([3] * 10, SamplingParams(), 500), []))
        await settle()
        assert sched.queued == 0 and sched.prefixes.entries == 0 and sched.prefixes.stats.evictions == 1
        assert any(r.drop for r in releases(ring))
        await drive(ring, sched, [task], rounds=2000)


async def test_with_the_cache_off_nothing_is_kept_or_named() -> None:
    ring = MemoryRing()
    sched = Scheduler(ring, {EOS}, prefix_cache=False)
    async with running(sched):
        reply, _ = await turn(ring, sched, PROMPT, 3)
        _, cached = await turn(ring, sched, PROMPT + reply + [7, 8], 2)
    assert cached == 0 and sched.prefixes.entries == 0
    assert all(not r.keep and not r.drop for r in releases(ring))
    chunks = [c for f in ring.forwards() for c in f.chunks]
    assert all(c.prefix is None for c in chunks)
    first = {c.seq: c for c in reversed(chunks)}  # each request's first chunk
    assert len(first) == 2 and all(c.start == 0 for c in first.values())  # both prefill from 0
