"""The mlx thread's side of a node: one Forward in, one message out.

Unpacks a micro-batch, runs each chunk through the stage, and packs the result: the hidden
states for the next node, or (last stage) the sampled tokens for the gateway. Every method runs
on the node's single mlx thread; nothing here knows about sockets.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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
from zmqinfer.node.memory import give_back_memory
from zmqinfer.node.sampling import SeqSampler, sample_batch, tokenizer_size
from zmqinfer.node.simulated import SimulatedCost, SimulatedStage
from zmqinfer.node.stage import Stage, StageError
from zmqinfer.node.tensors import from_wire, to_wire
from zmqinfer.protocol.wire import Chunk, Forward, Sample, Sampled, SeqId

Failure = tuple[tuple[SeqId, ...], str]


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
    max_kv_tokens: int | None  # refuse sequences past this many cached tokens; None: no cap
    def kv_tokens(self) -> int: ...
    @property
    def seq_ids(self) -> tuple[SeqId, ...]: ...
    def release(self, seqs: list[SeqId] | tuple[SeqId, ...]) -> None: ...
    def expire_idle(self, now: float | None = None) -> list[SeqId]: ...
    def forward(self, seq: SeqId, start: int, tokens: mx.array, hidden: mx.array | None,
                want_logits: bool) -> mx.array: ...
    def prefill_batch(self, seqs: list[SeqId], tokens: list[mx.array],
                      hidden: list[mx.array] | None) -> list[mx.array]: ...
    def decode(self, group: int, seqs: list[SeqId], starts: list[int], tokens: mx.array,
               hidden: mx.array | None) -> mx.array: ...


class Worker:
    """Owned by the mlx thread. The event loop reads only the plain counters below, which the
    mlx thread writes after each operation: never the stage's dicts while they change."""

    def __init__(self, simulate: SimulatedCost | None = None) -> None:
        self.simulate = simulate  # sleep this cost instead of computing (node/simulated.py)
        self.stage: Slice | None = None
        self.fingerprint = ""
        self.samplers: dict[SeqId, SeqSampler] = {}
        self.busy_seconds = 0.0  # compute time since start; the heartbeat reports it
        self.token_limit: int | None = None  # the tokenizer's size: the last stage samples below it
        self.steps = 0  # Forwards run since start
        self.tokens = 0  # token rows computed since start
        self.shard_bytes = 0  # the loaded shard's weights
        self.sequences = 0  # live KV caches
        self.kv_tokens = 0  # token positions they hold (groups padded)
        self.kv_bytes = 0  # bytes they hold

    def _publish(self) -> None:
        """After every change: the counters, and, once no sequence is left, mlx's cache of freed
        buffers handed back (an idle node keeps its shard, not the last batch's activations and
        caches: 16 sequences left the middle node of a 3-node ring ~330 MiB over its shard)."""
        st = self.stage
        if st is not None and st.sequences == 0 and self.sequences:
            give_back_memory()
        self.shard_bytes = st.shard_bytes if st else 0
        self.sequences = st.sequences if st else 0
        self.kv_tokens = st.kv_tokens() if st else 0
        self.kv_bytes = st.kv_bytes if st else 0

    def cap_kv(self, budget_bytes: int, cache_bytes: int | None = None) -> int:
        """Refuse new sequences beyond `budget_bytes` of KV cache; returns the cap in tokens.
        `cache_bytes`: what mlx's allocator may keep of freed buffers (by default it keeps them
        all, and a node under a memory limit grew ~40% past its KV: caches of every size)."""
        assert self.stage is not None
        if cache_bytes is not None:
            mx.set_cache_limit(cache_bytes)
        per_token = KV_COPY_FACTOR * self.stage.kv_bytes_per_token
        if per_token == 0:  # a simulated stage: its caches hold nothing
            return 0
        self.stage.max_kv_tokens = max(0, budget_bytes) // per_token
        return self.stage.max_kv_tokens

    @property
    def layers(self) -> int:
        return self.stage.end - self.stage.start if self.stage else 0

    def load(self, model: str, start: int, end: int) -> None:
        """Load layers [start, end) of `model` (embedded default, local directory or hub id).
        A hub model needs only the weight files holding these layers in the local cache."""
        self.stage, self.samplers = None, {}  # drop the old shard first: memory is the limit
        self._publish()
        give_back_memory()
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
        self.stage = (Stage(path, start, end) if self.simulate is None
                      else SimulatedStage(path, start, end, self.simulate))
        self.token_limit = tokenizer_size(path) if self.stage.is_last else None
        self.fingerprint = model_fingerprint(path)
        self._publish()

    def release(self, seqs: tuple[SeqId, ...]) -> None:
        if self.stage is not None:
            self.stage.release(seqs)
        for s in seqs:
            self.samplers.pop(s, None)
        self._publish()

    def expire_idle(self) -> list[SeqId]:
        """Free sequences whose Release never came (a gateway that died mid-request)."""
        dead = self.stage.expire_idle() if self.stage is not None else []
        for s in dead:
            self.samplers.pop(s, None)
        self._publish()
        return dead

    def drop_sequences(self) -> None:
        """A new epoch: the old ring's sequences are gone, their caches with them."""
        if self.stage is not None:
            self.stage.release(list(self.stage.seq_ids))
        self.samplers.clear()
        self._publish()

    def run(self, fwd: Forward) -> tuple[Forward | Sampled, list[Failure]]:
        """The message to send on, and the chunks that failed (dropped from it).

        New sequences' first prefill chunks run as one batch, other prefill chunks one by one on
        their sequences' own caches; the decode chunks run as one batch of the Forward's group.
        The outgoing Forward lists the prefill chunks first, then the decode chunks, with tokens
        and hidden rows in that same order.
        """
        assert self.stage is not None
        t0 = time.perf_counter()
        step = _unpack(fwd)                     # 1. frames -> arrays, chunks by kind
        out = _Out()
        self._prefill(step, out)                # 2. each prefill chunk on its own cache
        decoded = self._decode(fwd.group, step, out)  # 3. the group's decode chunks as one batch
        if decoded is not None and self.stage.is_last:
            self._sample(step, decoded, out)    # 4. last stage: tokens for the gateway
        msg = self._pack(fwd, out)              # 5. the next stage's Forward, or the Sampled
        self._publish()
        self.busy_seconds += time.perf_counter() - t0
        self.steps += 1
        self.tokens += sum(c.length for c in fwd.chunks)
        return msg, out.failures

    def _prefill(self, step: _Step, out: _Out) -> None:
        """New sequences' first chunks in one batched forward (as batch_generate prefills);
        later chunks, and all of them should the batch be refused, one by one."""
        assert self.stage is not None
        fresh = [(c, at) for c, at in step.prefill if c.start == 0]
        rest = [(c, at) for c, at in step.prefill if c.start != 0]
        if len(fresh) > 1:
            sls = [slice(at, at + c.length) for c, at in fresh]
            try:
                hs = self.stage.prefill_batch([c.seq for c, _ in fresh], [step.tokens[sl] for sl in sls],
                                              [step.hidden[sl] for sl in sls] if step.hidden is not None else None)
            except StageError:  # one bad chunk must fail alone: each on its own says which
                rest = fresh + rest
            else:
                for (chunk, _), sl, h in zip(fresh, sls, hs):
                    self._observe(chunk, step.tokens[sl], out.failures)
                    out.add(chunk, step.tokens[sl], h)
        else:
            rest = fresh + rest
        for chunk, at in rest:
            sl = slice(at, at + chunk.length)
            hidden = step.hidden[sl] if step.hidden is not None else None
            try:
                h = self.stage.forward(chunk.seq, chunk.start, step.tokens[sl], hidden, want_logits=False)
            except StageError as e:
                self.stage.release((chunk.seq,))  # a sequence out of step is unrecoverable here
                out.failures.append(((chunk.seq,), str(e)))
                continue
            self._observe(chunk, step.tokens[sl], out.failures)
            out.add(chunk, step.tokens[sl], h)

    def _decode(self, group: int, step: _Step, out: _Out) -> mx.array | None:
        """The group's step: hidden rows (or logits on the last stage) in `step.decode` order;
        None when there is nothing to decode or the group failed."""
        assert self.stage is not None
        bad = [c for c, _ in step.decode if c.length != 1]
        out.failures += [((c.seq,), f"sequence {c.seq}: a decode chunk must be 1 token") for c in bad]
        step.decode = [(c, at) for c, at in step.decode if c.length == 1]
        if not step.decode:
            return None
        rows = mx.array([at for _, at in step.decode], dtype=mx.int32)
        step.decode_tokens = step.tokens[rows]
        seqs = [c.seq for c, _ in step.decode]
        try:
            h = self.stage.decode(group, seqs, [c.start for c, _ in step.decode], step.decode_tokens,
                                  step.hidden[rows] if step.hidden is not None else None)
        except StageError as e:  # the whole group is out of step: drop it here, tell the gateway
            self.stage.release(seqs)
            out.failures.append((tuple(seqs), str(e)))
            return None
        for chunk, _ in step.decode:
            out.chunks.append(chunk)
        out.tokens.append(step.decode_tokens)
        out.hidden.append(h)
        return h

    def _sample(self, step: _Step, logits: mx.array, out: _Out) -> None:
        rows: list[int] = []
        samplers: list[SeqSampler] = []
        for j, (chunk, _) in enumerate(step.decode):
            sampler = self._observe(chunk, step.decode_tokens[j : j + 1], out.failures)
            if sampler is not None:
                rows.append(j)
                samplers.append(sampler)
        if samplers:
            picked = logits if len(rows) == len(step.decode) else logits[mx.array(rows)]
            out.samples += sample_batch(samplers, picked, self.token_limit)

    def _pack(self, fwd: Forward, out: _Out) -> Forward | Sampled:
        assert self.stage is not None
        if self.stage.is_last:
            return Sampled(epoch=fwd.epoch, step=fwd.step, samples=tuple(out.samples))
        h = mx.concatenate(out.hidden) if out.hidden else mx.zeros((0, self.stage.hidden_size), dtype=mx.float32)
        toks = mx.concatenate(out.tokens) if out.tokens else mx.zeros((0,), dtype=mx.int32)
        return Forward(epoch=fwd.epoch, step=fwd.step, chunks=tuple(out.chunks), group=fwd.group,
                       tokens=to_wire(toks), hidden=to_wire(h))

    def _observe(self, chunk: Chunk, toks: mx.array, failures: list[Failure]) -> SeqSampler | None:
        """Last stage: feed the chunk's tokens to its sequence's sampler (made on first sight)."""
        if not self.stage or not self.stage.is_last:
            return None
        sampler = self.samplers.get(chunk.seq)
        if chunk.params is not None:
            sampler = self.samplers[chunk.seq] = SeqSampler(chunk.seq, chunk.params)
        if sampler is None:
            failures.append(((chunk.seq,), f"sequence {chunk.seq}: no sampling parameters"))
            return None
        sampler.observe(toks)
        return sampler


@dataclass
class _Step:
    """An incoming Forward, unpacked: its chunks by kind, each with its first row in `tokens`."""

    tokens: mx.array  # int32 [rows]
    hidden: mx.array | None  # [rows, hidden] from the previous stage; None on the first
    prefill: list[tuple[Chunk, int]]
    decode: list[tuple[Chunk, int]]
    decode_tokens: mx.array = field(default_factory=lambda: mx.zeros((0,), dtype=mx.int32))


@dataclass
class _Out:
    """What a step produced: the chunks that went through, their rows, and the samples."""

    chunks: list[Chunk] = field(default_factory=list)
    tokens: list[mx.array] = field(default_factory=list)
    hidden: list[mx.array] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def add(self, chunk: Chunk, tokens: mx.array, hidden: mx.array) -> None:
        self.chunks.append(chunk)
        self.tokens.append(tokens)
        self.hidden.append(hidden)


def _unpack(fwd: Forward) -> _Step:
    starts = list(itertools.accumulate((c.length for c in fwd.chunks), initial=0))
    return _Step(from_wire(fwd.tokens), from_wire(fwd.hidden) if fwd.hidden is not None else None,
                 [(c, starts[i]) for i, c in enumerate(fwd.chunks) if not c.sample],
                 [(c, starts[i]) for i, c in enumerate(fwd.chunks) if c.sample])
