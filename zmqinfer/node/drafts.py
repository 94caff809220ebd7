"""Last stage: judge a decode chunk's drafted tokens on the logits of all its positions.

The chunk fed [t0, d1 .. dk]: row i of the logits is the model's next-token distribution after
t0 .. di. Greedy (argmax) accepts d(i+1) while it is row i's argmax, then adds row j's argmax
(the correction, or the bonus when every draft held): exactly the tokens one-at-a-time greedy
decoding picks. A sampled request uses speculative rejection sampling (Leviathan et al. 2023,
Chen et al. 2023) with a point-mass proposal, which is what a deterministic n-gram draft is:
d is accepted with probability p(d); on rejection the token is drawn from p with d removed,
renormalised, so every emitted token follows p exactly as plain sampling would. p is the
request's own sampling distribution (node/sampling.py's `scaled`: top_p, min_p, top_k and
temperature), the reported logprob the model's, as for any sample.
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx

from zmqinfer.node.sampling import SeqSampler, mask_padding
from zmqinfer.protocol.limits import GREEDY_TEMPERATURE
from zmqinfer.protocol.wire import Sample


def judge(sampler: SeqSampler, logits: mx.array, drafts: list[int], vocab: int | None = None) -> list[Sample]:
    """The tokens the chunk yields, in order: the accepted drafts then one more (1 to k + 1).

    logits: [k + 1, vocab] for the chunk's positions; drafts: d1 .. dk. Ids >= `vocab` (the
    tokenizer's size) are never produced. The sampler must `verifies_drafts`."""
    logprobs = mask_padding(logits, vocab)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if sampler.params.temperature < GREEDY_TEMPERATURE:
        picks = _ints(mx.argmax(logprobs, axis=-1))
        n = 0
        while n < len(drafts) and drafts[n] == picks[n]:
            n += 1
        tokens = picks[: n + 1]
    else:
        tokens = _rejection(sampler, logprobs, drafts)
    chosen = _floats(logprobs[mx.arange(len(tokens)), mx.array(tokens)])
    return [Sample(seq=sampler.seq, token=t, logprob=lp) for t, lp in zip(tokens, chosen)]


def _rejection(sampler: SeqSampler, logprobs: mx.array, drafts: list[int]) -> list[int]:
    scaled = sampler.scaled(logprobs)  # [k + 1, vocab]: what each position samples from
    probs = mx.softmax(scaled, axis=-1)
    if drafts:
        d = mx.array(drafts)
        p_draft = _floats(probs[mx.arange(len(drafts)), d])
        coins = _floats(mx.random.uniform(shape=(len(drafts),), key=sampler.draw_key()))
    out: list[int] = []
    for i, draft in enumerate(drafts):
        if coins[i] < p_draft[i]:
            out.append(draft)
            continue
        rest = mx.where(mx.arange(scaled.shape[-1]) == draft, mx.array(-mx.inf, dtype=scaled.dtype), scaled[i])
        if _floats(mx.max(rest))[0] == -mx.inf:  # p(d) rounded below 1 but nothing else is left
            out.append(draft)
            continue
        out.append(_ints(mx.random.categorical(rest[None], key=sampler.draw_key()))[0])
        return out
    out.append(_ints(mx.random.categorical(scaled[len(drafts)][None], key=sampler.draw_key()))[0])
    return out


# 1-D by construction (mlx's stubs type tolist() as any nesting).
def _ints(a: mx.array) -> list[int]:
    return [int(x) for x in cast(list[int], a.reshape(-1).tolist())]


def _floats(a: mx.array) -> list[float]:
    return [float(x) for x in cast(list[float], a.reshape(-1).tolist())]
