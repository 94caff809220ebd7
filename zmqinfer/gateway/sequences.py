"""What the scheduler keeps per sequence and per step in flight. Plain records on the gateway's
event loop; the rules that change them are in scheduler.py (and admission.py for the groups).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from zmqinfer.protocol.wire import NO_GROUP, Epoch, Sample, SamplingParams, SeqId

# Prompt tokens per prefill message, at most. Smaller chunks overlap better across stages (a
# 1024-token prompt on 2 stages: 4 chunks finish in ~5/8 of the unsplit time) and interleave with
# decode steps sooner; a cold prompt's results equal mlx-lm run with prefill_step_size=PREFILL_CHUNK.
PREFILL_CHUNK = 256
# Tokens per chunk, at least, when a prompt's rest is cut for its stages: a short turn is not cut
# into slivers (each costs a message and a pass over the stage's weights).
MIN_CHUNK = 32


def chunk_size(tokens: int, stages: int, cached: int) -> int:
    """Tokens per prefill chunk for `tokens` to prefill on `stages` stages after `cached` held
    positions. After a long held context (a cached conversation) a chunk's cost is attention
    over that context, on the CPU backend mostly single-threaded softmax: cut into a chunk per
    stage, the stages overlap it (a turn's 300 new tokens on 3 stages after 2,400 cached: 3
    chunks of 100 in 4.0 s, 256 + 44 in 4.9 s). A cold prompt's cost is the weights' BLAS
    matmuls, which already keep the cores busy: cut finer it only pays more messages (a
    128-token prompt on 3 stages, first token in 838 ms cut in three, 534 ms whole), so it
    keeps PREFILL_CHUNK. A start past 0 agrees with a cold prefill to float rounding wherever
    it is cut (docs/prefix-cache.md)."""
    if cached < PREFILL_CHUNK:
        return PREFILL_CHUNK
    return min(PREFILL_CHUNK, max(MIN_CHUNK, -(-tokens // max(1, stages))))


class Paused:
    """Queued to a parked request: the ring is being re-planned; wait up to REPLAY_WAIT_S."""


PAUSED = Paused()


@dataclass
class Drafting:
    """A sequence's speculation state (the rules are gateway/speculation.py's): its draft
    length, its prompt-lookup index (each n-gram of its history -> where the tokens after its
    latest occurrence start; positions below `indexed` are in it) and its cooldown."""

    k: int
    after: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0
    misses: int = 0  # steps in a row whose drafts were all rejected
    wait: int = 0  # steps to go before it drafts again


@dataclass
class Seq:
    id: SeqId
    epoch: Epoch  # the ring it runs on; 0 while parked
    max_tokens: int
    params: SamplingParams
    history: list[int]  # prompt + every token sampled so far: what a replay prefills
    prefill: deque[tuple[int, list[int]]] = field(default_factory=deque)  # (start, tokens) to send
    next_token: int = 0  # what its next decode step feeds in
    pos: int = 0  # position of next_token
    queue: asyncio.Queue[Sample | Exception | Paused] = field(default_factory=asyncio.Queue)
    params_sent: bool = False
    group: int | None = None
    generated: int = 0
    done: bool = False
    bound: int = 0  # most tokens it can ever hold: prompt + max_tokens (its KV cost)
    deadline: float = 0.0  # when its request gives up, unless the ring's progress renews it
    inflight: int = 0  # its steps in the ring
    replays: int = 0  # failed steps in a row
    arrived: float = field(default_factory=time.monotonic)  # generate() called: queue time starts
    started: bool = False  # its first message on the current ring has been decided (running)
    queued: bool = True  # never started on any ring yet (queue time not yet observed)
    prefix: int | None = None  # the cached prefix its first chunk starts from (gateway/prefixes.py)
    drafting: Drafting | None = None  # made when speculation first drafts for it
    drafted: int = 0  # tokens drafted in its decode step in flight
    trim: int = 0  # rejected drafts its caches hold past its history: its next step drops them

    def start(self) -> float | None:
        """Its next message is decided: it runs on this ring. Seconds since it arrived, the
        first time it starts on any ring (its queue time); else None."""
        self.started = True
        if not self.queued:
            return None
        self.queued = False
        return time.monotonic() - self.arrived

    def restart(self, epoch: Epoch, cached: int = 0, stages: int = 1) -> None:
        """Start over on a fresh ring of `stages` stages: prefill all but the last token of the
        history (cut as mlx-lm cuts a prompt), which is then the first decode step. `cached`:
        the first so many come from a cached prefix (the caller names it in `prefix`); a
        restart uses none."""
        head = self.history[:-1]
        self.prefix = None
        step = chunk_size(len(head) - cached, stages, cached)
        self.prefill = deque((a, head[a:a + step]) for a in range(cached, len(head), step))
        self.next_token, self.pos = self.history[-1], len(self.history) - 1
        self.epoch, self.params_sent, self.group, self.started = epoch, False, None, False
        self.drafted = self.trim = 0  # fresh caches hold no rejected drafts


@dataclass
class Step:
    """A step in the ring: what answering or reclaiming it gives back."""

    group: int  # NO_GROUP: a prefill credit
    seqs: list[Seq]
    ids: tuple[SeqId, ...]  # the ids it was sent with (a replayed sequence gets a new one)
    deadline: float
    tokens: int  # token rows it carries


class StepBook:
    """Steps in flight, and the prefill credits they hold."""

    def __init__(self) -> None:
        self.acks: dict[int, Step] = {}
        self.prefills = 0

    def book(self, step: int, group: int, seqs: list[Seq], deadline: float, tokens: int) -> None:
        self.acks[step] = Step(group, list(seqs), tuple(s.id for s in seqs), deadline, tokens)
        self.prefills += group == NO_GROUP
        for seq in seqs:
            seq.inflight += 1
            seq.deadline = max(seq.deadline, deadline)

    def settle(self, step: int) -> Step | None:
        """Answered or reclaimed: its credit is free (its group's is the caller's to free)."""
        rec = self.acks.pop(step, None)
        if rec is None:
            return None
        if rec.group == NO_GROUP:
            self.prefills -= 1
        for seq in rec.seqs:
            seq.inflight -= 1
        return rec

    def tokens(self) -> int:
        """Token rows in the ring: what a new step waits behind."""
        return sum(r.tokens for r in self.acks.values())

    def due(self, now: float) -> list[tuple[int, Step]]:
        return [(step, r) for step, r in self.acks.items() if r.deadline <= now]

    def next_due(self, now: float) -> float | None:
        """Seconds until the first step is due; None with nothing in flight."""
        return max(0.0, min(r.deadline for r in self.acks.values()) - now) if self.acks else None
