"""What a model costs in memory, stage by stage: the numbers placement plans with."""

from __future__ import annotations

from dataclasses import dataclass


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

    def stage_bytes(self, n: int, first: bool, last: bool, kv_tokens: int = 0) -> int:
        """Weights (+ KV reserve) of a stage holding `n` layers, first and/or last."""
        extra = self.shared_bytes + (self.embed_bytes if first else 0)
        if last:
            extra += self.head_bytes + (self.embed_bytes if self.tied and not first else 0)
        return extra + n * (self.layer_bytes + kv_tokens * self.kv_bytes_per_token)
