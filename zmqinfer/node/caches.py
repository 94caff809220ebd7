"""A stage's two homes for a sequence's KV: its own caches, or a row of its decode group's merged
batch caches (mlx-lm's `merge`/`extend`/`filter`/`extract`, which batch every family). Only the
mlx thread touches them; stage.py decides which home a sequence is in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from zmqinfer.protocol.wire import SeqId


@dataclass
class SeqCache:
    """One sequence's own caches (one per cache slot of the stage), holding `offset` positions."""

    layers: list[Any]
    offset: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Group:
    """A micro-batch's sequences in batch order, with one merged batch cache per cache slot."""

    order: list[SeqId] = field(default_factory=list)
    offsets: dict[SeqId, int] = field(default_factory=dict)
    layers: list[Any] | None = None
    last_used: float = field(default_factory=time.monotonic)

    def keep(self, seqs: list[SeqId]) -> None:
        """Keep (and order) just `seqs`, all already members."""
        if seqs == self.order:
            return
        if self.layers is not None:
            if seqs:
                idx = mx.array([self.order.index(s) for s in seqs])
                for c in self.layers:
                    c.filter(idx)
            else:
                self.layers = None
        self.offsets = {s: self.offsets[s] for s in seqs}
        self.order = list(seqs)

    def join(self, seq: SeqId, own: SeqCache) -> None:
        """Merge a sequence's own caches in as the group's last row."""
        merged = [type(c).merge([c]) for c in own.layers]
        if self.layers is None:
            self.layers = merged
        else:
            for mine, theirs in zip(self.layers, merged):
                mine.extend(theirs)
        self.order.append(seq)
        self.offsets[seq] = own.offset

    def take_out(self, seq: SeqId) -> SeqCache | None:
        """A member's row as caches of its own (None: it had no rows yet), the others kept."""
        own = None
        if self.layers is not None:
            i = self.order.index(seq)
            own = SeqCache([c.extract(i) for c in self.layers], offset=self.offsets[seq])
        self.keep([s for s in self.order if s != seq])
        return own
