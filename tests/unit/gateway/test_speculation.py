"""Speculation on the gateway (issue 23): prompt-lookup drafts, the trim bookkeeping, adaptive
k, the steps-aside policy and its counted reasons, and a replay mid-speculation, through the
real scheduler against a ring that judges drafts as a greedy last stage does."""

from __future__ import annotations

import asyncio
from typing import Callable

import numpy as np

from tests.unit.gateway.test_scheduler import EOS, MemoryRing, collect, running, settle
from zmqinfer.gateway.scheduler import Scheduler
from zmqinfer.gateway.sequences import Drafting
from zmqinfer.gateway.speculation import BUSY_SEQUENCES, COOLDOWN_MAX, K_GROW, K_MAX, K_START, adapt, propose
from zmqinfer.protocol.limits import MAX_DRAFT_TOKENS, MAX_FORWARD_TOKENS
from zmqinfer.protocol.wire import Epoch, Forward, Sample, Sampled, SamplingParams, SeqId, StepFailed

CODE = list(range(100, 160))  # a "code block": 60 distinct tokens
PROMPT = [7, 8, *CODE, 9]
EDIT = 36  # the one token the answer changes (mid-draft: a rejection)


def truth(p: int) -> int:
    """The model's greedy token at position p (p >= len(PROMPT)): the code block again, with
    one token changed, then EOS."""
    i = p - len(PROMPT)
    if i >= len(CODE):
        return EOS
    return 999 if i == EDIT else CODE[i]


class JudgingRing(MemoryRing):
    """Judges drafts as the last stage does (greedy: the agreeing prefix and one more), and keeps
    each sequence's cache length as a stage would, checking every chunk's start and trim."""

    def __init__(self, n_stages: int = 3, rollback: bool = True, model: Callable[[int], int] = truth) -> None:
        super().__init__(n_stages)
        self.rollback, self.truth = rollback, model
        self.held: dict[SeqId, int] = {}

    def answer(self, sched: Scheduler, eos_for: set[int] = frozenset()) -> int:
        n = len(self.unanswered)
        for fwd in self.unanswered:
            at, samples = 0, []
            toks = np.frombuffer(bytes(fwd.tokens.data), dtype=np.int32).tolist()
            for c in fwd.chunks:
                held = self.held.get(c.seq, 0)
                assert held == c.start + c.trim, f"seq {c.seq}: cache holds {held}, chunk {c}"
                self.held[c.seq] = c.start + c.length
                if c.sample:
                    fed = toks[at:at + c.length]
                    out = [self.truth(c.start + 1)]
                    for i, d in enumerate(fed[1:], start=1):
                        if d != out[-1]:
                            break
                        out.append(self.truth(c.start + i + 1))
                    samples += [Sample(c.seq, t, -0.1) for t in out]
                at += c.length
            sched.on_sampled(Sampled(fwd.epoch, fwd.step, tuple(samples)))
        self.unanswered = []
        return n


async def run(ring: MemoryRing, sched: Scheduler, prompts: list[list[int]], params: SamplingParams,
              max_tokens: int = 200, fail_step: int | None = None) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in prompts]
    async with running(sched):
        tasks = [asyncio.create_task(collect(sched.generate(p, params, max_tokens), o)) for p, o in zip(prompts, outs)]
        for _ in range(500):
            await settle()
            if all(t.done() for t in tasks):
                break
            if fail_step is not None and len(ring.forwards()) >= fail_step and ring.unanswered:
                fwd = ring.unanswered.pop()
                if any(c.length > 1 for c in fwd.chunks):  # fail a step that carries drafts
                    sched.on_step_failed(StepFailed(fwd.epoch, fwd.step, "n1", tuple(c.seq for c in fwd.chunks), "x"))
                    fail_step = None
                    continue
                ring.unanswered.append(fwd)
            ring.answer(sched)
        assert all(t.done() for t in tasks), "requests did not finish"  # never hang on gather
        await asyncio.gather(*tasks)
    return outs


EXPECTED = [truth(p) for p in range(len(PROMPT), len(PROMPT) + len(CODE) + 1)]


async def test_speculation_yields_the_plain_tokens_in_fewer_steps() -> None:
    plain_ring = JudgingRing(rollback=False)
    plain = Scheduler(plain_ring, {EOS}, speculation=False)
    assert await run(plain_ring, plain, [PROMPT], SamplingParams()) == [EXPECTED]
    ring = JudgingRing()
    sched = Scheduler(ring, {EOS})
    assert await run(ring, sched, [PROMPT], SamplingParams()) == [EXPECTED]
    assert sched.decode_steps < plain.decode_steps / 3, (sched.decode_steps, plain.decode_steps)
    st = sched.spec.status()
    assert st["drafts"] > 0 and 0 < st["accepted_tokens"] < st["draft_tokens"]  # the edit was a miss
    assert max(c.length for f in ring.forwards() for c in f.chunks if c.sample) == 1 + K_MAX
    assert any(c.trim for f in ring.forwards() for c in f.chunks)  # the miss was rolled back
    assert plain.spec.status()["drafts"] == 0 and sum(plain.spec.status()["skipped"].values()) == 0


async def test_a_replay_mid_speculation_gives_the_same_tokens() -> None:
    """A step carrying drafts fails: the sequence replays from its committed history only."""
    ring = JudgingRing()
    sched = Scheduler(ring, {EOS})
    assert await run(ring, sched, [PROMPT], SamplingParams(), fail_step=4) == [EXPECTED]
    restarted = [c for f in ring.forwards() for c in f.chunks if c.start == 0 and c.seq != 1]
    assert restarted and restarted[0].trim == 0  # the replay's caches are fresh


async def test_drafts_stop_at_max_tokens() -> None:
    ring = JudgingRing()
    sched = Scheduler(ring, {EOS})
    assert await run(ring, sched, [PROMPT], SamplingParams(), max_tokens=7) == [EXPECTED[:7]]
    assert all(c.start + c.length <= len(PROMPT) - 1 + 7 for f in ring.forwards() for c in f.chunks)


async def test_speculation_steps_aside_with_a_counted_reason() -> None:
    ring = JudgingRing()
    sched = Scheduler(ring, {EOS})
    n = BUSY_SEQUENCES + 1
    assert await run(ring, sched, [PROMPT] * n, SamplingParams(), max_tokens=5) == [EXPECTED[:5]] * n
    skipped = sched.spec.status()["skipped"]
    assert skipped["busy"] > 0 and sched.spec.status()["drafts"] < 5  # only once some had finished
    for params, reason in ((SamplingParams(grammar='{"grammars": []}'), "grammar"),
                           (SamplingParams(repetition_penalty=1.1), "sampler"),
                           (SamplingParams(top_logprobs=2), "sampler")):
        ring = JudgingRing()
        sched = Scheduler(ring, {EOS})
        await run(ring, sched, [PROMPT], params, max_tokens=4)
        st = sched.spec.status()
        assert st["drafts"] == 0 and st["skipped"][reason] == 3, (reason, st)  # the 4th: 1 token left
    ring = JudgingRing(rollback=False)
    sched = Scheduler(ring, {EOS})
    await run(ring, sched, [PROMPT], SamplingParams(), max_tokens=4)
    assert sched.spec.status()["skipped"]["rollback"] == 3


def test_prompt_lookup_drafts_what_followed_the_latest_match() -> None:
    d = Drafting(K_START)
    assert propose(d, [1, 2, 3], 4) == []  # nothing earlier to match
    assert propose(d, [1, 2, 3, 4, 5, 1, 2], 4) == [3, 4, 5, 1]
    assert propose(d, [1, 2, 3, 4, 5, 1, 2, 3, 9, 2, 3], 2) == [9, 2]  # latest "2 3", longest n-gram
    assert propose(d, [1, 2, 3, 4, 5, 1, 2, 3, 9, 2, 3, 4], 3) == [5, 1, 2]  # "2 3 4" beats "3 4"
    assert propose(Drafting(K_START), [1, 2, 3, 4, 5, 1, 2, 3, 9, 2, 3, 4], 3) == [5, 1, 2]  # built at once
    assert propose(Drafting(K_START), [1, 2, 3, 4, 5, 7, 5], 3) == []  # one token alone is no match


def test_k_adapts_to_acceptance() -> None:
    d = Drafting(K_START)
    adapt(d, K_START, K_START)
    assert d.k == K_START + K_GROW
    for _ in range(5):
        adapt(d, d.k, d.k)
    assert d.k == K_MAX
    adapt(d, K_MAX, 1)
    assert d.k == 2
    assert d.wait == 0
    adapt(d, 2, 0)
    assert d.k == 1 and d.wait == 1  # all rejected: a cooldown, doubling per miss in a row
    adapt(d, 1, 0)
    assert d.wait == 3
    for _ in range(5):
        adapt(d, 1, 0)
    assert d.wait == COOLDOWN_MAX
    adapt(d, 1, 1)
    assert d.wait == 0 and d.misses == 0


async def test_a_sequence_whose_drafts_all_miss_cools_down() -> None:
    """Its output repeats "1 2" (so drafts are looked up) but then always says something new:
    after each miss it waits longer before drafting again, so most of its steps are plain."""
    ring = JudgingRing(model=lambda p: (1, 2, 1000 + p)[p % 3])
    sched = Scheduler(ring, {EOS})
    await run(ring, sched, [[7, 8, 9]], SamplingParams(), max_tokens=120)
    st = sched.spec.status()
    assert st["drafts"] > 2 and st["accepted_tokens"] == 0 and st["skipped"]["cooldown"] > st["drafts"]

def test_a_speculating_group_fits_one_forward() -> None:
    assert K_MAX <= MAX_DRAFT_TOKENS
    assert BUSY_SEQUENCES * (1 + K_MAX) <= MAX_FORWARD_TOKENS
