"""One node's slice of the model: layers [start, end), their caches per sequence, the forward.

The first stage also owns the token embedding; the last the final norm and the head (and the
embedding when tied). Everything else is swapped out before a weight is read (mlx-lm loads
lazily): a node's memory is its shard plus its caches, never the whole model.

The forward is the model's own: `families.ModelDriver` runs mlx-lm's `Model.__call__` with the
other stages' layers passing their input through, so every family's masks, embedding scale,
norm, head and soft-capping are its own and a split ring computes bit-identical logits to the
unsplit model (tests/unit/node/test_families.py). Families not proven so are refused at load,
by name. Only the mlx thread may touch a Stage.

Caches are the model's own kinds (`make_cache`: KV, rotating, SSM arrays, lists of them), one
per cache slot of the stage's layers. Three kinds of work:
* `forward`: one chunk of one sequence (prefill), on that sequence's own caches.
* `prefill_batch`: several sequences' prefill chunks in one forward, right-padded into merged
  batch caches told each length (a sequence's own cache merged in left-padded), as mlx-lm's
  `BatchGenerator` prefills, then extracted into each sequence's own. Its hidden states agree
  with prefilling each alone to float rounding (as a group's decode does); a sequence alone goes
  through `forward`, bit-identical to mlx-lm. (Families whose recurrent layers ignore the
  lengths prefill one by one; so do chunks past 0 of caches other than plain KV.)
* `decode`: one new token for each sequence of a micro-batch group, all at once: the group keeps
  one merged (left-padded) batch cache per slot, so the weights are read once for the whole
  group. A sequence joins its group on its first decode step (its prefill caches are merged in
  with each kind's `merge`/`extend`) and leaves (`filter`) when it is released or stops
  appearing in the group's steps. A group computes each sequence's logits to float rounding of
  decoding it alone: bit-identical with mlx's bundled BLAS, ~1e-6 apart with OpenBLAS (whose
  kernels depend on the batch size), which can only move a greedy pick between near-tied tokens.
* `verify` (speculation): a decode chunk with drafted tokens runs on the sequence's own caches
  (out of its group; a plain step rejoins), after dropping the positions the last stage
  rejected (`trim`). Only caches that can always roll back (`rollback`) take drafts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, RotatingKVCache, can_trim_prompt_cache, trim_prompt_cache

from zmqinfer.model.resolve import read_config
from zmqinfer.model.facts import ONE_AT_A_TIME
from zmqinfer.model.size import sequence_bytes
from zmqinfer.model.shards import load_shard_model
from zmqinfer.node.caches import Group, SeqCache
from zmqinfer.node.families import SOLO_PREFILL, ModelDriver, flat, refusal
from zmqinfer.node.prefixes import PrefixStore
from zmqinfer.protocol.limits import MAX_HIDDEN_SIZE
from zmqinfer.protocol.wire import SeqId


# A sequence whose cache has not been touched for this long is freed even if its Release never
# came (a gateway that died mid-request): KV caches must not leak. Long enough for any step.
IDLE_CACHE_SECONDS = 600.0
# Sequences one stage holds caches for at most: the gateway admits by KV budget first, so this
# is the guard against a gateway that does not (or a flood); 256 is 4x the API's concurrency.
MAX_SEQUENCES = 256


class StageError(Exception):
    """A Forward this stage cannot run (unknown sequence, position mismatch, bad shapes)."""


class Stage:
    def __init__(self, model_path: Path, start: int, end: int, *, max_sequences: int = MAX_SEQUENCES,
                 max_hidden_size: int = MAX_HIDDEN_SIZE) -> None:
        # Refused by name before a weight is opened.
        self.family = str(read_config(Path(model_path)).get("model_type", "?"))
        if (why := refusal(self.family)) is not None:
            raise StageError(why)
        # Only the weight files holding this range are opened (all of them for an unsharded model).
        model, config = load_shard_model(Path(model_path), start, end)
        try:
            self._driver = ModelDriver(model, config, start, end)
        except ValueError as exc:
            raise StageError(str(exc)) from None
        d = self._driver
        self.start, self.end, self.n_layers = start, end, d.n_layers
        self.max_sequences = max_sequences
        self.is_first, self.is_last, self.tied = d.is_first, d.is_last, d.tied
        # mlx-lm cannot batch it (its code, or its cache kinds): each sequence runs alone. The
        # list is one (model/facts.py) so that status, which reads no weights, says the same.
        self.solo = self.family in ONE_AT_A_TIME
        if not d.batchable and not self.solo:
            raise StageError(f"model family {self.family!r}: mlx-lm cannot batch its cache kinds "
                             "(a family served one sequence at a time is listed in model/facts.py)")
        # Everything the model's own forward still reaches on this stage; the other layers, and
        # the embedding, norm and head of other stages, were swapped out: never evaluated (read).
        mx.eval(model.parameters())
        self.shard_bytes = sum(v.nbytes for _, v in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())))
        self.hidden_size = d.width
        if self.hidden_size > max_hidden_size:  # its prefill chunks would not fit a data frame
            raise StageError(f"hidden size {self.hidden_size} exceeds the ring's limit {max_hidden_size}"
                             " (zmqinfer/protocol/limits.py)")
        # Rows of the embedding (and of the logits): token ids must stay below it (inbound.py).
        self.vocab_size = d.vocab_size
        # What flows between stages: the dtype the layers compute in (an embedding's output and
        # each layer's residual stream share it, as a norm's weight does).
        self.hidden_dtype = str(d.dtype).removeprefix("mlx.core.")
        # One sequence's caches by cache type (reported to the gateway for its admission).
        self.kv = d.measure_caches()
        # One position's caches over this stage's layers, before any window stops them: the
        # unit a KV budget in bytes is counted in (tokens of KV; 1 byte when only states).
        self.kv_bytes_per_token = max(1, self.kv.position_bytes)
        # A recurrent (SSM) state costs the same for any length: counted, per sequence, as the
        # tokens of KV it weighs, so a node's KV budget also bounds how many states it holds.
        self.state_tokens = -(-self.kv.state_bytes // self.kv_bytes_per_token)
        # Whether rejected drafts can be dropped from every cache at any length: not from an SSM
        # state (no `trim`), nor from a sliding window once it has wrapped (mlx-lm's rotating
        # cache trims only while it holds less than its window), so neither ever takes drafts.
        fresh = [x for c in self._new_cache() for x in flat(c)]
        self.rollback = can_trim_prompt_cache(fresh) and not any(isinstance(c, RotatingKVCache) for c in fresh)
        # Only plain KV caches are merged with contents for a batched prefill (chunks past 0);
        # the other kinds' chunks past 0 run one by one.
        self._plain_kv = all(type(c) is KVCache for c in fresh)
        self.max_kv_tokens: int | None = None  # set from the node's memory limit (cap_kv)
        self._caches: dict[SeqId, SeqCache] = {}
        self._groups: dict[int, Group] = {}
        self.prefixes = PrefixStore()  # cached prefixes (issue 22): counted in kv_tokens/kv_bytes

    def _tokens(self, positions: int) -> int:
        """What one sequence of `positions` positions holds here, in tokens of KV (the unit of
        max_kv_tokens): its windows stop it, its states add a constant."""
        grown = sequence_bytes(self.kv, positions) - self.kv.state_bytes
        return -(-grown // self.kv_bytes_per_token) + self.state_tokens

    # ---- KV caches --------------------------------------------------------------------------

    def _new_cache(self) -> list[Any]:
        return self._driver.new_caches()

    def kv_tokens(self) -> int:
        """Token positions held in KV caches, a group counted padded to its longest member."""
        own = sum(c.offset for c in self._caches.values()) + self.prefixes.tokens()
        return own + sum(len(g.order) * max(g.offsets.values(), default=0) for g in self._groups.values())

    def _held(self) -> int:
        """Tokens of KV held (max_kv_tokens' unit): each sequence by its caches' kinds, a group
        padded to its longest member, cached prefixes by their positions."""
        own = sum(self._tokens(c.offset) for c in self._caches.values()) + self.prefixes.tokens()
        return own + sum(len(g.order) * self._tokens(max(g.offsets.values(), default=0))
                         for g in self._groups.values())

    def _check_room(self, seq: SeqId, lengths: list[int]) -> None:
        """New sequences of these lengths are refused (not the process killed) when the stage
        is full."""
        if len(self.seq_ids) >= self.max_sequences:
            raise StageError(f"sequence {seq}: this stage already holds {self.max_sequences} sequences")
        held = self._held()
        need = sum(self._tokens(n) for n in lengths)
        # Cached prefixes give way to sequences: the least recently used go first.
        while self.max_kv_tokens is not None and held + need > self.max_kv_tokens and self.prefixes.evict_one():
            held = self._held()
        if self.max_kv_tokens is not None and held + need > self.max_kv_tokens:
            raise StageError(f"sequence {seq}: KV cache full ({held} of {self.max_kv_tokens} tokens "
                             "held under this node's memory limit)")

    def _cache_for(self, seq: SeqId, start: int, length: int = 0) -> SeqCache:
        c = self._caches.get(seq)
        if c is None:
            if start != 0:
                raise StageError(f"sequence {seq}: chunk at position {start} but no cache here "
                                 "(released, expired or never started)")
            self._check_room(seq, [length])
            c = self._caches[seq] = SeqCache(self._new_cache())
        elif c.offset != start:
            raise StageError(f"sequence {seq}: chunk at position {start}, cache holds {c.offset}")
        c.last_used = time.monotonic()
        return c

    def seed(self, seq: SeqId, prefix: int, start: int) -> None:
        """Start a new sequence from the first `start` positions of a cached prefix."""
        if seq in self.seq_ids:
            raise StageError(f"sequence {seq}: starts from prefix {prefix} but a cache already holds it")
        layers = self.prefixes.seed(prefix, start)  # taken first: making room may evict it
        if layers is None:
            raise StageError(f"sequence {seq}: prefix {prefix} of {start} positions is not held here")
        self._check_room(seq, [start])
        self._caches[seq] = SeqCache(layers, offset=start)

    def keep(self, seq: SeqId, prefix: int, length: int) -> bool:
        """Keep the first `length` positions of a live sequence's caches as `prefix` (its
        group's batch cache cut out first). False: nothing kept (see node/prefixes.py)."""
        own = self._caches.get(seq)
        if own is not None:
            layers, held = own.layers, own.offset
        else:
            g = next((g for g in self._groups.values() if seq in g.offsets and g.layers is not None), None)
            if g is None:
                return False
            i = g.order.index(seq)
            layers, held = [c.extract(i) for c in g.layers or ()], g.offsets[seq]
        return self.prefixes.keep(prefix, layers, length, held)

    def drop_prefixes(self, prefixes: tuple[int, ...] | None) -> None:
        """Drop these cached prefixes; None: all of them (a new ring starts with none)."""
        if prefixes is None:
            self.prefixes.clear()
        else:
            self.prefixes.drop(prefixes)

    def release(self, seqs: list[SeqId] | tuple[SeqId, ...]) -> None:
        gone = set(seqs)
        for s in gone:
            self._caches.pop(s, None)
        for gid, g in list(self._groups.items()):
            if gone.intersection(g.order):
                g.keep([s for s in g.order if s not in gone])
            if not g.order:
                del self._groups[gid]

    def expire_idle(self, now: float | None = None) -> list[SeqId]:
        now = time.monotonic() if now is None else now
        dead = [s for s, c in self._caches.items() if now - c.last_used > IDLE_CACHE_SECONDS]
        dead += [s for g in self._groups.values() if now - g.last_used > IDLE_CACHE_SECONDS for s in g.order]
        self.release(dead)
        return dead

    @property
    def seq_ids(self) -> tuple[SeqId, ...]:
        return tuple(self._caches) + tuple(s for g in self._groups.values() for s in g.order)

    @property
    def sequences(self) -> int:
        return len(self.seq_ids)

    @property
    def kv_bytes(self) -> int:
        """Bytes the KV caches hold (as allocated: mlx-lm grows a cache 256 positions at a time)."""
        own = sum(c.nbytes for sc in self._caches.values() for c in sc.layers) + self.prefixes.nbytes
        return own + sum(c.nbytes for g in self._groups.values() for c in g.layers or ())

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
        cache = self._cache_for(seq, start, n)
        if not self.is_first and (hidden is None or hidden.shape != (n, self.hidden_size)):
            raise StageError(f"sequence {seq}: hidden state {None if hidden is None else hidden.shape}"
                             f" does not match {n} tokens x {self.hidden_size}")
        ids = tokens[None] if self.is_first else mx.zeros((1, n), dtype=mx.int32)
        out = self._driver.run(ids, None if hidden is None else hidden[None], cache.layers, want_logits)
        cache.offset += n
        if not self.is_last:
            return out[0]
        if not want_logits:  # the logits stay an unevaluated graph: the head never runs
            mx.eval([c.state for c in cache.layers])
            return mx.zeros((0,), dtype=self._driver.dtype)
        return out[:, -1, :]

    def prefill_batch(self, seqs: list[SeqId], tokens: list[mx.array], hidden: list[mx.array] | None,
                      starts: list[int] | None = None) -> list[mx.array]:
        """A prefill chunk of each of several sequences, in one forward. tokens: int32 [n_i];
        hidden: [n_i, hidden_size] from the previous stage (None on stage 0); starts: each
        chunk's position (None: all 0; past 0 continues the sequence's own caches, a later chunk
        or one seeded from a prefix). Returns each sequence's hidden states [n_i, hidden_size],
        or on the last stage an empty array each (a prefill chunk is never sampled). Raises
        StageError before computing anything on a bad chunk."""
        starts = [0] * len(seqs) if starts is None else starts
        if len(set(seqs)) != len(seqs):
            raise StageError(f"sequences {seqs}: one sequence twice in a batched prefill")
        if (len(tokens) != len(seqs) or len(starts) != len(seqs)
                or (hidden is not None and len(hidden) != len(seqs))):
            raise StageError(f"sequences {seqs}: a chunk's tokens, position or hidden states are missing")
        lengths = [int(t.shape[0]) for t in tokens]
        for seq, start in zip(seqs, starts):
            own = self._caches.get(seq)
            if any(seq in g.offsets for g in self._groups.values()) or (start == 0 and own is not None):
                raise StageError(f"sequence {seq}: chunk at position {start} but a cache already holds it")
            if start != 0 and (own is None or own.offset != start):
                raise StageError(f"sequence {seq}: chunk at position {start}, cache holds "
                                 f"{own.offset if own is not None else 'nothing'}")
        new = [n for n, start in zip(lengths, starts) if start == 0]
        if new:
            self._check_room(seqs[0], new)
        if len(self.seq_ids) + len(new) > self.max_sequences:
            raise StageError(f"sequences {seqs}: this stage already holds {len(self.seq_ids)} of "
                             f"{self.max_sequences} sequences")
        if self.family in SOLO_PREFILL or self.solo or (any(starts) and not self._plain_kv):
            return [self.forward(seq, start, t, None if hidden is None else hidden[i], want_logits=False)
                    for i, (seq, start, t) in enumerate(zip(seqs, starts, tokens))]
        # Right-padded: each cache kind is told the real lengths (an SSM state stops at its own;
        # attention caches roll the padding to the left when finalized).
        width = max(lengths)
        pads = [width - n for n in lengths]
        if self.is_first:
            ids = mx.stack([mx.concatenate([t.astype(mx.int32), mx.zeros((p,), dtype=mx.int32)])
                            for p, t in zip(pads, tokens)])
            h = None
        else:
            if hidden is None or any(x.shape != (n, self.hidden_size) for x, n in zip(hidden, lengths)):
                raise StageError(f"sequences {seqs}: hidden states do not match their chunks' "
                                 f"{lengths} tokens x {self.hidden_size}")
            ids = mx.zeros((len(seqs), width), dtype=mx.int32)
            h = mx.stack([mx.concatenate([x, mx.zeros((p, self.hidden_size), dtype=x.dtype)])
                          for p, x in zip(pads, hidden)])
        held = [self._caches.pop(seq).layers if start else self._new_cache() for seq, start in zip(seqs, starts)]
        batch = [type(cs[0]).merge(list(cs)) for cs in zip(*held)]
        if max(pads) > 0:
            for bc in batch:
                bc.prepare(lengths=lengths, right_padding=pads)
        out = self._driver.run(ids, h, batch, last_only=False)
        if max(pads) > 0:
            for bc in batch:
                bc.finalize()
        for i, (seq, start, n) in enumerate(zip(seqs, starts, lengths)):
            self._caches[seq] = SeqCache([bc.extract(i) for bc in batch], offset=start + n)
        if self.is_last:
            mx.eval([c.state for seq in seqs for c in self._caches[seq].layers])
            return [mx.zeros((0,), dtype=self._driver.dtype) for _ in seqs]
        return [out[i, :n] for i, n in enumerate(lengths)]

    def decode(self, group: int, seqs: list[SeqId], starts: list[int], tokens: mx.array,
               hidden: mx.array | None) -> mx.array:
        """One token for each of `seqs` (a micro-batch group), batched.

        tokens: int32 [B]; hidden: [B, hidden_size] (None on stage 0). Returns [B, hidden_size]
        for the next stage, or the logits [B, vocab] on the last. A sequence not yet in the
        group joins with its prefill cache (which must end at its start position); members
        missing from `seqs` have left and are dropped. Raises StageError before computing
        anything if a position does not match.
        """
        g = self._groups.get(group) or Group()
        for seq, start in zip(seqs, starts):
            c = self._caches.get(seq)
            if (held := g.offsets.get(seq, c.offset if c is not None else 0)) != start:
                raise StageError(f"sequence {seq}: decode at position {start}, cache holds {held}")
        if not self.is_first and (hidden is None or hidden.shape != (len(seqs), self.hidden_size)):
            raise StageError(f"group {group}: hidden state {None if hidden is None else hidden.shape}"
                             f" does not match {len(seqs)} sequences x {self.hidden_size}")
        if self.solo:  # mlx-lm cannot batch the family: each sequence on its own caches
            return mx.concatenate([self.forward(seq, start, tokens[i:i + 1], None if hidden is None else
                                                hidden[i:i + 1], want_logits=True)
                                   for i, (seq, start) in enumerate(zip(seqs, starts))])
        self._groups[group] = g
        joining = [s for s in seqs if s not in g.offsets]
        g.keep([s for s in g.order if s in set(seqs)])
        for seq in joining:  # merge each newcomer's prefill cache into the group's batch cache
            g.join(seq, self._caches.pop(seq) if seq in self._caches else SeqCache(self._new_cache()))
        g.keep(list(seqs))
        g.last_used = time.monotonic()
        assert g.layers is not None
        ids = tokens[:, None] if self.is_first else mx.zeros((len(seqs), 1), dtype=mx.int32)
        out = self._driver.run(ids, None if hidden is None else hidden[:, None, :], g.layers, True)
        for seq in seqs:
            g.offsets[seq] += 1
        return out[:, -1, :]

    def verify(self, seq: SeqId, start: int, trim: int, tokens: mx.array, hidden: mx.array | None) -> mx.array:
        """A decode chunk with drafted tokens, or the first after one: drops the `trim` newest
        positions of the sequence's own caches (rejected drafts), then runs tokens [n] (its
        next token and drafts; hidden [n, hidden_size] after stage 0) on them. Returns
        [n, hidden_size], or the logits of every position [n, vocab] on the last stage. Raises
        StageError first if the caches cannot roll back or do not hold `start + trim`."""
        if not self.rollback:
            raise StageError(f"sequence {seq}: drafted tokens, but this stage's caches cannot roll back")
        self._leave_group(seq)
        c = self._caches.get(seq)
        held = c.offset if c is not None else 0
        if c is None or held != start + trim:
            raise StageError(f"sequence {seq}: verify at position {start} after dropping {trim}, "
                             f"cache holds {held}")
        n = tokens.shape[0]
        if not self.is_first and (hidden is None or hidden.shape != (n, self.hidden_size)):
            raise StageError(f"sequence {seq}: hidden state {None if hidden is None else hidden.shape}"
                             f" does not match {n} tokens x {self.hidden_size}")
        if trim:
            trim_prompt_cache(c.layers, trim)
            c.offset -= trim
        c.last_used = time.monotonic()
        ids = tokens[None] if self.is_first else mx.zeros((1, n), dtype=mx.int32)
        out = self._driver.run(ids, None if hidden is None else hidden[None], c.layers, last_only=False)
        c.offset += n
        return out[0]

    def _leave_group(self, seq: SeqId) -> None:
        """Take `seq` out of its decode group onto caches of its own (a verify runs it alone)."""
        for gid, g in list(self._groups.items()):
            if seq in g.offsets:
                if (own := g.take_out(seq)) is not None:
                    self._caches[seq] = own
                if not g.order:
                    del self._groups[gid]
