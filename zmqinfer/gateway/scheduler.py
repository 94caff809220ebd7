"""Continuous batching with several micro-batches in flight: the request table and its pump.

    generate(prompt) -> admitted (admission.py: KV room, prefill queue, groups)
    pump (one task): group A step, group B step, ..., prefill chunks (credits) -> ring
    on_sampled(step): a group's tokens -> each request's queue; the group is free to go again
    generate yields tokens from its queue, under a deadline

Every decoding sequence belongs to one of K micro-batch groups (admission.groups()); each group
has at most one step in the ring, so while the last node works on group A the first works on
group C. A long prompt enters as PREFILL_CHUNK-token chunks, each its own message, so it neither
stalls running streams nor blocks the pipeline. Every Forward is acknowledged by exactly one
Sampled from the last stage (empty for prefill), which is what the credits count. Prefill is cut
as mlx-lm's generate_step cuts it (prefill_step_size=PREFILL_CHUNK), so a request alone in the
ring is token-identical to a single-process mlx-lm run; batched with others, its logits agree
to float rounding (node/stage.py).

Only the pump task sends on the ring, so messages leave in the order they were decided and a
cancelled HTTP handler can never leave a half-sent step behind. Release of a sequence's KV
caches travels the ring behind its last Forward.

When the ring breaks or is re-planned, `park()` keeps every live request; on `resume()` each is
prefilled again on the new ring from its own history (prompt + every token sampled) and decodes
on: its client sees a pause, no token repeated or skipped.

Pacing. Every step is answered or reclaimed. A step carries a deadline (STEP_TIMEOUT_S plus the
prompt tokens in the ring ahead of it); one not answered by then, one that never left, or one a
node reports failed (StepFailed) gives its group or prefill credit back, and each of its
sequences replays on the same ring under a fresh id (its old caches are released). A sequence
that fails MAX_REPLAYS times in a row fails with the last reason. A request's deadline counts
from the ring's work on it, not from its arrival: while one of its steps is in flight it is that
step's deadline; while it waits for its turn it is renewed every time the ring answers any step,
so a queue behind other prompts is never a timeout, and only a ring that stops answering is.
Admission is bounded: up to MAX_QUEUED sequences wait for KV room; one more is refused at once
(Overloaded: 429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import AsyncGenerator, Callable

import structlog

from zmqinfer.gateway.admission import Batch, Lanes, RingPort, seq_bound
from zmqinfer.gateway.errors import RingTimeout, RingUnavailable, StepNotSent
from zmqinfer.gateway.prefixes import PrefixCache
from zmqinfer.gateway.sequences import PAUSED, Paused, Seq, Step, StepBook
from zmqinfer.gateway.speculation import Speculator
from zmqinfer.protocol.codec import tokens_to_wire
from zmqinfer.protocol.wire import (
    NO_GROUP,
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

# Prefill messages in the ring at once: one per stage keeps every stage busy with long prompts
# (per stage, not per device: stages that share a machine of several cores still overlap).
PREFILL_CREDITS_PER_STAGE = 1
# A decode step through a healthy ring takes milliseconds; 30 s means something is wrong. A step
# is reclaimed (its sequences replay) STEP_TIMEOUT_S after it was sent plus PREFILL_S_PER_TOKEN
# for every token row in it and ahead of it in the ring (a 256-token chunk behind 3 others:
# 30 + 20 s). A request waiting its turn times out only when the ring answers nothing at all
# for STEP_TIMEOUT_S.
STEP_TIMEOUT_S = 30.0
PREFILL_S_PER_TOKEN = 0.02
# How long a request waits for the ring to become ready before it gets a 503.
READY_WAIT_S = 10.0
# How long a parked request waits for the re-planned ring (detection, survivors loading their
# extra layers, its own re-prefill) before it gets a 504; a "no capacity" verdict ends it sooner.
REPLAY_WAIT_S = 120.0
# Failed steps in a row before a sequence fails: one is a blip, three a node that cannot run it.
MAX_REPLAYS = 3
# Sequences admitted to wait for KV room; one more gets a 429 at once, not a queue nobody serves.
MAX_QUEUED = 32


class Scheduler:
    def __init__(self, ring: RingPort, eos_ids: set[int], *, step_timeout_s: float = STEP_TIMEOUT_S,
                 prefill_s_per_token: float = PREFILL_S_PER_TOKEN, max_queued: int = MAX_QUEUED,
                 clock: Callable[[], float] = time.monotonic, prefix_cache: bool = True,
                 speculation: bool = True) -> None:
        self.ring, self.eos_ids = ring, eos_ids
        self.step_timeout_s, self.prefill_s_per_token, self.max_queued = step_timeout_s, prefill_s_per_token, max_queued
        self._clock = clock
        self._seqs: dict[SeqId, Seq] = {}
        self._ids = itertools.count(1)
        self._steps = itertools.count(1)
        self._wake = asyncio.Event()
        self.prefixes = PrefixCache(prefix_cache)  # what the stages hold for new prompts to reuse
        self.spec = Speculator(speculation)  # what decode steps draft (gateway/speculation.py)
        self._lanes = Lanes(ring, self._seqs, self._wake.set, self.prefixes)  # admission, prefill, groups
        self._steps_out = StepBook()  # steps in flight, prefill credits taken
        self._releases: list[tuple[Epoch, SeqId]] = []
        self._parked: list[Seq] = []
        self._paused = False  # a planned re-plan is waiting for the ring to drain
        self._progress_at = clock()  # when the ring last answered a step
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
        """Admitted but nothing in the ring yet: waiting for a ring, queued, parked."""
        return self._admitting + sum(1 for s in self._seqs.values()
                                     if not (s.started and s.epoch) and not s.done)

    @property
    def in_flight(self) -> int:
        """Steps sent and not yet answered."""
        return len(self._steps_out.acks)

    @property
    def queued(self) -> int:
        """Requests admitted and waiting for KV room."""
        return len(self._lanes.waiting)

    def next_step(self) -> int:
        return next(self._steps)

    # ---- the request side -------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int,
                       request_id: str = "") -> AsyncGenerator[Sample, None]:
        """Yield one Sample per generated token; stop after max_tokens or an EOS token (yielded).
        Closing the iterator early ends the sequence and frees its caches along the ring.
        Raises Overloaded when the admission queue is full."""
        if not prompt:
            raise ValueError("empty prompt")
        arrived = time.monotonic()
        self._admitting += 1
        try:
            await self.ring.wait_ready(READY_WAIT_S)
        finally:
            self._admitting -= 1
        seq = Seq(SeqId(next(self._ids)), self.ring.epoch, max_tokens, params, list(prompt),
                  bound=seq_bound(len(prompt), max_tokens), arrived=arrived)
        self._lanes.check(seq, self.max_queued)
        seq.restart(self.ring.epoch, stages=self.ring.n_stages)
        if params.grammar is None:  # a grammar's matcher is rebuilt from the whole history on the
            self.prefixes.start(seq, self.ring.n_stages)  # last stage: a prefix start leaves it short
        seq.deadline = self._clock() + self.step_timeout_s
        self._seqs[seq.id] = seq
        if self._paused:
            self._parked.append(seq)  # a planned re-plan is draining the ring: start on the new one
        else:
            self._lanes.admit(seq)
        slog = log.bind(request_id=request_id, seq=seq.id)
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, self._deadline(seq) - self._clock())):
                        item = await seq.queue.get()
                except TimeoutError:
                    if self._deadline(seq) > self._clock():
                        continue  # renewed while we waited: the ring is working
                    raise RingTimeout(f"the ring did not answer within {self.step_timeout_s:.0f}s "
                                      f"(token {seq.generated + 1} of request {request_id or seq.id})") from None
                if isinstance(item, Paused):
                    seq.deadline = self._clock() + REPLAY_WAIT_S + self.prefill_s_per_token * len(seq.history)
                    continue
                if isinstance(item, Exception):
                    raise item
                yield item
                if seq.done and seq.queue.empty():  # a step with drafts may have queued several
                    return
        finally:
            self._end(seq)
            slog.debug("sequence ended", generated=seq.generated)

    def _deadline(self, seq: Seq) -> float:
        """In flight: its steps' deadline. Waiting its turn: renewed by every answer the ring
        gives (the ring is busy with others, not stuck)."""
        if seq.inflight:  # the pump reclaims a late step at its deadline; this is the safety net
            return seq.deadline + self.step_timeout_s
        return max(seq.deadline, self._progress_at + self.step_timeout_s)

    def _end(self, seq: Seq) -> None:
        self.prefixes.finished(seq, self.ring.epoch)
        seq.done = True
        self._seqs.pop(seq.id, None)
        self._lanes.leave(seq)
        if seq in self._parked:
            self._parked.remove(seq)
        self._releases.append((seq.epoch, seq.id))
        self._lanes.admit_waiting()
        self._wake.set()

    # ---- results from the ring (called by the gateway's result loop) -----------------------

    def _settle(self, step: int) -> Step | None:
        """The step is answered or reclaimed: give its group or credit back."""
        rec = self._steps_out.settle(step)
        if rec is not None:
            self._lanes.free(rec.group)
            self._wake.set()
        return rec

    def awaiting(self, step: int) -> bool:
        """Whether `step` was sent and its result is still due (results for others are forged
        or stale: the results port drops them)."""
        return step in self._steps_out.acks

    def on_sampled(self, msg: Sampled) -> None:
        rec = self._settle(msg.step)
        if rec is None:
            return  # an old ring's step, or one reclaimed (its sequences replay)
        if rec.group != NO_GROUP:
            self.decode_steps += 1
        self._progress_at = self._clock()
        self.spec.judged(rec, msg.samples)
        for s in msg.samples:
            seq = self._seqs.get(s.seq)
            if seq is None or seq.done or seq.epoch != msg.epoch:
                continue  # finished or cancelled while this step was in flight
            seq.generated += 1
            seq.replays = 0
            seq.history.append(s.token)
            seq.next_token, seq.pos = s.token, seq.pos + 1
            if seq.generated >= seq.max_tokens or s.token in self.eos_ids:
                seq.done = True
                self._lanes.leave(seq)
            seq.queue.put_nowait(s)
        self._lanes.admit_waiting()

    def on_step_failed(self, msg: StepFailed) -> None:
        """A node could not run (part of) a step: its sequences replay. When every sequence of
        the step failed, nothing of it will come back worth waiting for: reclaim it now."""
        if msg.epoch != self.ring.epoch:
            return
        reason = f"node {msg.node} failed the step: {msg.reason}"
        rec = self._steps_out.acks.get(msg.step)
        if rec is not None and set(rec.ids) <= set(msg.seqs):
            self._settle(msg.step)
        for sid in msg.seqs:
            if (seq := self._seqs.get(sid)) is not None:
                self._replay(seq, reason)

    def _reap(self) -> None:
        """Reclaim every step past its deadline; its sequences replay."""
        for step, rec in self._steps_out.due(self._clock()):
            self._settle(step)
            log.warning("step not answered in time: replaying its sequences", step=step, seqs=list(rec.ids))
            for seq, sid in zip(rec.seqs, rec.ids):
                if seq.id == sid:
                    self._replay(seq, f"step {step} was not answered within its deadline")

    def _replay(self, seq: Seq, reason: str) -> None:
        """Start the sequence over on the same ring from its history, under a fresh id (its old
        caches are released behind whatever of it is still in the ring); or, after MAX_REPLAYS
        failures in a row, fail it with `reason`."""
        if seq.done or seq.epoch != self.ring.epoch or seq in self._parked:
            return
        seq.replays += 1
        self.prefixes.failed(seq)
        self._lanes.leave(seq)
        self._releases.append((seq.epoch, seq.id))
        if seq.replays > MAX_REPLAYS:
            seq.done = True
            seq.queue.put_nowait(RingUnavailable(f"{reason} (failed {seq.replays} times in a row)"))
            self._wake.set()
            return
        log.info("replaying a sequence", seq=seq.id, attempt=seq.replays, reason=reason)
        self._seqs.pop(seq.id, None)
        seq.id = SeqId(next(self._ids))
        self._seqs[seq.id] = seq
        seq.restart(self.ring.epoch, stages=self.ring.n_stages)
        seq.deadline = self._clock() + self.step_timeout_s
        self._lanes.enqueue(seq)

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
        self._progress_at = self._clock()
        for seq in parked:
            seq.restart(self.ring.epoch, stages=self.ring.n_stages)
            seq.replays = 0
            self._lanes.admit(seq)
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
        self.prefixes.forget_all()
        self._lanes.clear()
        self._steps_out = StepBook()
        for seq in self._seqs.values():
            seq.inflight, seq.group = 0, None

    # ---- the pump: the one writer to the ring ----------------------------------------------

    async def pump(self) -> None:
        """Owned by the gateway's TaskGroup: decides and sends every message, in order."""
        while True:
            try:
                async with asyncio.timeout(self._steps_out.next_due(self._clock())):
                    await self._wake.wait()
            except TimeoutError:
                pass  # a step is due: reclaimed below
            self._wake.clear()
            self._reap()
            for msg, seqs in self._decide():
                try:
                    await self.ring.send(msg)
                except RingUnavailable as e:
                    if isinstance(msg, Release):  # caches must not leak: try again with the next
                        self._releases += [(msg.epoch, s) for s in msg.seqs]
                        continue
                    # It never left: give its group or credit back; its sequences replay (parked
                    # ones, whose epoch changed, will replay on the new ring instead).
                    self._settle(msg.step)
                    for seq in seqs:
                        self._replay(seq, str(e))
                except Exception as e:  # one bad message (e.g. one that cannot be encoded) fails
                    # only its sequences: never the pump, which every request depends on
                    log.exception("could not send a step: its sequences fail", kind=msg.KIND)
                    failed = StepNotSent(f"{type(e).__name__} while sending a step")
                    if isinstance(msg, Forward):
                        self._settle(msg.step)
                    for seq in seqs:
                        if not seq.done and seq.epoch == msg.epoch:
                            seq.queue.put_nowait(failed)

    def _send_step(self, epoch: Epoch, group: int, batch: Batch) -> tuple[Forward, list[Seq]]:
        """Book a step: its deadline counts every token already in the ring ahead of it (the
        stages work through them first)."""
        seqs, chunks, toks = batch
        for seq in seqs:
            if (queued := seq.start()) is not None and self.on_queued is not None:
                self.on_queued(queued)
        step = self.next_step()
        ahead = self._steps_out.tokens()
        deadline = self._clock() + self.step_timeout_s + self.prefill_s_per_token * (ahead + len(toks))
        self._steps_out.book(step, group, seqs, deadline, len(toks))
        return Forward(epoch=epoch, step=step, chunks=chunks, group=group, tokens=tokens_to_wire(toks)), seqs

    def _decide(self) -> list[tuple[Forward | Release, list[Seq]]]:
        out: list[tuple[Forward | Release, list[Seq]]] = []
        epoch = self.ring.epoch
        if self._releases or self.prefixes.pending:
            batch, self._releases = self._releases, []
            seqs = tuple(s for e, s in batch if e == epoch)  # older rings' caches died with them
            keep, drop = self.prefixes.take(seqs)
            if seqs or drop:
                out.append((Release(epoch, seqs, keep, drop), []))
        if self._paused:
            return out
        out += [self._send_step(epoch, gid, b) for gid, b in self._lanes.decode_batches(
            lambda seq: self.spec.draft(seq, self.ring.rollback, self._lanes.decoding()))]
        credits = max(1, PREFILL_CREDITS_PER_STAGE * self.ring.n_stages)
        while self._lanes.prefilling and self._steps_out.prefills < credits:
            out.append(self._send_step(epoch, NO_GROUP, self._lanes.prefill_batch()))
        return out
