"""The mlx thread's side of a node: one Forward in, one message out.

Unpacks a micro-batch, runs each chunk through the stage, and packs the result: the hidden
states for the next node, or (last stage) the sampled tokens for the gateway. Every method runs
on the node's single mlx thread; nothing here knows about sockets.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import mlx.core as mx

from zmqinfer.model.resolve import _HUB_ID, DEFAULT_MODEL, ModelNotFound, model_fingerprint, resolve_model
from zmqinfer.node.sampling import SeqSampler, sample_batch, tokenizer_size
from zmqinfer.model.shards import fetch_shard, shard_weight_files
from zmqinfer.node.stage import Stage, StageError
from zmqinfer.tensors import from_wire, to_wire
from zmqinfer.wire import Chunk, Forward, Sample, Sampled, SeqId

Failure = tuple[tuple[SeqId, ...], str]


class Worker:
    def __init__(self) -> None:
        self.stage: Stage | None = None
        self.fingerprint = ""
        self.samplers: dict[SeqId, SeqSampler] = {}
        self.busy_seconds = 0.0  # compute time since start; the heartbeat reports it
        self.token_limit: int | None = None  # the tokenizer's size: the last stage samples below it

    @property
    def shard_bytes(self) -> int:
        return self.stage.shard_bytes if self.stage else 0

    @property
    def sequences(self) -> int:
        return self.stage.sequences if self.stage else 0

    def load(self, model: str, start: int, end: int) -> None:
        """Load layers [start, end) of `model` (embedded default, local directory or hub id).
        A hub model needs only the weight files holding these layers in the local cache."""
        self.stage, self.samplers = None, {}  # drop the old shard first: memory is the limit
        mx.clear_cache()
        if model == DEFAULT_MODEL or Path(model).expanduser().exists() or not _HUB_ID.fullmatch(model):
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
        self.stage = Stage(path, start, end)
        self.token_limit = tokenizer_size(path) if self.stage.is_last else None
        self.fingerprint = model_fingerprint(path)

    def release(self, seqs: tuple[SeqId, ...]) -> None:
        if self.stage is not None:
            self.stage.release(seqs)
        for s in seqs:
            self.samplers.pop(s, None)

    def expire_idle(self) -> list[SeqId]:
        """Free sequences whose Release never came (a gateway that died mid-request)."""
        dead = self.stage.expire_idle() if self.stage is not None else []
        for s in dead:
            self.samplers.pop(s, None)
        return dead

    def drop_sequences(self) -> None:
        """A new epoch: the old ring's sequences are gone, their caches with them."""
        if self.stage is not None:
            self.stage.release(list(self.stage.seq_ids))
        self.samplers.clear()

    def run(self, fwd: Forward) -> tuple[Forward | Sampled, list[Failure]]:
        """The message to send on, and the chunks that failed (dropped from it).

        Prefill chunks run one by one on their sequences' own caches; the decode chunks run as
        one batch of the Forward's group. The outgoing Forward lists the prefill chunks first,
        then the decode chunks, with tokens and hidden rows in that same order.
        """
        assert self.stage is not None
        t0 = time.perf_counter()
        st = self.stage
        tokens = from_wire(fwd.tokens)
        hidden = from_wire(fwd.hidden) if fwd.hidden is not None else None
        starts = list(itertools.accumulate((c.length for c in fwd.chunks), initial=0))
        prefill = [(c, starts[i]) for i, c in enumerate(fwd.chunks) if not c.sample]
        decode = [(c, starts[i]) for i, c in enumerate(fwd.chunks) if c.sample]
        failures: list[Failure] = []
        kept: list[Chunk] = []
        outs: list[mx.array] = []
        out_tokens: list[mx.array] = []
        for chunk, at in prefill:
            sl = slice(at, at + chunk.length)
            try:
                out = st.forward(chunk.seq, chunk.start, tokens[sl],
                                 hidden[sl] if hidden is not None else None, want_logits=False)
            except StageError as e:
                st.release((chunk.seq,))  # a sequence out of step is unrecoverable here
                failures.append(((chunk.seq,), str(e)))
                continue
            self._observe(chunk, tokens[sl], failures)
            kept.append(chunk)
            out_tokens.append(tokens[sl])
            outs.append(out)
        samples: list[Sample] = []
        if decode:
            bad = [c for c, _ in decode if c.length != 1]
            if bad:
                failures += [((c.seq,), f"sequence {c.seq}: a decode chunk must be 1 token") for c in bad]
                decode = [(c, at) for c, at in decode if c.length == 1]
            rows = mx.array([at for _, at in decode], dtype=mx.int32)
            dec_tokens = tokens[rows]
            try:
                out = st.decode(fwd.group, [c.seq for c, _ in decode], [c.start for c, _ in decode],
                                dec_tokens, hidden[rows] if hidden is not None else None)
            except StageError as e:  # the whole group is out of step: drop it here, tell the gateway
                seqs = tuple(c.seq for c, _ in decode)
                st.release(seqs)
                failures.append((seqs, str(e)))
            else:
                if st.is_last:
                    rows, samplers = [], []
                    for j, (chunk, _) in enumerate(decode):
                        sampler = self._observe(chunk, dec_tokens[j : j + 1], failures)
                        if sampler is not None:
                            rows.append(j)
                            samplers.append(sampler)
                    if samplers:
                        picked = out if len(rows) == len(decode) else out[mx.array(rows)]
                        samples += sample_batch(samplers, picked, self.token_limit)
                kept += [c for c, _ in decode]
                out_tokens.append(dec_tokens)
                outs.append(out)
        if st.is_last:
            msg: Forward | Sampled = Sampled(fwd.epoch, fwd.step, tuple(samples))
        else:
            h = mx.concatenate(outs) if outs else mx.zeros((0, st.hidden_size), dtype=mx.float32)
            toks = mx.concatenate(out_tokens) if out_tokens else mx.zeros((0,), dtype=mx.int32)
            msg = Forward(fwd.epoch, fwd.step, tuple(kept), fwd.group, to_wire(toks), to_wire(h))
        self.busy_seconds += time.perf_counter() - t0
        return msg, failures

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
