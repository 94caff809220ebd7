"""Draft-free speculation (issue 23): what each decode step drafts, and when it drafts nothing.

Prompt lookup: the sequence's newest n tokens (NGRAM_MAX down to NGRAM_MIN) are looked up in its
own history (prompt + output); the tokens that followed their latest earlier occurrence are the
draft, up to the sequence's k. The ring verifies the draft in one pass (every stage runs k + 1
positions instead of 1) and the last stage keeps the agreeing prefix plus one token of its own
(node/drafts.py), so a step through the whole ring can yield up to k + 1 tokens.

Drafting lives on the gateway because the gateway already holds every sequence's history (it is
what a replay prefills) and builds every Forward: a draft costs a dict lookup here and rides as
the decode chunk's extra tokens, while a last stage that drafted would need the history it does
not keep and a way to ship drafts to the first stage. The gateway commits only the tokens the
last stage returns, so a replay from the history is exactly a replay without speculation.

k adapts per sequence: all drafts accepted, it grows by K_GROW; a miss sets it to what was
accepted plus one (the next draft is likely as good as this one was). A step that drafts
nothing is an ordinary decode step of its group. Speculation steps aside, with the reason
counted (`/metrics`), when it would only burn compute or cannot be verified exactly:
    busy       more than BUSY_SEQUENCES sequences decode: the ring is full of work already
    rollback   a stage's caches cannot drop rejected positions (SSM state, sliding window)
    grammar    a grammar-constrained request (its matcher would have to advance per draft)
    sampler    penalties, logit bias or top logprobs (their state would have to, too)
    no_match   no n-gram of the sequence's tail occurs earlier in its history
    cooldown   its last drafts were all rejected: it waits a few steps before drafting again
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from zmqinfer.clusterstatus import SpeculationStatus
from zmqinfer.gateway.sequences import Drafting, Seq, Step
from zmqinfer.protocol.limits import MAX_DRAFT_TOKENS
from zmqinfer.protocol.wire import Sample, SamplingParams

# Tail n-grams looked up, longest first: 3 tokens rarely match by accident (code and prose
# alike). Not 1: a single token recurs all over prose, and on chat its drafts were rejected
# every time in the first bench run (0 of 90 accepted); copied code matches 2 and 3 anyway.
NGRAM_MAX = 3
NGRAM_MIN = 2
# Drafts per step. Verifying costs every stage a forward of k + 1 positions; measured here
# (mlx CPU backend, the embedded 4-bit model, whole model, interleaved runs): 2 positions cost
# 1.2x one, 3 about 1.1x, 5 1.7x, 9 2.85x. With ~0.8 of code-copy drafts holding, the expected
# tokens per unit of compute peak at k of 2 to 4 (9 positions yield ~4.3 tokens for 2.85x the
# cost, 5 yield ~3.4 for 1.7x). Metal's matmuls grow far less with rows: raise K_MAX there.
K_START = 3  # drafts a sequence's first speculative step carries
K_GROW = 1  # added to k after a step whose drafts were all accepted
K_MAX = 4
# After a step whose drafts were all rejected, this sequence drafts nothing for 1, 3, 7, 15 steps
# (doubling per miss in a row, up to COOLDOWN_MAX): a verify of rejected drafts costs every
# stage more rows for nothing, and open-ended text rarely repeats its own n-grams.
COOLDOWN_MAX = 15
# Decoding sequences above which no step drafts: a busy ring's stages already compute batches,
# and rejected drafts would take rows from other sequences. docs/speculation.md has the
# measured crossover.
BUSY_SEQUENCES = 4

Reason = Literal["busy", "rollback", "grammar", "sampler", "no_match", "cooldown"]
REASONS: tuple[Reason, ...] = ("busy", "rollback", "grammar", "sampler", "no_match", "cooldown")

assert K_MAX <= MAX_DRAFT_TOKENS


def propose(d: Drafting, history: list[int], k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the history's tail.
    Histories only grow (a replay keeps its history), so the index is extended, never rebuilt."""
    # n-grams followed by at least one token: the tail itself (ending at len) never is.
    for e in range(max(d.indexed, 1), len(history)):
        for n in range(NGRAM_MIN, min(NGRAM_MAX, e) + 1):
            d.after[tuple(history[e - n:e])] = e
    d.indexed = max(d.indexed, len(history))
    for n in range(min(NGRAM_MAX, len(history)), NGRAM_MIN - 1, -1):
        at = d.after.get(tuple(history[-n:]))
        if at is not None:
            return history[at:at + k]
    return []


def adapt(d: Drafting, drafted: int, accepted: int) -> None:
    """k after a step: grown when every draft held, else what held plus one; none held, a
    cooldown that doubles with each such step in a row."""
    d.k = min(K_MAX, d.k + K_GROW) if accepted == drafted else max(1, accepted + 1)
    d.misses = d.misses + 1 if accepted == 0 else 0
    d.wait = min(COOLDOWN_MAX, 2 ** d.misses - 1)


class Speculator:
    """The gateway's drafting policy and its counts. Plain state on the event loop."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.drafts = self.draft_tokens = self.accepted_tokens = 0
        self.skipped: dict[Reason, int] = dict.fromkeys(REASONS, 0)

    def why_not(self, params: SamplingParams, rollback: bool, decoding: int) -> Reason | None:
        """Why a sequence with these parameters drafts nothing this step, if it cannot."""
        if not rollback:
            return "rollback"
        if params.grammar is not None:
            return "grammar"
        if (params.repetition_penalty is not None or params.presence_penalty is not None
                or params.frequency_penalty is not None or params.logit_bias or params.top_logprobs):
            return "sampler"
        if decoding > BUSY_SEQUENCES:
            return "busy"
        return None

    def draft(self, seq: Seq, rollback: bool, decoding: int) -> list[int]:
        """The drafts of `seq`'s next decode step (none: a plain step). `rollback`: the ring's
        caches can drop rejected positions; `decoding`: sequences in decode groups. A step
        yields at most k + 1 tokens, so k stays below what the sequence may still generate."""
        d = seq.drafting = seq.drafting or Drafting(K_START)
        k = min(d.k, seq.max_tokens - seq.generated - 1)
        if not self.enabled or k < 1:
            return []
        reason = self.why_not(seq.params, rollback, decoding)
        if reason is None and d.wait:
            reason, d.wait = "cooldown", d.wait - 1
        drafts = [] if reason is not None else propose(d, seq.history, k)
        if reason is None and not drafts:
            reason = "no_match"
        if reason is not None:
            self.skipped[reason] += 1
            return []
        self.drafts += 1
        self.draft_tokens += len(drafts)
        return drafts

    def judged(self, step: Step, samples: tuple[Sample, ...]) -> None:
        """A step with drafts came back with 1 to k + 1 tokens per sequence: the rest were
        rejected, and each sequence's next step drops their positions from every cache."""
        counts = Counter(s.seq for s in samples)
        for seq, sid in zip(step.seqs, step.ids):
            if seq.drafted and seq.drafting is not None and seq.id == sid and (n := counts.get(sid, 0)):
                self.accepted_tokens += n - 1
                adapt(seq.drafting, seq.drafted, n - 1)
                seq.trim, seq.drafted = seq.drafted + 1 - n, 0

    def status(self) -> SpeculationStatus:
        return {"enabled": self.enabled, "drafts": self.drafts, "draft_tokens": self.draft_tokens,
                "accepted_tokens": self.accepted_tokens, "skipped": {str(k): v for k, v in self.skipped.items()}}
