"""The mlx thread's side of a node: one Forward in, one message out.

Unpacks a micro-batch, runs each chunk through the stage, and packs the result: the hidden
states for the next node, or (last stage) the sampled tokens for the gateway. Every method runs
on the node's single mlx thread; nothing here knows about sockets.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx

from zmqinfer.node.drafts import judge
from zmqinfer.node.loading import Shard, Slice
from zmqinfer.node.memory import give_back_memory
from zmqinfer.node.sampling import SeqSampler, sample_batch
from zmqinfer.node.stage import StageError
from zmqinfer.node.tensors import from_wire, to_wire
from zmqinfer.protocol.wire import Chunk, Forward, Keep, Sample, Sampled, SeqId

Failure = tuple[tuple[SeqId, ...], str]


class Worker:
    """Owned by the mlx thread. The event loop reads only the plain counters below, which the
    mlx thread writes after each operation: never the stage's dicts while they change."""

    def __init__(self) -> None:
        self.stage: Slice | None = None
        self.fingerprint = ""
        self.samplers: dict[SeqId, SeqSampler] = {}
        self.busy_seconds = 0.0  # compute time since start; the heartbeat reports it
        self.token_limit: int | None = None  # the tokenizer's size: the last stage samples below it
        self.grammar_tokenizer: object = None  # the last stage's, for grammars (grammar.py)
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

    @property
    def layers(self) -> int:
        return self.stage.end - self.stage.start if self.stage else 0

    def unload(self) -> None:
        """Drop the shard and its sequences (before loading another: memory is the limit)."""
        self.stage, self.samplers = None, {}
        self._publish()
        give_back_memory()

    def install(self, shard: Shard) -> None:
        """Drive `shard` from the next Forward on (loading.py loaded it)."""
        self.stage, self.samplers = shard.stage, {}
        self.token_limit, self.fingerprint = shard.token_limit, shard.fingerprint
        self.grammar_tokenizer = shard.grammar_tokenizer
        self._publish()

    def release(self, seqs: tuple[SeqId, ...], keep: tuple[Keep, ...] = (), drop: tuple[int, ...] = ()) -> None:
        """Free `seqs`, first keeping the prefixes `keep` names, and drop the prefixes `drop`."""
        if self.stage is not None:
            self.stage.drop_prefixes(drop)
            for k in keep:
                self.stage.keep(k.seq, k.prefix, k.length)
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
            self.stage.drop_prefixes(None)
        self.samplers.clear()
        self._publish()

    def run(self, fwd: Forward) -> tuple[Forward | Sampled, list[Failure]]:
        """The message to send on, and the chunks that failed (dropped from it).

        New sequences' first prefill chunks run as one batch, other prefill chunks one by one on
        their sequences' own caches; decode chunks with drafted tokens (or a `trim`) one by one
        on their own caches (speculation); the plain decode chunks as one batch of the Forward's
        group. The outgoing Forward lists the chunks in that order, with tokens and hidden rows
        in that same order.
        """
        assert self.stage is not None
        t0 = time.perf_counter()
        step = _unpack(fwd)                     # 1. frames -> arrays, chunks by kind
        out = _Out()
        self._prefill(step, out)                # 2. each prefill chunk on its own cache
        self._verify(step, out)                 # 3. drafted decode chunks, each on its own cache
        decoded = self._decode(fwd.group, step, out)  # 4. the group's decode chunks as one batch
        if decoded is not None and self.stage.is_last:
            self._sample(step, decoded, out)    # 5. last stage: tokens for the gateway
        msg = self._pack(fwd, out)              # 6. the next stage's Forward, or the Sampled
        self._publish()
        self.busy_seconds += time.perf_counter() - t0
        self.steps += 1
        self.tokens += sum(c.length for c in fwd.chunks)
        return msg, out.failures

    def _prefill(self, step: _Step, out: _Out) -> None:
        """The prefill chunks in one batched forward (as mlx-lm's BatchGenerator prefills, cached
        prompts too: a chunk starting from a cached prefix is seeded from it first); all of them
        one by one should the batch be refused, so that a bad chunk fails alone."""
        assert self.stage is not None
        todo: list[tuple[Chunk, int]] = []
        for chunk, at in step.prefill:
            try:
                if chunk.prefix is not None:
                    self.stage.seed(chunk.seq, chunk.prefix, chunk.start)
            except StageError as e:
                self._fail(chunk, e, out)
            else:
                todo.append((chunk, at))
        sls = [slice(at, at + c.length) for c, at in todo]
        if len(todo) > 1:
            try:
                hs = self.stage.prefill_batch([c.seq for c, _ in todo], [step.tokens[sl] for sl in sls],
                                              [step.hidden[sl] for sl in sls] if step.hidden is not None else None,
                                              [c.start for c, _ in todo])
            except StageError:
                pass
            else:
                for (chunk, _), sl, h in zip(todo, sls, hs):
                    self._observe(chunk, step.tokens[sl], out.failures)
                    out.add(chunk, step.tokens[sl], h)
                return
        for (chunk, _), sl in zip(todo, sls):
            try:
                h = self.stage.forward(chunk.seq, chunk.start, step.tokens[sl],
                                       step.hidden[sl] if step.hidden is not None else None, want_logits=False)
            except StageError as e:
                self._fail(chunk, e, out)
                continue
            self._observe(chunk, step.tokens[sl], out.failures)
            out.add(chunk, step.tokens[sl], h)

    def _fail(self, chunk: Chunk, e: StageError, out: _Out) -> None:
        """A sequence out of step is unrecoverable here: its caches go, the gateway replays it."""
        assert self.stage is not None
        self.stage.release((chunk.seq,))
        out.failures.append(((chunk.seq,), str(e)))

    def _verify(self, step: _Step, out: _Out) -> None:
        """Decode chunks with drafted tokens or a `trim` (speculation): each alone on its own
        caches, before the group's batch (a verify takes its sequence out of the group first).
        The last stage judges the drafts (node/drafts.py) into 1 to k + 1 samples."""
        assert self.stage is not None
        for chunk, at in step.verify:
            sl = slice(at, at + chunk.length)
            toks = step.tokens[sl]
            try:
                h = self.stage.verify(chunk.seq, chunk.start, chunk.trim, toks,
                                      step.hidden[sl] if step.hidden is not None else None)
            except StageError as e:
                self._fail(chunk, e, out)
                continue
            if self.stage.is_last:
                # Only the chunk's first token is the sequence's; the drafts are guesses, and a
                # sampler that verifies drafts keeps no history they would have to enter.
                sampler = self._observe(chunk, toks[:1], out.failures)
                if sampler is None:
                    continue
                if not sampler.verifies_drafts:  # the gateway never drafts for these
                    self._fail(chunk, StageError(f"sequence {chunk.seq}: drafted tokens for a request "
                                                 "with a grammar, penalties or logprobs"), out)
                    continue
                drafts = [int(t) for t in cast(list[int], toks[1:].tolist())]
                out.samples += judge(sampler, h, drafts, self.token_limit)
            out.add(chunk, toks, h)

    def _decode(self, group: int, step: _Step, out: _Out) -> mx.array | None:
        """The group's step: hidden rows (or logits on the last stage) in `step.decode` order;
        None when there is nothing to decode or the group failed."""
        assert self.stage is not None
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
            try:
                sampler = self.samplers[chunk.seq] = SeqSampler(chunk.seq, chunk.params,
                                                                self.grammar_tokenizer)
            except ValueError as e:  # a grammar this node cannot enforce: the request fails
                failures.append(((chunk.seq,), f"sequence {chunk.seq}: {e}"))
                return None
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
    verify: list[tuple[Chunk, int]]  # decode chunks with drafted tokens or a trim
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
    drafted = [c.sample and (c.length > 1 or c.trim > 0) for c in fwd.chunks]
    return _Step(from_wire(fwd.tokens), from_wire(fwd.hidden) if fwd.hidden is not None else None,
                 [(c, starts[i]) for i, c in enumerate(fwd.chunks) if not c.sample],
                 [(c, starts[i]) for i, c in enumerate(fwd.chunks) if c.sample and not drafted[i]],
                 [(c, starts[i]) for i, c in enumerate(fwd.chunks) if drafted[i]])
