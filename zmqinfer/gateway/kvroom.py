"""The KV cache a ring holds, by cache type: each stage's room in bytes and what one sequence's
caches cost there (`KVProfile`, measured by the stage on mlx-lm's own caches and reported when it
loads). A full-attention cache grows with every position, a sliding-window one stops at its
window, an SSM state costs the same for any length; so admission asks every stage whether the
admitted sequences fit, rather than counting positions against one number.

A decode group is left-padded to its longest member (mlx-lm's batch caches): n members cost n
sequences of the longest one's length. Cached prefixes are counted at the full per-position cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from zmqinfer.gateway.placement import RUNTIME_HEADROOM_BYTES, NodeCapacity, Placement
from zmqinfer.model.size import KV_COPY_FACTOR, ModelSize, sequence_bytes
from zmqinfer.protocol.wire import KVProfile

# Positions at which one sequence alone counts as unlimited (a ring of sliding windows and SSM
# states only): past any context length a model has.
UNBOUNDED_POSITIONS = 1 << 40


@dataclass(frozen=True)
class StageRoom:
    room_bytes: int  # KV the stage may hold (already divided by KV_COPY_FACTOR)
    kv: KVProfile  # one sequence's caches there


@dataclass(frozen=True)
class KVRoom:
    stages: tuple[StageRoom, ...]

    @classmethod
    def of_tokens(cls, tokens: int) -> KVRoom:
        """A ring that holds `tokens` positions of full attention (one byte each)."""
        return cls((StageRoom(tokens, KVProfile(token_bytes=1)),))

    def fits(self, groups: Iterable[Sequence[int]], cached_tokens: int = 0) -> bool:
        """Whether every stage holds these groups (each its members' bounds in positions; a
        sequence alone is a group of one) and `cached_tokens` positions of cached prefixes."""
        padded = [(len(g), max(g)) for g in groups if g]
        for s in self.stages:
            held = sum(n * sequence_bytes(s.kv, longest) for n, longest in padded)
            if held + cached_tokens * s.kv.position_bytes > s.room_bytes:
                return False
        return True

    def longest(self) -> int | None:
        """The most positions one sequence alone may hold; None: any (its costs stop growing)."""
        if self.fits([[UNBOUNDED_POSITIONS]]):
            return None
        lo, hi = 0, UNBOUNDED_POSITIONS  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits([[mid]]) else (lo, mid)
        return lo


def ring_room(placements: Sequence[Placement], capacity: Sequence[NodeCapacity], size: ModelSize,
              measured: dict[str, KVProfile | None]) -> KVRoom | None:
    """Each stage's room (its free memory at plan time less its weights and runtime headroom)
    and its caches' cost: as the stage measured it, else (a stage that measures none: simulated)
    config.json's per-token estimate over its layers. None when neither knows (no limit)."""
    free = {c.node: c.free_bytes for c in capacity}
    stages = []
    for p in placements:
        kv = measured.get(p.node) or KVProfile(token_bytes=size.kv_bytes_per_token * p.n_layers)
        if kv.position_bytes <= 0 and kv.state_bytes <= 0:
            continue  # holds no cache at all (nemotron_h's MLP layers only)
        room = free.get(p.node, 0) - size.stage_bytes(p.start, p.end) - RUNTIME_HEADROOM_BYTES
        stages.append(StageRoom(max(0, room) // KV_COPY_FACTOR, kv))
    return KVRoom(tuple(stages)) if stages else None
