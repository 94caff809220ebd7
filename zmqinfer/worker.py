"""The mlx thread's side of a node: one Forward in, one message out.

Unpacks a micro-batch, runs each chunk through the stage, and packs the result: the hidden
states for the next node, or (last stage) the sampled tokens for the gateway. Every method runs
on the node's single mlx thread; nothing here knows about sockets.
"""

from __future__ import annotations

import time

import mlx.core as mx

from .model import model_fingerprint, resolve_model
from .sampling import SeqSampler
from .stage import Stage, StageError
from .tensors import from_wire, to_wire
from .wire import Forward, Sampled, SeqId

Failure = tuple[tuple[SeqId, ...], str]


class Worker:
    def __init__(self) -> None:
        self.stage: Stage | None = None
        self.fingerprint = ""
        self.samplers: dict[SeqId, SeqSampler] = {}
        self.busy_seconds = 0.0  # compute time since start; the heartbeat reports it

    @property
    def shard_bytes(self) -> int:
        return self.stage.shard_bytes if self.stage else 0

    @property
    def sequences(self) -> int:
        return self.stage.sequences if self.stage else 0

    def load(self, model: str, start: int, end: int) -> None:
        self.stage, self.samplers = None, {}  # drop the old shard first: memory is the limit
        mx.clear_cache()
        path = resolve_model(model)
        self.stage = Stage(path, start, end)
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
        """The message to send on, and the chunks that failed (dropped from it)."""
        assert self.stage is not None
        t0 = time.perf_counter()
        st = self.stage
        tokens = from_wire(fwd.tokens)
        hidden = from_wire(fwd.hidden) if fwd.hidden is not None else None
        kept, outs, samples, failures = [], [], [], []
        kept_tokens: list[mx.array] = []
        offset = 0
        for chunk in fwd.chunks:
            sl = slice(offset, offset + chunk.length)
            offset += chunk.length
            toks = tokens[sl]
            try:
                out = st.forward(chunk.seq, chunk.start, toks, hidden[sl] if hidden is not None else None,
                                 want_logits=chunk.sample)
            except StageError as e:
                st.release((chunk.seq,))  # a sequence out of step is unrecoverable here
                failures.append(((chunk.seq,), str(e)))
                continue
            if not st.is_last:
                kept.append(chunk)
                kept_tokens.append(toks)
                outs.append(out)
                continue
            sampler = self.samplers.get(chunk.seq)
            if sampler is None or chunk.params is not None:
                if chunk.params is None:
                    failures.append(((chunk.seq,), f"sequence {chunk.seq}: no sampling parameters"))
                    continue
                sampler = self.samplers[chunk.seq] = SeqSampler(chunk.seq, chunk.params)
            sampler.observe(toks.tolist())
            if chunk.sample:
                samples.append(sampler.sample(out))
        if st.is_last:
            msg: Forward | Sampled = Sampled(fwd.epoch, fwd.step, tuple(samples))
        else:
            h = mx.concatenate(outs) if outs else mx.zeros((0, st.hidden_size), dtype=mx.float32)
            toks = mx.concatenate(kept_tokens) if kept_tokens else mx.zeros((0,), dtype=mx.int32)
            msg = Forward(fwd.epoch, fwd.step, tuple(kept), to_wire(toks), to_wire(h))
        self.busy_seconds += time.perf_counter() - t0
        return msg, failures
