"""Cached prefixes on one stage: the KV of a finished sequence's first positions, for its layers,
under an id the gateway names (gateway/prefixes.py), so a new sequence that starts with the
same tokens starts from a copy instead of recomputing them (issue 22).

Only plain attention caches (mlx-lm's KVCache) are kept: they can be cut at any position, so one
prefix serves every request that shares any part of it. A sliding window (RotatingKVCache) or an
SSM state (ArraysCache) cannot be cut back; such a stage keeps nothing, and a Forward naming a
prefix it does not hold fails like any out-of-step chunk: the gateway replays it from position 0.

Copies are views: a new sequence's cache starts as slices of the prefix's arrays, and mlx-lm's
KVCache grows by concatenating new storage onto them, never by writing into them, so the prefix
is never changed by the sequences that use it.
"""

from __future__ import annotations

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
    keys: list[mx.array]  # per layer [1, heads, length, head_dim]
    values: list[mx.array]
    length: int
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
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

    def keep(self, pid: int, layers: list[Any], length: int) -> bool:
        """Keep the first `length` positions of `layers` (a sequence's own caches) as `pid`.
        False, keeping nothing, when a cache is not a plain KVCache or holds fewer positions."""
        if not layers or not all(type(c) is KVCache and c.keys is not None and c.offset >= length for c in layers):
            return False
        if pid not in self._held and len(self._held) >= MAX_PREFIXES:
            self.evict_one()
        # Contiguous copies: the sequence's own (larger, step-grown) storage is freed with it.
        keys = [mx.contiguous(c.keys[..., :length, :]) for c in layers]
        values = [mx.contiguous(c.values[..., :length, :]) for c in layers]
        mx.eval(keys, values)
        self._held[pid] = _Prefix(keys, values, length)
        return True

    def seed(self, pid: int, length: int) -> list[KVCache] | None:
        """Fresh caches holding the prefix's first `length` positions; None when it is not held
        or is shorter."""
        p = self._held.get(pid)
        if p is None or length > p.length:
            return None
        p.last_used = time.monotonic()
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
