"""Continuous batching with several micro-batches in flight: the request table and its pump.

    generate(prompt) -> prefill chunks queued ------------------------------------+
    pump (one task): group A step, group B step, ..., prefill chunks (credits) -> ring
    on_sampled(step): a group's tokens -> each request's queue; the group is free to go again
    generate yields tokens from its queue, under a deadline

Every decoding sequence belongs to one of K >= number-of-stages micro-batch *groups*; each group
has at most one step in the ring, so while the last node works on group A the first works on
group C. Sequences join a group between its steps (after their prefill) and leave it when they
finish or their client goes. A long prompt enters as PREFILL_CHUNK-token chunks, each its own
message, so it neither stalls running streams nor blocks the pipeline, and its chunks overlap
across stages. Every Forward is acknowledged by exactly one Sampled from the last stage (empty
for prefill), which is what the credits count.

Prefill is cut exactly as mlx-lm's generate_step cuts it with prefill_step_size=PREFILL_CHUNK
(chunks over all but the last prompt token; the last token is the first decode step), so a
request alone in the ring is token-identical to a single-process mlx-lm run. Batched with
others, its logits agree to float rounding (node/stage.py), so only an exact near-tie could differ.

Only the pump task sends on the ring, so messages leave in the order they were decided and a
cancelled HTTP handler can never leave a half-sent step behind. Release of a sequence's KV
caches travels the ring behind its last Forward.

When the ring breaks (a node died) or is re-planned, `park()` keeps every live request: each
sequence forgets the old ring's caches and, on `resume()` into the new epoch, is prefilled again
from its own history (prompt + every token already sampled), then decodes on from its last
token. Its client only sees a pause: no token is repeated or skipped, and greedy output is the
same as without the fault (up to the float-rounding near-ties batching already allows).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncGenerator, Callable, Protocol

import structlog

from zmqinfer.tensors import tokens_to_wire
from zmqinfer.wire import (
    NO_GROUP,
    Chunk,
    Epoch,
    Forward,
    Release,
    Sample,
    Sampled,
    SamplingParams,
    SeqId,
    StepFailed,
)

log = structlog.get_logger()

# Prompt tokens per prefill message. Smaller chunks overlap better across stages (a 1024-token
# prompt on 2 stages: 4 chunks finish in ~5/8 of the unsplit time) and interleave with decode
# steps sooner; results equal mlx-lm run with prefill_step_size=PREFILL_CHUNK.
PREFILL_CHUNK = 256
# Prefill messages in the ring at once: one per stage keeps every stage busy with long prompts
# (per stage, not per device: stages that share a machine of several cores still overlap).
PREFILL_CREDITS_PER_STAGE = 1
# Micro-batch groups beyond one per device: while one group's tokens travel back through the
# gateway, the spare keeps the first device busy (README, "Keeping every device busy").
SPARE_GROUPS = 0
# A decode step through a healthy ring takes milliseconds; 30 s means something is wrong, and
# the client hears so instead of waiting forever. Prefill gets more per prompt token.
STEP_TIMEOUT_S = 30.0
PREFILL_S_PER_TOKEN = 0.02
# How long a request waits for the ring to become ready before it gets a 503.
READY_WAIT_S = 10.0
# How long a parked request waits for the re-planned ring (detection, survivors loading their
# extra layers, its own re-prefill) before it gets a 504; a "no capacity" verdict ends it sooner.
REPLAY_WAIT_S = 120.0


def groups(n_devices: int) -> int:
    """Micro-batch groups for a ring over `n_devices` devices. Stages on one machine share its
    cores, so splitting their batch only costs: they get one group, as batch_generate has."""
    return 1 if n_devices <= 1 else n_devices + SPARE_GROUPS


class _Paused:
    """Queued to a parked request: the ring is being re-planned; wait up to REPLAY_WAIT_S."""


PAUSED = _Paused()


class RingUnavailable(Exception):
    """The ring cannot serve right now (not assigned, a node missing, no placement fits): 503."""


class StepNotSent(Exception):
    """A step that could not be encoded or sent for a reason other than the ring (a bug, or a
    value the wire cannot carry): its requests fail with a 500; the pump and the rest go on."""


class RingTimeout(Exception):
    """The ring stopped answering for a request within its deadline: 504."""


class RingPort(Protocol):
    """What the scheduler needs from the ring (gateway/ring.py)."""

    @property
    def epoch(self) -> Epoch: ...
    @property
    def n_stages(self) -> int: ...
    @property
    def n_devices(self) -> int: ...  # distinct machines (or simulated devices) among the stages

    async def wait_ready(self, timeout: float) -> None: ...  # raises RingUnavailable
    async def send(self, msg: Forward | Release) -> None: ...


@dataclass
class _Seq:
    id: SeqId
    epoch: Epoch  # the ring it runs on; 0 while parked
    max_tokens: int
    params: SamplingParams
    history: list[int]  # prompt + every token sampled so far: what a replay prefills
    prefill: deque[tuple[int, list[int]]] = field(default_factory=deque)  # (start, tokens) to send
    next_token: int = 0  # what its next decode step feeds in
    pos: int = 0  # position of next_token
    queue: asyncio.Queue[Sample | Exception | _Paused] = field(default_factory=asyncio.Queue)
    params_sent: bool = False
    group: int | None = None
    generated: int = 0
    done: bool = False
    arrived: float = field(default_factory=time.monotonic)  # generate() called: queue time starts
    started: bool = False  # its first message on the current ring has been decided (running)
    queued: bool = True  # never started on any ring yet (queue time not yet observed)

    def restart(self, epoch: Epoch) -> None:
        """Start over on a fresh ring: prefill all but the last token of the history (cut as
        mlx-lm cuts a prompt), which is then the first decode step."""
        head = self.history[:-1]
        self.prefill = deque((a, head[a:a + PREFILL_CHUNK]) for a in range(0, len(head), PREFILL_CHUNK))
        self.next_token, self.pos = self.history[-1], len(self.history) - 1
        self.epoch, self.params_sent, self.group, self.started = epoch, False, None, False


@dataclass
class _Group:
    members: list[_Seq] = field(default_factory=list)
    in_flight: bool = False


class Scheduler:
    def __init__(self, ring: RingPort, eos_ids: set[int]) -> None:
        self.ring = ring
        self.eos_ids = eos_ids
        self._seqs: dict[SeqId, _Seq] = {}
        self._ids = itertools.count(1)
        self._steps = itertools.count(1)
        self._groups: dict[int, _Group] = {}
        self._prefilling: deque[_Seq] = deque()  # waiting for (more) prefill chunks to be sent
        self._prefill_in_flight = 0
        self._acks: dict[int, int] = {}  # step in flight -> its group, NO_GROUP for a prefill chunk
        self._releases: list[tuple[Epoch, SeqId]] = []
        self._parked: list[_Seq] = []
        self._paused = False  # a planned re-plan is waiting for the ring to drain
        self._wake = asyncio.Event()
        self.decode_steps = 0  # group steps answered: what `bench --simulate` counts
        self._admitting = 0  # requests waiting for a ready ring before they get a sequence
        # Called once per request with its queue time (generate() -> first step decided).
        self.on_queued: Callable[[float], None] | None = None

    @property
    def active(self) -> int:
        return len(self._seqs)

    @property
    def running(self) -> int:
        """Requests with steps in the current ring (vLLM's "running")."""
        return sum(1 for s in self._seqs.values() if s.started and s.epoch and not s.done)

    @property
    def waiting(self) -> int:
        """Admitted but nothing in the ring yet: waiting for a ring, queued for prefill, parked."""
        return self._admitting + sum(1 for s in self._seqs.values()
                                     if not (s.started and s.epoch) and not s.done)

    @property
    def in_flight(self) -> int:
        """Steps sent and not yet answered."""
        return len(self._acks)

    def next_step(self) -> int:
        return next(self._steps)

    # ---- the request side -------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int,
                       request_id: str = "") -> AsyncGenerator[Sample, None]:
        """Yield one Sample per generated token; stop after max_tokens or an EOS token (yielded).
        Closing the iterator early ends the sequence and frees its caches along the ring."""
        if not prompt:
            raise ValueError("empty prompt")
        arrived = time.monotonic()
        self._admitting += 1
        try:
            await self.ring.wait_ready(READY_WAIT_S)
        finally:
            self._admitting -= 1
        seq = _Seq(SeqId(next(self._ids)), self.ring.epoch, max_tokens, params, list(prompt),
                   arrived=arrived)
        seq.restart(self.ring.epoch)
        self._seqs[seq.id] = seq
        if self._paused:
            self._parked.append(seq)  # a planned re-plan is draining the ring: start on the new one
        else:
            self._enqueue(seq)
        slog = log.bind(request_id=request_id, seq=seq.id)
        try:
            deadline = STEP_TIMEOUT_S + PREFILL_S_PER_TOKEN * len(prompt)
            while True:
                try:
                    async with asyncio.timeout(deadline):
                        item = await seq.queue.get()
                except TimeoutError:
                    raise RingTimeout(f"the ring did not answer within {deadline:.0f}s "
                                      f"(token {seq.generated + 1} of request {request_id or seq.id})") from None
                if isinstance(item, _Paused):
                    deadline = REPLAY_WAIT_S + PREFILL_S_PER_TOKEN * len(seq.history)
                    continue
                if isinstance(item, Exception):
                    raise item
                yield item
                if seq.done:
                    return
                deadline = STEP_TIMEOUT_S
        finally:
            self._end(seq)
            slog.debug("sequence ended", generated=seq.generated)

    def _enqueue(self, seq: _Seq) -> None:
        if seq.prefill:
            self._prefilling.append(seq)
        else:
            self._join(seq)
        self._wake.set()

    def _join(self, seq: _Seq) -> None:
        """Put a prefilled sequence in the smallest group; it decodes from that group's next step."""
        k = groups(self.ring.n_devices)
        for gid in range(k):
            self._groups.setdefault(gid, _Group())
        gid = min(range(k), key=lambda g: len(self._groups[g].members))
        seq.group = gid
        self._groups[gid].members.append(seq)

    def _end(self, seq: _Seq) -> None:
        seq.done = True
        self._seqs.pop(seq.id, None)
        g = self._groups.get(seq.group) if seq.group is not None else None
        if g is not None and seq in g.members:
            g.members.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq in self._parked:
            self._parked.remove(seq)
        self._releases.append((seq.epoch, seq.id))
        self._wake.set()

    # ---- results from the ring (called by the gateway's result loop) -----------------------

    def awaiting(self, step: int) -> bool:
        """Whether `step` was sent and its result is still due (results for others are forged
        or stale: the results port drops them)."""
        return step in self._acks

    def on_sampled(self, msg: Sampled) -> None:
        gid = self._acks.pop(msg.step, None)
        if gid == NO_GROUP:
            self._prefill_in_flight -= 1
        elif gid is not None:
            self._groups[gid].in_flight = False
            self.decode_steps += 1
        for s in msg.samples:
            seq = self._seqs.get(s.seq)
            if seq is None or seq.done or seq.epoch != msg.epoch:
                continue  # finished or cancelled while this step was in flight
            seq.generated += 1
            seq.history.append(s.token)
            seq.next_token, seq.pos = s.token, seq.pos + 1
            if seq.generated >= seq.max_tokens or s.token in self.eos_ids:
                seq.done = True
                g = self._groups.get(seq.group) if seq.group is not None else None
                if g is not None and seq in g.members:
                    g.members.remove(seq)
            seq.queue.put_nowait(s)
        self._wake.set()

    def on_step_failed(self, msg: StepFailed) -> None:
        for sid in msg.seqs:
            seq = self._seqs.get(sid)
            if seq is not None and seq.epoch == msg.epoch and not seq.done:
                seq.queue.put_nowait(RingUnavailable(f"node {msg.node} failed the step: {msg.reason}"))

    # ---- ring changes (called by the gateway's planner) ------------------------------------

    def pause(self) -> None:
        """A planned re-plan: send no new steps, so the ring drains (`in_flight` reaches 0)."""
        self._paused = True

    def park(self) -> int:
        """The old ring is gone: keep every live sequence for replay on the next one, and forget
        the old ring's groups and credits. Their answers, should any still come, carry the old
        epoch and are ignored. Returns how many sequences were parked."""
        for seq in self._seqs.values():
            if not seq.done and seq not in self._parked:
                seq.epoch = Epoch(0)
                self._parked.append(seq)
                seq.queue.put_nowait(PAUSED)
        self._forget_ring()
        self._paused = True
        return len(self._parked)

    def resume(self) -> int:
        """The new ring is ready (ring.epoch): every parked sequence replays its history on it."""
        parked, self._parked, self._paused = self._parked, [], False
        for seq in parked:
            seq.restart(self.ring.epoch)
            self._enqueue(seq)
        self._wake.set()
        return len(parked)

    def fail_all(self, reason: str) -> None:
        """No ring can be built (e.g. the live nodes cannot hold the model): every live request
        hears why now, instead of waiting out its deadline."""
        for seq in self._seqs.values():
            if not seq.done:
                seq.queue.put_nowait(RingUnavailable(reason))
        self._parked.clear()
        self._forget_ring()

    def _forget_ring(self) -> None:
        self._groups.clear()
        self._acks.clear()
        self._prefilling.clear()
        self._prefill_in_flight = 0

    # ---- the pump: the one writer to the ring ----------------------------------------------

    async def pump(self) -> None:
        """Owned by the gateway's TaskGroup: decides and sends every message, in order."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            for msg, seqs in self._decide():
                try:
                    await self.ring.send(msg)
                except Exception as e:  # one bad message (e.g. one that cannot be encoded) fails
                    # only its sequences: never the pump, which every request depends on
                    if not isinstance(e, RingUnavailable):
                        log.exception("could not send a step: its sequences fail", kind=msg.KIND)
                        e = StepNotSent(f"{type(e).__name__} while sending a step")
                    for seq in seqs:  # parked sequences (epoch changed) will replay instead
                        if not seq.done and seq.epoch == msg.epoch:
                            seq.queue.put_nowait(e)
                    if isinstance(msg, Forward):  # it never left: give its group/credit back
                        self.on_sampled(Sampled(epoch=msg.epoch, step=msg.step, samples=()))

    def _start(self, seq: _Seq) -> None:
        """Its next message is decided: it runs on this ring (its queue time ends the first time)."""
        if seq.started:
            return
        seq.started = True
        if seq.queued:
            seq.queued = False
            if self.on_queued is not None:
                self.on_queued(time.monotonic() - seq.arrived)

    def _decide(self) -> list[tuple[Forward | Release, list[_Seq]]]:
        out: list[tuple[Forward | Release, list[_Seq]]] = []
        epoch = self.ring.epoch
        if self._releases:
            batch, self._releases = self._releases, []
            seqs = tuple(s for e, s in batch if e == epoch)  # older rings' caches died with them
            if seqs:
                out.append((Release(epoch, seqs), []))
        if self._paused:
            return out
        for gid, g in self._groups.items():
            if g.in_flight or not g.members:
                continue
            chunks, toks = [], []
            for seq in g.members:
                self._start(seq)
                chunks.append(Chunk(seq=seq.id, start=seq.pos, length=1, sample=True,
                                    params=None if seq.params_sent else seq.params))
                seq.params_sent = True
                toks.append(seq.next_token)
            step = self.next_step()
            self._acks[step] = gid
            g.in_flight = True
            out.append((Forward(epoch=epoch, step=step, chunks=tuple(chunks), group=gid,
                                tokens=tokens_to_wire(toks)), list(g.members)))
        credits = max(1, PREFILL_CREDITS_PER_STAGE * self.ring.n_stages)
        while self._prefilling and self._prefill_in_flight < credits:
            seq = self._prefilling.popleft()
            self._start(seq)
            start, toks = seq.prefill.popleft()
            chunk = Chunk(seq=seq.id, start=start, length=len(toks), sample=False,
                          params=None if seq.params_sent else seq.params)
            seq.params_sent = True
            step = self.next_step()
            self._acks[step] = NO_GROUP
            self._prefill_in_flight += 1
            out.append((Forward(epoch=epoch, step=step, chunks=(chunk,), group=NO_GROUP,
                                tokens=tokens_to_wire(toks)), [seq]))
            if seq.prefill:
                self._prefilling.append(seq)  # round robin: one long prompt doesn't starve others
            else:
                self._join(seq)  # FIFO along the ring: its decode step runs after this chunk
                self._wake.set()  # its group may be idle: decide again
        return out
