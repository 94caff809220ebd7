"""KV-cache memory the ring can hold, and what each admitted sequence may cost of it.

    plan time:  each stage's free memory - its weights - RUNTIME_HEADROOM_BYTES = its KV room
                -> tokens of KV the stage can hold; the ring holds the least of them
    admission:  a sequence costs prompt + max_tokens tokens at most (the gateway knows both),
                in whole cache steps; the budget is halved for caches that are copied as they grow;
                a decode group is left-padded to its longest member (mlx-lm BatchKVCache), so a
                group of n costs n x its longest bound
    join:       a prefilled sequence goes to the group it makes least padded (closest lengths)

Pure arithmetic: no sockets, no clocks. The scheduler admits a sequence only while the sum of
every group's padded cost and every prefilling sequence's bound stays within the ring's budget,
so a node is never asked to hold more KV than it said it had room for.
"""

from __future__ import annotations

from collections.abc import Sequence

from zmqinfer.gateway.placement import NodeCapacity, Placement
from zmqinfer.model.size import KV_COPY_FACTOR, ModelSize, kv_positions

# KV every stage must have room for on top of its weights when the ring is planned: one long
# request (1024 tokens: a long chat turn). More is admitted when the memory is there; a node
# that cannot hold even this much does not get those layers.
KV_RESERVE_TOKENS = 1024
# What a stage needs beside weights and KV while it computes: mlx scratch buffers of one
# forward (a 256-token prefill chunk's attention scores are ~20 MB for a 2048-context 9-head
# model). The node's idle runtime is already out of its free memory. Kept at 32 MiB so that two
# nodes under test_failover's 560 MB limit still hold the embedded model (~7 MB to spare at the
# highest runtime measured there).
RUNTIME_HEADROOM_BYTES = 32 << 20


def ring_kv_tokens(placements: Sequence[Placement], capacity: Sequence[NodeCapacity],
                   size: ModelSize) -> int | None:
    """Tokens of KV cache (per sequence position, summed over sequences) the whole ring can
    hold: the least over its stages. None when the model's KV size is unknown (no limit)."""
    if size.kv_bytes_per_token <= 0 or not placements:
        return None
    free = {c.node: c.free_bytes for c in capacity}
    n = size.n_layers
    tokens = []
    for p in placements:
        weights = size.stage_bytes(p.n_layers, p.start == 0, p.end == n)
        room = free.get(p.node, 0) - weights - RUNTIME_HEADROOM_BYTES
        tokens.append(max(0, room) // (KV_COPY_FACTOR * size.kv_bytes_per_token * p.n_layers))
    return min(tokens)


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
