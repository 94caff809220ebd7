"""The request table: one entry per live sequence, from prefill to its last token.

    generate(prompt) --Forward(prefill)--> ring --Sampled--> on_sampled --queue--> generate yields
                      <--Forward(next token)-- on_sampled (as soon as the token is back)

A sequence's next decode step is sent the moment its token returns, so independent requests
interleave through the pipeline by themselves (batching them into micro-batches is the next
step of this module). Prefill is cut exactly as mlx-lm's generate_step cuts it (chunks of
PREFILL_CHUNK over all but the last prompt token, then the last token alone), which keeps the
ring's greedy output token-identical to a single-process mlx-lm run.

Every wait has a deadline. Release of a sequence's KV caches is queued (never awaited in a
`finally`, where a cancelled handler could not finish it) and sent by the owner's release loop;
it travels the ring behind the sequence's last Forward, so no cache is recreated after it.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

import structlog

from .tensors import tokens_to_wire
from .wire import Chunk, Epoch, Forward, Release, Sample, Sampled, SamplingParams, SeqId, StepFailed

log = structlog.get_logger()

PREFILL_CHUNK = 2048  # mlx-lm's prefill_step_size: cutting the same way keeps results identical
# A decode step through a healthy ring takes milliseconds; 30 s means something is wrong, and
# the client hears so instead of waiting forever. Prefill gets more per prompt token.
STEP_TIMEOUT_S = 30.0
PREFILL_S_PER_TOKEN = 0.02
# How long a request waits for the ring to become ready before it gets a 503.
READY_WAIT_S = 10.0


class RingUnavailable(Exception):
    """The ring cannot serve right now (not assigned, a node missing, no placement fits): 503."""


class RingTimeout(Exception):
    """The ring stopped answering for a request within its deadline: 504."""


class Ring(Protocol):
    """What the scheduler needs from the gateway's ring state."""

    epoch: Epoch

    async def wait_ready(self, timeout: float) -> None: ...  # raises RingUnavailable
    async def send(self, msg: Forward | Release) -> None: ...


@dataclass
class _Seq:
    id: SeqId
    epoch: Epoch
    max_tokens: int
    pos: int  # tokens the ring holds for this sequence
    queue: asyncio.Queue[Sample | Exception] = field(default_factory=asyncio.Queue)
    generated: int = 0
    done: bool = False


class Scheduler:
    def __init__(self, ring: Ring, eos_ids: set[int]) -> None:
        self.ring = ring
        self.eos_ids = eos_ids
        self._seqs: dict[SeqId, _Seq] = {}
        self._ids = itertools.count(1)
        self._steps = itertools.count(1)
        self._to_release: list[tuple[Epoch, SeqId]] = []
        self._release_wanted = asyncio.Event()

    @property
    def active(self) -> int:
        return len(self._seqs)

    def next_step(self) -> int:
        return next(self._steps)

    async def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int,
                       request_id: str = "") -> AsyncIterator[Sample]:
        """Yield one Sample per generated token; stop after max_tokens or an EOS token (yielded).
        Closing the iterator early ends the sequence and frees its caches along the ring."""
        if not prompt:
            raise ValueError("empty prompt")
        await self.ring.wait_ready(READY_WAIT_S)
        seq = _Seq(SeqId(next(self._ids)), self.ring.epoch, max_tokens, pos=0)
        self._seqs[seq.id] = seq
        slog = log.bind(request_id=request_id, seq=seq.id)
        try:
            await self._send_prefill(seq, prompt, params)
            deadline = STEP_TIMEOUT_S + PREFILL_S_PER_TOKEN * len(prompt)
            while True:
                try:
                    item = await asyncio.wait_for(seq.queue.get(), deadline)
                except TimeoutError:
                    raise RingTimeout(f"the ring did not answer within {deadline:.0f}s "
                                      f"(token {seq.generated + 1} of request {request_id or seq.id})") from None
                if isinstance(item, Exception):
                    raise item
                yield item
                if seq.done:
                    return
                deadline = STEP_TIMEOUT_S
        finally:
            seq.done = True
            del self._seqs[seq.id]
            self._to_release.append((seq.epoch, seq.id))
            self._release_wanted.set()
            slog.debug("sequence ended", generated=seq.generated)

    async def _send_prefill(self, seq: _Seq, prompt: list[int], params: SamplingParams) -> None:
        # mlx-lm: chunks of PREFILL_CHUNK over prompt[:-1], then the last token on its own.
        cuts = list(range(0, len(prompt) - 1, PREFILL_CHUNK)) + [len(prompt) - 1]
        chunks = []
        for i, (a, b) in enumerate(zip(cuts, cuts[1:] + [len(prompt)])):
            chunks.append(Chunk(seq.id, a, b - a, sample=b == len(prompt),
                                params=params if i == 0 else None))
        seq.pos = len(prompt)
        await self.ring.send(Forward(seq.epoch, self.next_step(), tuple(chunks), tokens_to_wire(prompt)))

    # ---- results from the ring (called by the gateway's result loop) -----------------------

    async def on_sampled(self, msg: Sampled) -> None:
        for s in msg.samples:
            seq = self._seqs.get(s.seq)
            if seq is None or seq.done or seq.epoch != msg.epoch:
                continue  # finished or cancelled while this step was in flight
            seq.generated += 1
            seq.done = seq.generated >= seq.max_tokens or s.token in self.eos_ids
            seq.queue.put_nowait(s)
            if not seq.done:
                chunk = Chunk(seq.id, seq.pos, 1, sample=True)
                seq.pos += 1
                await self.ring.send(Forward(seq.epoch, self.next_step(), (chunk,), tokens_to_wire([s.token])))

    def on_step_failed(self, msg: StepFailed) -> None:
        for sid in msg.seqs:
            seq = self._seqs.get(sid)
            if seq is not None and seq.epoch == msg.epoch and not seq.done:
                seq.queue.put_nowait(RingUnavailable(f"node {msg.node} failed the step: {msg.reason}"))

    def fail_all(self, reason: str) -> None:
        """The ring broke under every live sequence (a node died): tell each of them now."""
        for seq in self._seqs.values():
            if not seq.done:
                seq.queue.put_nowait(RingUnavailable(reason))

    async def release_loop(self) -> None:
        """Owned by the gateway's TaskGroup: sends queued Releases, one message per epoch."""
        while True:
            await self._release_wanted.wait()
            self._release_wanted.clear()
            batch, self._to_release = self._to_release, []
            for epoch in sorted({e for e, _ in batch}):
                if epoch != self.ring.epoch:
                    continue  # that ring is gone, and its caches with it
                seqs = tuple(s for e, s in batch if e == epoch)
                try:
                    await self.ring.send(Release(epoch, seqs))
                except RingUnavailable:
                    pass  # nodes expire idle caches themselves (stage.IDLE_CACHE_SECONDS)

