"""Where each admitted sequence waits or runs, and what it sends next: the admission queue (KV
room), the prefill queue (prefill.py) and the decode groups.

    admit(seq) -> waiting (no KV room yet, or others wait before it)
               -> prefilling -> (its last chunk sent) -> the group it pads least -> leave()

Admission keeps the sum of every group's padded KV cost and every other admitted sequence's
bound within the ring's budget (kvbudget.py). `decode_batches` and `prefill_batch` build the
chunks of the next messages; the scheduler books and sends them. Plain records on the
gateway's event loop, owned by the scheduler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

from zmqinfer.gateway.kvbudget import join_cost
from zmqinfer.gateway.pacing import groups
from zmqinfer.gateway.prefill import PrefillQueue
from zmqinfer.gateway.sequences import RETRY_AFTER_S, Group, Overloaded, RingUnavailable, Seq
from zmqinfer.wire import Chunk, SeqId

# The chunks of one message, the sequences they belong to, and their token ids in chunk order.
Batch = tuple[list[Seq], tuple[Chunk, ...], list[int]]


class RingSize(Protocol):
    """What admission reads of the ring (gateway/ring.py)."""

    @property
    def n_devices(self) -> int: ...  # distinct machines (or simulated devices) among the stages
    @property
    def kv_tokens(self) -> int | None: ...  # KV the ring can hold (kvbudget.py); None: no limit


class Lanes:
    def __init__(self, ring: RingSize, seqs: Mapping[SeqId, Seq], wake: Callable[[], None]) -> None:
        """`seqs`: the scheduler's live sequences (read here, never changed); `wake`: the pump has
        something new to decide."""
        self.ring, self._seqs, self._wake = ring, seqs, wake
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
        budget = self.ring.kv_tokens
        if budget is not None and seq.bound > budget:
            raise RingUnavailable(f"this request may need {seq.bound} tokens of KV cache (prompt "
                                  f"{len(seq.history)} + max_tokens {seq.max_tokens}); the ring holds {budget}")
        if (self.waiting or not self.fits(seq)) and len(self.waiting) >= max_queued:
            raise Overloaded(f"the ring is full and {len(self.waiting)} requests already wait "
                             f"(limit {max_queued}); retry in {RETRY_AFTER_S}s")

    def _held(self, but: Seq) -> int:
        """KV tokens the admitted sequences (but `but`) can grow to: padded groups plus the
        ones prefilling or parked."""
        grouped = sum(g.cost() for g in self.groups.values())
        return grouped + sum(s.bound for s in self._seqs.values() if s is not but and s.group is None
                             and not s.done and s not in self.waiting)

    def fits(self, seq: Seq) -> bool:
        budget = self.ring.kv_tokens
        return budget is None or self._held(seq) + seq.bound <= budget

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

    def decode_batches(self) -> list[tuple[int, Batch]]:
        """One decode step for every group with members and no step in the ring (each then has
        one in flight until the scheduler settles it)."""
        out = []
        for gid, g in self.groups.items():
            if g.in_flight or not g.members:
                continue
            chunks = tuple(_chunk(seq, seq.pos, 1, sample=True) for seq in g.members)
            g.in_flight = True
            out.append((gid, (list(g.members), chunks, [seq.next_token for seq in g.members])))
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


def _chunk(seq: Seq, start: int, length: int, sample: bool) -> Chunk:
    """A chunk of `seq`; its sampling parameters ride on its first chunk only."""
    chunk = Chunk(seq=seq.id, start=start, length=length, sample=sample,
                  params=None if seq.params_sent else seq.params)
    seq.params_sent = True
    return chunk
