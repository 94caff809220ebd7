"""Last-stage sampling: logits -> (token, logprob, top alternatives), per sequence.

Built from mlx-lm's own pieces (`make_logits_processors`, `apply_top_p` / `apply_min_p` /
`apply_top_k`) in the order `make_sampler` applies them, so a request samples as it would in
mlx-lm. Two differences, both deliberate: the random draw uses a per-sequence key (seeded from
the request's `seed`) instead of mlx's global state, so concurrent requests never perturb each
other's randomness; and the processors see every token of the sequence (prompt included), which
travel the ring with each chunk. Runs on the mlx thread only.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
)

from zmqinfer.node.grammar import Matcher
from zmqinfer.protocol.limits import GREEDY_TEMPERATURE
from zmqinfer.protocol.wire import Sample, SamplingParams, SeqId, TokenLogprob


class SeqSampler:
    def __init__(self, seq: SeqId, params: SamplingParams, grammar_tokenizer: Any = None) -> None:
        """`grammar_tokenizer`: grammar.py's, needed when `params.grammar` is set."""
        self.seq = seq
        self.params = params
        self._grammar: Matcher | None = None
        if params.grammar is not None:
            if grammar_tokenizer is None:
                raise ValueError("this node has no tokenizer to enforce a grammar with")
            self._grammar = Matcher(grammar_tokenizer, params.grammar, params.grammar_start,
                                    params.grammar_after, params.grammar_opener)
        self._processors = make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty,
            repetition_context_size=params.penalty_context,
            presence_penalty=params.presence_penalty,
            presence_context_size=params.penalty_context,
            frequency_penalty=params.frequency_penalty,
            frequency_context_size=params.penalty_context,
        )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._key = mx.random.key(seed)
        # Only the penalties read history, and only its last `penalty_context` tokens.
        self._history: list[int] = []

    def observe(self, tokens: mx.array) -> None:
        """Every token that enters the sequence, in order (prompt chunks and sampled tokens)."""
        if self._grammar is not None:
            self._grammar.observe(_ints(tokens))
        if self._processors:
            self._history.extend(_ints(tokens))
            del self._history[: -self.params.penalty_context]

    @property
    def plain_greedy(self) -> bool:
        """Argmax with nothing else to compute: such sequences are sampled as one batch."""
        p = self.params
        return (p.temperature < GREEDY_TEMPERATURE and not self._processors and p.top_logprobs == 0
                and self._grammar is None)

    @property
    def verifies_drafts(self) -> bool:
        """Drafted tokens can be judged on logits alone (speculation, node/drafts.py): no
        grammar or penalty (their state would have to advance through each draft) and no
        alternatives to report. The gateway drafts only for such requests."""
        return not self._processors and self._grammar is None and self.params.top_logprobs == 0

    def scaled(self, logprobs: mx.array) -> mx.array:
        """The logits a sampled request draws from: top_p, min_p and top_k applied to
        `logprobs` (mlx-lm's `make_sampler` order), over the temperature."""
        p = self.params
        filtered = logprobs
        if 0 < p.top_p < 1.0:
            filtered = apply_top_p(filtered, p.top_p)
        if p.min_p != 0.0:
            filtered = apply_min_p(filtered, p.min_p)
        if 0 < p.top_k < logprobs.shape[-1]:
            filtered = apply_top_k(filtered, p.top_k)
        return filtered * (1.0 / p.temperature)

    def draw_key(self) -> mx.array:
        """A fresh key for one random draw, from the sequence's own stream."""
        self._key, draw = mx.random.split(self._key)
        return draw

    def sample(self, logits: mx.array) -> Sample:
        """logits: [1, vocab] of the sequence's newest position."""
        p = self.params
        if self._processors and self._history:
            hist = mx.array(self._history, dtype=mx.int32)
            for proc in self._processors:
                logits = proc(hist, logits)
        if self._grammar is not None:  # before the softmax: logprobs are of the allowed tokens
            logits = self._grammar.mask(logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if p.temperature < GREEDY_TEMPERATURE:  # 1/T would overflow the logits to inf and NaN
            token = mx.argmax(logprobs, axis=-1)
        else:
            token = mx.random.categorical(self.scaled(logprobs), key=self.draw_key())
        tok = _ints(token.reshape(-1))[0]
        lp = logprobs[0]
        top: tuple[TokenLogprob, ...] = ()
        if p.top_logprobs > 0:
            k = min(p.top_logprobs, lp.shape[-1])
            ids = mx.argpartition(-lp, kth=k - 1)[:k]
            vals = lp[ids]
            order = mx.argsort(-vals)
            top = tuple(TokenLogprob(i, v) for i, v in zip(_ints(ids[order]), _floats(vals[order])))
        return Sample(seq=self.seq, token=tok, logprob=_floats(lp[tok : tok + 1])[0], top=top)


def mask_padding(logits: mx.array, vocab: int | None) -> mx.array:
    """-inf for the ids >= `vocab` (the tokenizer's): some models' embeddings are padded past
    their tokenizer (Qwen3: 151936 rows, 151669 tokens), and a padding id, once sampled, is a
    token nobody can decode. None or a vocabulary that fills the logits: unchanged."""
    width = logits.shape[-1]
    if vocab is None or vocab >= width:
        return logits
    return mx.where(mx.arange(width) < vocab, logits, mx.array(-mx.inf, dtype=logits.dtype))


def sample_batch(samplers: list[SeqSampler], logits: mx.array, vocab: int | None = None) -> list[Sample]:
    """One Sample per row of logits [B, vocab]. Plain greedy rows are done together (one
    logsumexp, one argmax, one sync for the whole group); the rest one by one. Ids >= `vocab`
    (the tokenizer's size) are never sampled."""
    logits = mask_padding(logits, vocab)
    out: list[Sample | None] = [None] * len(samplers)
    plain = [i for i, s in enumerate(samplers) if s.plain_greedy]
    if plain:
        rows = logits[mx.array(plain)] if len(plain) < len(samplers) else logits
        logprobs = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
        tokens = mx.argmax(logprobs, axis=-1)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        for i, tok, lp in zip(plain, _ints(tokens), _floats(chosen)):
            out[i] = Sample(seq=samplers[i].seq, token=tok, logprob=lp)
    for i, s in enumerate(samplers):
        if out[i] is None:
            out[i] = s.sample(logits[i : i + 1])
    return [x for x in out if x is not None]


# mlx's stubs type tolist() as any nesting of scalars; these are 1-D by construction.
def _ints(a: mx.array) -> list[int]:
    return [int(x) for x in cast(list[int], a.tolist())]


def _floats(a: mx.array) -> list[float]:
    return [float(x) for x in cast(list[float], a.tolist())]


def tokenizer_size(model_path: Path) -> int | None:
    """How many token ids the model's tokenizer can decode, or None for a directory without one
    (test models: every embedding row is then a token)."""
    from mlx_lm.utils import load_tokenizer

    try:
        return len(load_tokenizer(model_path))
    except (OSError, ValueError):  # no tokenizer files here
        return None
