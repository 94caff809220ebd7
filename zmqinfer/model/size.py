"""What a model costs in memory, stage by stage: the numbers placement plans with (each layer's
weights, which differ: MoE layers beside DeepSeek's dense first ones), what one sequence's caches
cost on a stage by cache type (`sequence_bytes` of a stage's measured `KVProfile`), and what a KV
cache really costs beside its tokens (the gateway's budget and a node's own cap both count so)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zmqinfer.protocol.wire import KVProfile

# mlx-lm's KVCache and BatchKVCache grow in steps of this many positions (cache.step).
KV_STEP = 256
# What a node's memory really grows by per byte of KV its tokens hold. Growing a cache by a step
# and merging a sequence into its group's batch cache build the new arrays before the old ones
# go, and mlx frees lazily. Measured (2026-12-01, mlx 0.32 CPU, one node, 7 sequences of 256
# positions = 229 MB of KV): rss +460 MB steady over the idle node, +645 MB at the peak. Budgets
# divide by this; 2 let a node under --memory-limit 700 MB peak at 784 MB.
KV_COPY_FACTOR = 3


def kv_positions(tokens: int) -> int:
    """Positions a cache of `tokens` tokens allocates (whole steps)."""
    return -(-tokens // KV_STEP) * KV_STEP


def sequence_bytes(kv: KVProfile, positions: int) -> int:
    """What one sequence of `positions` positions holds in caches measured as `kv`. A rotating
    cache prefilled with a chunk holds its window plus the chunk for a moment (mlx-lm keeps
    window - 1 and appends the chunk): chunks are at most KV_STEP positions (the gateway's
    PREFILL_CHUNK)."""
    return (kv.token_bytes * positions + kv.state_bytes
            + sum(b * min(positions, w + KV_STEP) for b, w in kv.windows))


@dataclass(frozen=True)
class ModelSize:
    """What a stage costs in bytes, read from the weight files' headers (`model.shards.model_size`)."""

    n_layers: int
    layer_bytes: int  # one transformer layer's weights (the largest, should they differ)
    embed_bytes: int = 0  # token embedding: held by the first stage, and by the last when tied
    head_bytes: int = 0  # final norm + lm_head (only the norm when tied): the last stage
    tied: bool = False
    shared_bytes: int = 0  # tensors that belong to no layer, embedding or head: every stage
    kv_bytes_per_token: int = 0  # one layer's K+V cache for one token
    layers: tuple[int, ...] = ()  # each layer's weights as measured; empty: all are layer_bytes

    def weights(self, start: int, end: int) -> int:
        """Weights of layers [start, end)."""
        return sum(self.layers[start:end]) if self.layers else (end - start) * self.layer_bytes

    def stage_bytes(self, start: int, end: int, kv_tokens: int = 0) -> int:
        """Weights (+ KV reserve) of the stage holding layers [start, end): the embedding on the
        first, the head on the last (and the tied embedding there too)."""
        return (self.fixed_bytes(start == 0, end == self.n_layers) + self.weights(start, end)
                + (end - start) * kv_tokens * self.kv_bytes_per_token)

    def fixed_bytes(self, first: bool, last: bool) -> int:
        """What a stage holds beside its layers: shared tensors, the embedding on the first, the
        head on the last (and the tied embedding, unless it is the first too)."""
        extra = self.shared_bytes + (self.embed_bytes if first else 0)
        if last:
            extra += self.head_bytes + (self.embed_bytes if self.tied and not first else 0)
        return extra


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for src in (config, config.get("text_config") or {}):
        for k in keys:
            if isinstance(src.get(k), int) and src[k] > 0:
                return int(src[k])
    return None


def kv_bytes_per_layer_token(config: dict[str, Any], act: int) -> int:
    """One token's K+V, averaged over the layers, from config.json under each family's names.
    A family with no attention heads (mamba, mamba2) holds a constant SSM state: 0 per token.
    A hybrid's per-layer list (layer_types, hybrid_override_pattern) counts its attention layers
    only. A sliding-window layer is counted as if its window never stopped it: an upper bound,
    which placement reserves; once loaded, each stage measures its caches (`KVProfile`) and
    admission counts those."""
    # Attention heads only: mamba2's num_heads are its SSM's.
    heads = _first(config, ("num_attention_heads", "n_head"))
    if heads is None:
        return 0
    kv_heads = _first(config, ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_head_kv")) or heads
    width = _first(config, ("hidden_size", "d_model", "n_embd", "hidden_dim", "dim")) or 0
    head_dim = _first(config, ("head_dim",)) or width // heads
    per_layer = 2 * kv_heads * head_dim * act
    kinds = config.get("layer_types") or config.get("hybrid_override_pattern")
    if isinstance(kinds, (list, str)) and kinds:
        attention = sum(1 for k in kinds if "attention" in str(k) or str(k) == "*")
        return per_layer * attention // len(kinds)
    return per_layer
