"""Cached prefixes on one stage: the KV of a finished sequence's first positions, for its layers,
under an id the gateway names (gateway/prefixes.py), so a new sequence that starts with the
same tokens starts from a copy instead of recomputing them (issue 22).

Plain attention caches (mlx-lm's KVCache) can be cut at any position, so one such prefix serves
every request that shares any part of it. Their copies are views: a new sequence's cache starts
as slices of the prefix's arrays, and mlx-lm's KVCache grows by concatenating new storage onto
them, never by writing into them, so the prefix is never changed by the sequences that use it.

A sliding window (RotatingKVCache) or an SSM state (ArraysCache) cannot be cut back: a stage
holding one keeps a whole snapshot of the sequence's caches at their end, which serves only a
request that starts with all of its tokens (an exact boundary: a conversation's next turn), and
each sequence started from it gets its own deep copy (these caches write in place), as mlx-lm's
own prompt cache does. A Forward naming a prefix, or a part of one, that this stage does not
hold fails like any out-of-step chunk: the gateway replays it from position 0, and learns to
ask for exact boundaries only (gateway/prefixes.py).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

# Prefixes one stage holds at most, whatever the gateway asks: the guard against a gateway that
# never drops any (the gateway's own bound is its KV budget, gateway/prefixes.py).
MAX_PREFIXES = 256


@dataclass
class _Prefix:
    keys: list[mx.array]  # per layer [1, heads, length, head_dim]; empty for a snapshot
    values: list[mx.array]
    length: int
    snapshot: list[Any] | None = None  # caches that cannot be cut: the whole of them, at `length`
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        if self.snapshot is not None:
            return sum(int(c.nbytes) for c in self.snapshot)
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))


class PrefixStore:
    def __init__(self) -> None:
        self._held: dict[int, _Prefix] = {}

    def __contains__(self, pid: int) -> bool:
        return pid in self._held

    def __len__(self) -> int:
        return len(self._held)

    def tokens(self) -> int:
        return sum(p.length for p in self._held.values())

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._held.values())

    def keep(self, pid: int, layers: list[Any], length: int, held: int) -> bool:
        """Keep the first `length` positions of `layers` (a sequence's own caches, which hold
        `held` positions and are not used after this) as `pid`. False, keeping nothing, when
        they hold fewer, or cannot be cut and `length` is not all of them."""
        if not layers or held < length:
            return False
        cuttable = all(type(c) is KVCache and c.keys is not None and c.offset >= length for c in layers)
        if not cuttable and length != held:
            return False
        if pid not in self._held and len(self._held) >= MAX_PREFIXES:
            self.evict_one()
        if not cuttable:
            self._held[pid] = _Prefix([], [], length, snapshot=list(layers))
            return True
        # Contiguous copies: the sequence's own (larger, step-grown) storage is freed with it.
        keys = [mx.contiguous(c.keys[..., :length, :]) for c in layers]
        values = [mx.contiguous(c.values[..., :length, :]) for c in layers]
        mx.eval(keys, values)
        self._held[pid] = _Prefix(keys, values, length)
        return True

    def seed(self, pid: int, length: int) -> list[Any] | None:
        """Fresh caches holding the prefix's first `length` positions; None when it is not held,
        is shorter, or is a snapshot of another length."""
        p = self._held.get(pid)
        if p is None or length > p.length or (p.snapshot is not None and length != p.length):
            return None
        p.last_used = time.monotonic()
        if p.snapshot is not None:
            return copy.deepcopy(p.snapshot)
        out = []
        for k, v in zip(p.keys, p.values):
            c = KVCache()
            c.state = (k[..., :length, :], v[..., :length, :], length)
            out.append(c)
        return out

    def drop(self, pids: tuple[int, ...] | list[int]) -> None:
        for pid in pids:
            self._held.pop(pid, None)

    def evict_one(self) -> bool:
        """Drop the least recently used prefix (room for a sequence comes first)."""
        if not self._held:
            return False
        del self._held[min(self._held, key=lambda pid: self._held[pid].last_used)]
        return True

    def clear(self) -> None:
        self._held.clear()
