"""Admission: where each admitted sequence waits or runs, and what it sends next — the admission
queue (KV room), the prefill queue and the decode groups — with what a sequence costs in KV.

    admit(seq) -> waiting (no KV room yet, or others wait before it)
               -> prefilling -> (its last chunk sent) -> the group it pads least -> leave()

KV arithmetic per request (pure): a sequence holds prompt + max_tokens positions at most (the
gateway knows both), in whole cache steps; a decode group is left-padded to its longest member
(mlx-lm BatchKVCache), so a group of n costs n x its longest bound; a prefilled sequence joins the
group it makes least padded. Admission keeps every group's padded cost and every other admitted
sequence's within what each stage holds (kvroom.py: its room at plan time, and what a sequence's
caches cost there by cache type: a window stops one, an SSM state does not grow), so a node is
never asked to hold more KV than it said it had room for.

Prefill is round robin: a sequence whose prompt has more chunks goes back to the end of the
queue, so one long prompt never starves the others. New prompts waiting together share a
message: the stages prefill their first chunks as one left-padded batch (node/stage.py,
`prefill_batch`), reading the weights once for all of them, as mlx-lm's `batch_generate`
prefills. A prompt alone gets a message of its own, so a request alone stays token-identical to
mlx-lm. `decode_batches` and `prefill_batch` build the chunks of the next messages; the scheduler
books and sends them (its credits). Plain records on the gateway's event loop, owned by the
scheduler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from zmqinfer.gateway.errors import RETRY_AFTER_S, Overloaded, RingUnavailable
from zmqinfer.gateway.kvroom import KVRoom
from zmqinfer.gateway.sequences import PREFILL_CHUNK, Seq
from zmqinfer.model.size import kv_positions
from zmqinfer.protocol.wire import Chunk, Epoch, Forward, Release, SeqId

# Micro-batch groups beyond one per device: while one group's tokens travel back through the
# gateway, the spare keeps the first device busy (README, "Keeping every device busy").
SPARE_GROUPS = 1

# New sequences prefilled in one message at most (batch_generate's prefill batch size); their
# tokens, padded to the longest, also stay within PREFILL_CHUNK (the wire's row limit).
PREFILL_BATCH = 8

PromptChunk = tuple[int, list[int]]  # (position of its first token, the tokens)


def groups(n_devices: int) -> int:
    """Micro-batch groups for a ring over `n_devices` devices. Stages on one machine share its
    cores, so splitting their batch only costs: they get one group, as batch_generate has."""
    return 1 if n_devices <= 1 else n_devices + SPARE_GROUPS


def seq_bound(prompt_tokens: int, max_tokens: int) -> int:
    """KV positions a sequence can come to hold: prompt + max_tokens, in whole cache steps."""
    return kv_positions(prompt_tokens + max_tokens)


def group_cost(bounds: Sequence[int]) -> int:
    """KV tokens a decode group of sequences with these length bounds can grow to: every member
    padded to the longest."""
    return len(bounds) * max(bounds) if bounds else 0


def join_cost(bounds: Sequence[int], bound: int) -> int:
    """What adding a sequence of `bound` tokens to a group with `bounds` adds to its cost."""
    return group_cost([*bounds, bound]) - group_cost(bounds)


@dataclass
class Group:
    members: list[Seq] = field(default_factory=list)
    in_flight: bool = False


class PrefillQueue:
    def __init__(self) -> None:
        self._seqs: deque[Seq] = deque()

    def __bool__(self) -> bool:
        return bool(self._seqs)

    def __contains__(self, seq: Seq) -> bool:
        return seq in self._seqs

    def append(self, seq: Seq) -> None:
        self._seqs.append(seq)

    def remove(self, seq: Seq) -> None:
        if seq in self._seqs:
            self._seqs.remove(seq)

    def clear(self) -> None:
        self._seqs.clear()

    def take(self) -> list[tuple[Seq, PromptChunk]]:
        """The next message's chunks, each taken off its sequence (queue not empty): the first
        waiting chunk and the other sequences' next chunks that fit beside it (up to
        PREFILL_BATCH, padded size within PREFILL_CHUNK). Chunks past position 0 (a prompt's
        later chunks, or its first after a cached prefix) batch too: the stages merge their
        caches in, as mlx-lm's BatchGenerator processes cached prompts (node/stage.py)."""
        seq = self._seqs.popleft()
        first = seq.prefill.popleft()
        batch = [(seq, first)]
        width = len(first[1])
        for other in list(self._seqs):
            if len(batch) >= PREFILL_BATCH:
                break
            _, ids = other.prefill[0]
            if max(width, len(ids)) * (len(batch) + 1) <= PREFILL_CHUNK:
                width = max(width, len(ids))
                self._seqs.remove(other)
                batch.append((other, other.prefill.popleft()))
        return batch


# The chunks of one message, the sequences they belong to, and their token ids in chunk order.
Batch = tuple[list[Seq], tuple[Chunk, ...], list[int]]


class Cached(Protocol):
    """What admission reads of the prefix cache (gateway/prefixes.py)."""

    tokens: int  # KV positions its prefixes hold

    def evict_lru(self) -> bool: ...  # False: nothing left to evict


class RingSize(Protocol):
    """What admission reads of the ring (gateway/ring.py)."""

    @property
    def n_devices(self) -> int: ...  # distinct machines (or simulated devices) among the stages
    @property
    def kv(self) -> KVRoom | None: ...  # the KV its stages hold (kvroom.py); None: no limit


class RingPort(RingSize, Protocol):
    """What the scheduler needs from the ring (gateway/ring.py): its size, and sending."""

    @property
    def epoch(self) -> Epoch: ...
    @property
    def n_stages(self) -> int: ...
    @property
    def rollback(self) -> bool: ...  # every stage's caches can drop rejected drafts (Loaded.rollback)

    async def wait_ready(self, timeout: float) -> None: ...  # raises RingUnavailable
    async def send(self, msg: Forward | Release) -> None: ...


class Lanes:
    def __init__(self, ring: RingSize, seqs: Mapping[SeqId, Seq], wake: Callable[[], None],
                 cached: Cached | None = None) -> None:
        """`seqs`: the scheduler's live sequences (read here, never changed); `wake`: the pump has
        something new to decide; `cached`: the prefix cache, whose tokens count in the budget."""
        self.ring, self._seqs, self._wake, self.cached = ring, seqs, wake, cached
        self.groups: dict[int, Group] = {}
        self.prefilling = PrefillQueue()  # waiting for (more) prefill chunks to be sent
        self.waiting: deque[Seq] = deque()  # admitted, waiting for KV room

    def clear(self) -> None:
        """The ring is gone: no group, nothing prefilling or waiting (its sequences are parked)."""
        self.groups.clear()
        self.prefilling.clear()
        self.waiting.clear()

    # ---- admission by the KV budget ---------------------------------------------------------

    def check(self, seq: Seq, max_queued: int) -> None:
        """Refuse a request the ring could never hold (RingUnavailable: 503), or one that would
        wait behind `max_queued` others (Overloaded: 429)."""
        room = self.ring.kv
        if room is not None and not room.fits([[seq.bound]]):
            raise RingUnavailable(f"this request may need {seq.bound} tokens of KV cache (prompt "
                                  f"{len(seq.history)} + max_tokens {seq.max_tokens}); the ring holds "
                                  f"{room.longest()}")
        if (self.waiting or not self.fits(seq)) and len(self.waiting) >= max_queued:
            raise Overloaded(f"the ring is full and {len(self.waiting)} requests already wait "
                             f"(limit {max_queued}); retry in {RETRY_AFTER_S}s")

    def _held(self, but: Seq) -> list[list[int]]:
        """The bounds the admitted sequences (but `but`) can grow to, by group (padded to its
        longest); the ones prefilling or parked each alone."""
        grouped = [[s.bound for s in g.members] for g in self.groups.values()]
        return grouped + [[s.bound] for s in self._seqs.values() if s is not but and s.group is None
                          and not s.done and s not in self.waiting]

    def fits(self, seq: Seq) -> bool:
        """Cached prefixes give way first: the least recently used are evicted until it fits."""
        room = self.ring.kv
        if room is None:
            return True
        held = [*self._held(seq), [seq.bound]]
        while self.cached is not None and not room.fits(held, self.cached.tokens) and self.cached.evict_lru():
            pass
        return room.fits(held, self.cached.tokens if self.cached is not None else 0)

    def admit(self, seq: Seq) -> None:
        """Start it on the ring if the KV budget holds it (and nobody waits before it)."""
        if self.waiting or not self.fits(seq):
            self.waiting.append(seq)
        else:
            self.enqueue(seq)

    def admit_waiting(self) -> None:
        while self.waiting and self.fits(self.waiting[0]):
            self.enqueue(self.waiting.popleft())

    def enqueue(self, seq: Seq) -> None:
        if seq.prefill:
            self.prefilling.append(seq)
        else:
            self._join(seq)
        self._wake()

    def _join(self, seq: Seq) -> None:
        """Put a prefilled sequence in the group it pads least (lengths closest), the smallest
        of those; it decodes from that group's next step."""
        k = groups(self.ring.n_devices)
        for gid in range(k):
            self.groups.setdefault(gid, Group())
        gid = min(range(k), key=lambda g: (join_cost([s.bound for s in self.groups[g].members], seq.bound),
                                           len(self.groups[g].members)))
        seq.group = gid
        self.groups[gid].members.append(seq)

    def free(self, gid: int) -> None:
        """Its step was answered or reclaimed: the group may step again."""
        if (g := self.groups.get(gid)) is not None:
            g.in_flight = False

    def leave(self, seq: Seq) -> None:
        """Out of its group, the prefill queue and the admission queue."""
        g = self.groups.get(seq.group) if seq.group is not None else None
        if g is not None and seq in g.members:
            g.members.remove(seq)
        seq.group = None
        self.prefilling.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    # ---- the next messages' chunks ----------------------------------------------------------

    def decoding(self) -> int:
        """Sequences in decode groups."""
        return sum(len(g.members) for g in self.groups.values())

    def decode_batches(self, draft: Callable[[Seq], list[int]] = lambda seq: []) -> list[tuple[int, Batch]]:
        """One decode step for every group with members and no step in the ring (each then has
        one in flight until the scheduler settles it). A member's chunk carries its next token
        and the tokens `draft` proposes for it (speculation), and drops the rejected drafts its
        previous step left (`trim`)."""
        out = []
        for gid, g in self.groups.items():
            if g.in_flight or not g.members:
                continue
            chunks, toks = [], []
            for seq in g.members:
                drafts = draft(seq)
                chunks.append(_chunk(seq, seq.pos, 1 + len(drafts), sample=True, trim=seq.trim))
                toks += [seq.next_token, *drafts]
                seq.drafted, seq.trim = len(drafts), 0
            g.in_flight = True
            out.append((gid, (list(g.members), tuple(chunks), toks)))
        return out

    def prefill_batch(self) -> Batch:
        """The next prefill message (prefill queue not empty). A sequence with more chunks goes
        back to the queue's end (round robin: one long prompt does not starve the others); one
        whose prompt is all sent joins a group, its decode step following this chunk along the
        ring."""
        taken = self.prefilling.take()
        chunks = tuple(_chunk(seq, start, len(ids), sample=False) for seq, (start, ids) in taken)
        members = [seq for seq, _ in taken]
        for seq in members:
            if seq.prefill:
                self.prefilling.append(seq)
            else:
                self._join(seq)
                self._wake()  # its group may be idle: decide again
        return members, chunks, [t for _, (_, ids) in taken for t in ids]


def _chunk(seq: Seq, start: int, length: int, sample: bool, trim: int = 0) -> Chunk:
    """A chunk of `seq`; its sampling parameters (and the prefix it starts from) ride on its
    first chunk only."""
    chunk = Chunk(seq=seq.id, start=start, length=length, sample=sample,
                  params=None if seq.params_sent else seq.params,
                  prefix=None if seq.params_sent else seq.prefix, trim=trim)
    seq.params_sent = True
    return chunk
