"""Loading a stage: the directory that holds layers [start, end) of a model (the embedded
default, a local directory, or a hub id read from the local cache only), the stage over them
(real, or simulated), and the KV cap the node's memory allows. Runs on the node's mlx thread,
between steps; the worker then drives what it was given (`Worker.install`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from zmqinfer.model.resolve import (
    DEFAULT_MODEL,
    HUB_ID,
    ModelNotFound,
    model_fingerprint,
    resolve_model,
)
from zmqinfer.model.shards import fetch_shard, shard_weight_files
from zmqinfer.model.size import KV_COPY_FACTOR
from zmqinfer.node.grammar import grammar_tokenizer
from zmqinfer.node.sampling import tokenizer_size
from zmqinfer.node.simulated import SimulatedCost, SimulatedStage
from zmqinfer.node.stage import Stage
from zmqinfer.protocol.wire import KVProfile, SeqId


class Slice(Protocol):
    """What the worker drives: a real Stage, or a SimulatedStage standing in for a device."""

    start: int
    end: int
    is_first: bool
    is_last: bool
    hidden_size: int
    hidden_dtype: str  # what hidden states arrive and leave as
    vocab_size: int  # embedding rows: every token id must be below it
    shard_bytes: int

    @property
    def sequences(self) -> int: ...
    @property
    def kv_bytes(self) -> int: ...
    kv_bytes_per_token: int  # one token's K and V over these layers
    @property
    def kv(self) -> KVProfile | None: ...  # one sequence's caches by kind, measured; None: simulated
    max_kv_tokens: int | None  # refuse sequences past this many cached tokens; None: no cap
    def kv_tokens(self) -> int: ...
    @property
    def seq_ids(self) -> tuple[SeqId, ...]: ...
    def release(self, seqs: list[SeqId] | tuple[SeqId, ...]) -> None: ...
    def seed(self, seq: SeqId, prefix: int, start: int) -> None: ...  # start from a cached prefix
    def keep(self, seq: SeqId, prefix: int, length: int) -> bool: ...  # cache a sequence's prefix
    def drop_prefixes(self, prefixes: tuple[int, ...] | None) -> None: ...  # None: all
    def expire_idle(self, now: float | None = None) -> list[SeqId]: ...
    def forward(self, seq: SeqId, start: int, tokens: mx.array, hidden: mx.array | None,
                want_logits: bool) -> mx.array: ...
    def prefill_batch(self, seqs: list[SeqId], tokens: list[mx.array], hidden: list[mx.array] | None,
                      starts: list[int] | None = None) -> list[mx.array]: ...
    def decode(self, group: int, seqs: list[SeqId], starts: list[int], tokens: mx.array,
               hidden: mx.array | None) -> mx.array: ...
    rollback: bool  # its caches can drop positions at any length: drafts may run through it
    def verify(self, seq: SeqId, start: int, trim: int, tokens: mx.array,
               hidden: mx.array | None) -> mx.array: ...  # a decode chunk with drafted tokens


@dataclass(frozen=True)
class Shard:
    """A loaded stage and what the worker needs beside it."""

    stage: Slice
    token_limit: int | None  # the tokenizer's size on the last stage: it samples below it
    fingerprint: str  # the model's, as the gateway checks it
    grammar_tokenizer: Any = None  # the last stage's, for grammar-constrained sampling (grammar.py)


def load_shard(model: str, start: int, end: int, simulate: SimulatedCost | None = None) -> Shard:
    """Load layers [start, end) of `model` (embedded default, local directory or hub id).
    A hub model needs only the weight files holding these layers in the local cache."""
    if model == DEFAULT_MODEL or Path(model).expanduser().exists() or not HUB_ID.fullmatch(model):
        path = resolve_model(model)
    else:  # a hub id: from the local cache only, and only this stage's weight files
        path = fetch_shard(model, start, end, local_files_only=True)
        # The hub vouches for a snapshot's completeness only when it cached the repo's file
        # list; checking ourselves keeps a missing file from loading as random weights
        # (load_shard_model trusts the weight index).
        if missing := [f for f in shard_weight_files(path, start, end) if not (path / f).is_file()]:
            raise ModelNotFound(
                f"{model!r}: layers [{start}, {end}) need {', '.join(missing)}, which the local "
                f"Hugging Face cache lacks; fetch them with `zmqinfer model fetch {model} "
                f"--layers {start}:{end}`")
    stage: Slice = (Stage(path, start, end) if simulate is None
                    else SimulatedStage(path, start, end, simulate))
    last = stage.is_last
    return Shard(stage, tokenizer_size(path) if last else None, model_fingerprint(path),
                 grammar_tokenizer(path) if last else None)


def cap_kv(stage: Slice, budget_bytes: int, cache_bytes: int | None = None) -> int:
    """Refuse new sequences beyond `budget_bytes` of KV cache; returns the cap in tokens.
    `cache_bytes`: what mlx's allocator may keep of freed buffers (by default it keeps them
    all, and a node under a memory limit grew ~40% past its KV: caches of every size)."""
    if cache_bytes is not None:
        mx.set_cache_limit(cache_bytes)
    per_token = KV_COPY_FACTOR * stage.kv_bytes_per_token
    if per_token == 0:  # a simulated stage: its caches hold nothing
        return 0
    stage.max_kv_tokens = max(0, budget_bytes) // per_token
    return stage.max_kv_tokens
