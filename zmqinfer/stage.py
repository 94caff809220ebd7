"""One node's slice of the model: layers [start, end), their KV caches per sequence, the forward.

The first stage also owns the token embedding; the last owns the final norm and the head (and
the embedding again when the head is tied to it). Everything else is dropped before a single
weight is read: mlx-lm loads lazily, so weights that nobody references are never read from disk
and a node's memory is its shard plus its KV caches, never the whole model.

The forward mirrors mlx-lm's own `LlamaModel.__call__` (embed -> layers with the causal mask ->
norm -> head) operation for operation, so a split ring computes bit-identical logits to the
unsplit model. Only the mlx thread may touch a Stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.utils import load_model

from .wire import SeqId

# Families whose inner model is exactly embed -> layers -> norm (checked against mlx-lm 0.32).
# Others (gemma scales its embedding, MoE/SSM hybrids keep other caches) are refused, not guessed.
SUPPORTED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# A sequence whose cache has not been touched for this long is freed even if its Release never
# came (a gateway that died mid-request): KV caches must not leak. Long enough for any step.
IDLE_CACHE_SECONDS = 600.0


class StageError(Exception):
    """A Forward this stage cannot run (unknown sequence, position mismatch, bad shapes)."""


@dataclass
class _SeqCache:
    layers: list[Any]
    offset: int = 0
    last_used: float = field(default_factory=time.monotonic)


class Stage:
    def __init__(self, model_path: Path, start: int, end: int) -> None:
        model, config = load_model(Path(model_path), lazy=True)
        family = config.get("model_type", "?")
        if family not in SUPPORTED_FAMILIES:
            raise StageError(f"model family {family!r} is not supported for pipeline splitting "
                             f"(supported: {', '.join(sorted(SUPPORTED_FAMILIES))})")
        inner = model.model
        n_layers = len(inner.layers)
        if not 0 <= start < end <= n_layers:
            raise StageError(f"layer range [{start}, {end}) is outside the model's {n_layers} layers")
        self.start, self.end, self.n_layers = start, end, n_layers
        self.is_first, self.is_last = start == 0, end == n_layers
        self.tied = bool(getattr(model.args, "tie_word_embeddings", False))
        self.sliding_window = getattr(inner, "sliding_window", None)

        self.layers = inner.layers[start:end]
        self.embed = inner.embed_tokens if self.is_first or (self.is_last and self.tied) else None
        self.norm = inner.norm if self.is_last else None
        self.head = None
        if self.is_last:
            self.head = inner.embed_tokens.as_linear if self.tied else model.lm_head
        # Drop every other module so their lazy weights are never evaluated (never read).
        kept = nn.Module()
        kept.layers = self.layers
        if self.embed is not None:
            kept.embed = self.embed
        if self.norm is not None:
            kept.norm = self.norm
        if self.is_last and not self.tied:
            kept.lm_head = model.lm_head
        self._kept = kept
        mx.eval(kept.parameters())
        self.shard_bytes = sum(v.nbytes for _, v in tree_flatten(kept.parameters()))
        self.hidden_size = int(config["hidden_size"])
        self._caches: dict[SeqId, _SeqCache] = {}

    # ---- KV caches --------------------------------------------------------------------------

    def _new_cache(self) -> list[Any]:
        return [RotatingKVCache(max_size=self.sliding_window) if getattr(l, "use_sliding", False)
                else KVCache() for l in self.layers]

    def _cache_for(self, seq: SeqId, start: int) -> _SeqCache:
        c = self._caches.get(seq)
        if c is None:
            if start != 0:
                raise StageError(f"sequence {seq}: chunk at position {start} but no cache here "
                                 "(released, expired or never started)")
            c = self._caches[seq] = _SeqCache(self._new_cache())
        elif c.offset != start:
            raise StageError(f"sequence {seq}: chunk at position {start}, cache holds {c.offset}")
        c.last_used = time.monotonic()
        return c

    def release(self, seqs: list[SeqId] | tuple[SeqId, ...]) -> None:
        for s in seqs:
            self._caches.pop(s, None)

    def expire_idle(self, now: float | None = None) -> list[SeqId]:
        now = time.monotonic() if now is None else now
        dead = [s for s, c in self._caches.items() if now - c.last_used > IDLE_CACHE_SECONDS]
        self.release(dead)
        return dead

    @property
    def sequences(self) -> int:
        return len(self._caches)

    @property
    def seq_ids(self) -> tuple[SeqId, ...]:
        return tuple(self._caches)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, seq: SeqId, start: int, tokens: mx.array, hidden: mx.array | None,
                want_logits: bool) -> mx.array:
        """Run one chunk of one sequence through this stage's layers.

        tokens: int32 [n]; hidden: [n, hidden_size] from the previous stage (None on stage 0).
        Returns the hidden states [n, hidden_size] for the next stage, or, on the last stage,
        the logits of the chunk's last position [1, vocab] (only when `want_logits`; an
        unsampled prefill chunk skips the head entirely).
        """
        n = tokens.shape[0]
        cache = self._cache_for(seq, start)
        if self.is_first:
            h = self.embed(tokens[None])
        else:
            if hidden is None or hidden.shape != (n, self.hidden_size):
                raise StageError(f"sequence {seq}: hidden state {None if hidden is None else hidden.shape}"
                                 f" does not match {n} tokens x {self.hidden_size}")
            h = hidden[None]
        masks: dict[bool, Any] = {}
        for layer, c in zip(self.layers, cache.layers):
            sliding = bool(getattr(layer, "use_sliding", False))
            if sliding not in masks:
                masks[sliding] = create_attention_mask(
                    h, c, window_size=self.sliding_window if sliding else None)
            h = layer(h, masks[sliding], cache=c)
        cache.offset += n
        if not self.is_last:
            return h[0]
        if not want_logits:
            mx.eval([c.state for c in cache.layers])
            return mx.zeros((0,), dtype=h.dtype)
        return self.head(self.norm(h[:, -1:, :]))[:, -1, :]
