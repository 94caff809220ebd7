"""Sequences waiting to send (more of) their prompt, and what one prefill message carries.

Round robin: a sequence whose prompt has more chunks goes back to the end of the queue, so one
long prompt never starves the others. New prompts waiting together share a message: the stages
prefill their first chunks as one left-padded batch (node/stage.py, `prefill_batch`), reading
the weights once for all of them, as mlx-lm's `batch_generate` prefills. A prompt alone gets a
message of its own, so a request alone stays token-identical to mlx-lm. Plain records on the
gateway's event loop; the scheduler decides when a message may go (its credits).
"""

from __future__ import annotations

from collections import deque

from zmqinfer.gateway.sequences import PREFILL_CHUNK, Seq

# New sequences prefilled in one message at most (batch_generate's prefill batch size); their
# tokens, padded to the longest, also stay within PREFILL_CHUNK (the wire's row limit).
PREFILL_BATCH = 8

Chunk = tuple[int, list[int]]  # (position of its first token, the tokens)


class PrefillQueue:
    def __init__(self) -> None:
        self._seqs: deque[Seq] = deque()

    def __bool__(self) -> bool:
        return bool(self._seqs)

    def __contains__(self, seq: Seq) -> bool:
        return seq in self._seqs

    def append(self, seq: Seq) -> None:
        self._seqs.append(seq)

    def remove(self, seq: Seq) -> None:
        if seq in self._seqs:
            self._seqs.remove(seq)

    def clear(self) -> None:
        self._seqs.clear()

    def take(self) -> list[tuple[Seq, Chunk]]:
        """The next message's chunks, each taken off its sequence (queue not empty): the first
        waiting chunk and, when it starts a sequence, the other sequences' first chunks that fit
        beside it (up to PREFILL_BATCH, padded size within PREFILL_CHUNK)."""
        seq = self._seqs.popleft()
        first = seq.prefill.popleft()
        batch = [(seq, first)]
        if first[0] != 0:
            return batch
        width = len(first[1])
        for other in list(self._seqs):
            if len(batch) >= PREFILL_BATCH:
                break
            start, ids = other.prefill[0]
            if start == 0 and max(width, len(ids)) * (len(batch) + 1) <= PREFILL_CHUNK:
                width = max(width, len(ids))
                self._seqs.remove(other)
                batch.append((other, other.prefill.popleft()))
        return batch
