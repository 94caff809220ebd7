"""The last stage's grammar matcher: which tokens a grammar-constrained sequence may sample next.

* `grammar_tokenizer(model_path)` -> llguidance's view of the model's tokenizer, built once when
  the last stage loads (~0.5 s for a 49k vocabulary), or None without tokenizer files.
* `Matcher(tokenizer, grammar, start)`: one per sequence. `observe(tokens)` is fed every token
  the sequence carries in order, prompt included (sampling.SeqSampler does it); tokens at
  positions >= `start` advance the grammar. So the state is rebuilt from the token history
  alone: a sequence replayed after a failover (its prompt and generated tokens prefilled anew)
  arrives at the same state. With `after` (a thinking model's end-of-reasoning marker) the
  grammar waits for the reasoning: from the start when the prompt opened the think block, or,
  with `opener` (the think-start token), when the first generated token is that opener (the
  first position allows it beside what the grammar allows). While it waits nothing is masked. `mask(logits)` sets every token the grammar forbids to -inf; once
  the grammar is complete only EOS remains.
* The gateway compiled the grammar first (gateway/grammar.py, same limits), so a matcher that
  fails to build, or errs later (a token it did not allow), is a bug or a hostile peer: the
  sequence is then forced to end (EOS only) rather than run unconstrained.
"""

from __future__ import annotations

from copy import copy
from pathlib import Path

import mlx.core as mx
import numpy as np
import structlog
from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

log = structlog.get_logger()

# llguidance's per-step limits (its defaults): a mask step is bounded by this fuel (~15 ms at
# its measured speed), so no grammar can stall the stage for long on any one token.
LIMITS = LLParserLimits(step_lexer_fuel=200_000, step_max_items=50_000)


def grammar_tokenizer(model_path: Path) -> LLTokenizer | None:
    from mlx_lm.utils import load_tokenizer

    try:
        tok = load_tokenizer(model_path)
    except (OSError, ValueError):  # no tokenizer files here (test models)
        return None
    return tokenizer_from(tok)


def tokenizer_from(tok: object) -> LLTokenizer:
    """An mlx-lm TokenizerWrapper (or a fast HF tokenizer) -> llguidance's tokenizer, with the
    wrapper's EOS ids (a chat model's end-of-turn, which the HF tokenizer may not name)."""
    hf = getattr(tok, "_tokenizer", tok)
    backend = copy(hf.backend_tokenizer)  # type: ignore[attr-defined]
    backend.no_padding()
    backend.no_truncation()
    eos = sorted(getattr(tok, "eos_token_ids", None) or [hf.eos_token_id])  # type: ignore[attr-defined]
    return LLTokenizer(backend.to_str(), eos_token=eos)


class Matcher:
    def __init__(self, tokenizer: LLTokenizer, grammar: str, start: int,
                 after: tuple[int, ...] = (), opener: int | None = None) -> None:
        self._m = LLMatcher(tokenizer, grammar, limits=LIMITS, log_level=0)
        self._after = list(after)
        self._opener = opener if after else None
        # "choice": the first position may open reasoning; "reasoning": waiting for `after`
        self._state = "grammar" if not after else ("choice" if opener is not None else "reasoning")
        self._tail: list[int] = []  # the last generated tokens, while waiting for `after`
        self._vocab = tokenizer.vocab_size
        self._eos = tokenizer.eos_token
        self._start = start
        self._seen = 0  # tokens of the sequence observed so far (its next position)
        self._bits = allocate_token_bitmask(1, self._vocab)
        if self._m.is_error():
            log.warning("grammar matcher failed to build", error=self._m.get_error()[:200])

    @property
    def active(self) -> bool:
        return self._state != "reasoning"

    def observe(self, tokens: list[int]) -> None:
        skip = max(0, self._start - self._seen)
        self._seen += len(tokens)
        tokens = tokens[skip:]
        if tokens and self._state == "choice":
            self._state = "reasoning" if tokens[0] == self._opener else "grammar"
            if self._state == "reasoning":
                tokens = tokens[1:]
        while tokens and self._state == "reasoning":  # wait for its end marker, token by token
            self._tail = (self._tail + [tokens.pop(0)])[-len(self._after):]
            if self._tail == self._after:
                self._state = "grammar"
        if tokens and not self._m.is_error():
            self._m.consume_tokens(tokens)
            if self._m.is_error():
                log.warning("grammar matcher erred", error=self._m.get_error()[:200])

    def mask(self, logits: mx.array) -> mx.array:
        """logits [1, width] with every token the grammar forbids at -inf."""
        if not self.active:
            return logits
        width = logits.shape[-1]
        if self._m.is_error():
            allowed = np.zeros(width, dtype=bool)
            allowed[self._eos] = True
        else:
            fill_next_token_bitmask(self._m, self._bits, 0)
            bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self._vocab]
            allowed = np.zeros(width, dtype=bool)
            n = min(width, self._vocab)
            allowed[:n] = bits[:n].astype(bool)
            if self._state == "choice" and self._opener is not None and self._opener < width:
                allowed[self._opener] = True
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))
