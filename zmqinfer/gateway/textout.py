"""Sampled token ids -> the text a client sees: streaming detokenization, stop strings, logprobs.

Contract of `TextStream` (one per request, fed in generation order):

* `add(sample)` -> `Delta`: the text that became certain with this token, the logprob entries
  whose text is now fully returned, and a finish reason once the completion is over. After a
  delta with a finish reason, stop feeding it (and close the generator).
* `finish()` -> the last `Delta` when the samples ran out without a finish reason: flushes
  everything held back, reason "length". The scheduler alone counts `max_tokens` (it frees the
  sequence there) and ends the samples after the last one, so this stream never counts them.

Rules:
* Text comes from mlx-lm's streaming detokenizer, so a multi-byte character split over several
  tokens is only returned once complete.
* An EOS token ends the completion with "stop"; its text is never shown and it gets no logprob
  entry (it is not part of the content), but it counts as a completion token.
* Stop strings are matched on the decoded text, across token boundaries. Text that could still
  be the start of a stop string is held back until it is certain; the stop string and anything
  after it are never returned. Finish reason "stop"; the token that completed it is counted.
* Samples that end without EOS or a stop string (`max_tokens` reached) finish with "length".
* mlx-lm's detokenizers drop a leading space from the first token (what chat wants);
  `keep_leading_space=True` puts it back, for legacy completions that continue their prompt.
* Logprob entries travel with their text: an entry is released once all of its token's text has
  been returned. When a stop string cuts the text, the entries of tokens whose text starts at or
  after the cut are dropped (their text was never returned); a token that straddles the cut
  keeps its entry.

`chat_logprobs(entries)` and `completion_logprobs(entries)` give OpenAI's two logprobs shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)

from zmqinfer.protocol.wire import Sample

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class TokenText:
    """A token as OpenAI's logprobs show it: its text and its exact UTF-8 bytes."""

    text: str  # a token holding part of a character shows its bytes escaped, e.g. "\\xf0\\x9f"
    bytes: bytes


@dataclass(frozen=True)
class LogprobEntry:
    token: TokenText
    logprob: float
    top: tuple[tuple[TokenText, float], ...]
    offset: int  # where the token's text starts in the returned completion text


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call as it streams: id and name on its first piece, then argument text."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[LogprobEntry, ...] = ()
    finish_reason: FinishReason | None = None
    reasoning: str = ""  # text inside the model's <think>...</think>
    tool_calls: tuple[ToolCallDelta, ...] = ()


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each of the 256 bytes is stored as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class TokenTexts:
    """Token id -> `TokenText`, memoised per request (a completion repeats tokens a lot)."""

    def __init__(self, tokenizer: TokenizerWrapper) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer  # its vocabulary map is the exact byte source
        self._memo: dict[int, TokenText] = {}

    def __call__(self, token: int) -> TokenText:
        if token not in self._memo:
            data = self._bytes(token)
            self._memo[token] = TokenText(data.decode("utf-8", errors="backslashreplace"), data)
        return self._memo[token]

    def _bytes(self, token: int) -> bytes:
        detok = self._detokenizer
        if isinstance(detok, BPEStreamingDetokenizer) and token < len(detok.tokenmap):
            piece = detok.tokenmap[token]
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode()  # added tokens (<|im_end|>, ...) are stored as plain text
        if isinstance(detok, SPMStreamingDetokenizer) and token < len(detok.tokenmap):
            return detok.tokenmap[token].replace("\u2581".encode(), b" ")
        # Other tokenizers: decoding one token is the best we know (may lose partial bytes).
        return self._tokenizer.decode([token]).encode()


class TextStream:
    """Incremental text for one completion; see the module docstring for the rules."""

    def __init__(self, tokenizer: TokenizerWrapper, *, stop: tuple[str, ...] = (),
                 logprobs: bool = False, keep_leading_space: bool = False) -> None:
        self._detokenizer = tokenizer.detokenizer  # a fresh copy: requests run concurrently
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._stop = stop
        self._texts = TokenTexts(tokenizer)
        self._logprobs = logprobs
        # mlx-lm's BPE/SPM detokenizers drop the space that starts a completion (right for chat);
        # a legacy completion continues its prompt, so " Paris" must stay " Paris".
        self._first_bytes: bytes | None = None if keep_leading_space else b""
        self._decoded = 0  # characters the detokenizer has produced so far
        self._pending = ""  # decoded but not yet returned: could be the start of a stop string
        # Logprob entries not yet released, with the end of their text in decoded characters.
        self._entries: list[tuple[LogprobEntry, int]] = []
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.stop_string: str | None = None  # the stop string that ended it (Anthropic says which)

    def add(self, sample: Sample) -> Delta:
        if self.finish_reason is not None:
            raise RuntimeError("TextStream.add after the completion finished")
        self.completion_tokens += 1
        if sample.token in self._eos:
            self._detokenizer.finalize()  # never add EOS itself: its text must not show
            return self._advance(self._segment(), "stop")
        self._detokenizer.add_token(sample.token)
        if self._first_bytes is None:
            self._first_bytes = self._texts(sample.token).bytes
        start = self._decoded
        segment = self._segment()
        if self._logprobs:
            entry = LogprobEntry(self._texts(sample.token), sample.logprob,
                                 tuple((self._texts(t.token), t.logprob) for t in sample.top),
                                 start)
            self._entries.append((entry, start + len(segment)))
        return self._advance(segment, None)

    def finish(self) -> Delta:
        """The samples ended without EOS or a stop string (max_tokens): flush, reason "length"."""
        if self.finish_reason is not None:
            raise RuntimeError("TextStream.finish after the completion finished")
        self._detokenizer.finalize()
        return self._advance(self._segment(), "length")

    def _segment(self) -> str:
        segment = self._detokenizer.last_segment
        if segment and self._decoded == 0 and self._first_bytes:
            if self._first_bytes.startswith(b" ") and not segment.startswith(" "):
                segment = " " + segment  # the detokenizer trimmed it; see __init__
            self._first_bytes = b""
        return segment

    def _advance(self, segment: str, final: FinishReason | None) -> Delta:
        self._decoded += len(segment)
        pending = self._pending + segment
        base = self._decoded - len(pending)  # decoded offset of pending[0]
        cut, hit = min(((i, s) for s in self._stop if (i := pending.find(s)) >= 0), default=(-1, ""))
        if cut >= 0:
            self._pending = ""
            self.finish_reason = "stop"
            self.stop_string = hit
            return Delta(pending[:cut], self._release(base + cut, starts_before=True), "stop")
        if final is not None:
            self._pending = ""
            self.finish_reason = final
            return Delta(pending, self._release(self._decoded, starts_before=False), final)
        hold = self._held_back(pending)
        self._pending = pending[len(pending) - hold:]
        return Delta(pending[:len(pending) - hold],
                     self._release(self._decoded - hold, starts_before=False))

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[len(text) - n:]):
                    best = n
                    break
        return best

    def _release(self, upto: int, *, starts_before: bool) -> tuple[LogprobEntry, ...]:
        """Entries whose text ends by `upto` (or, at a stop cut, starts before it)."""
        n = 0
        for entry, end in self._entries:
            if (entry.offset < upto) if starts_before else (end <= upto):
                n += 1
            else:
                break
        out = tuple(entry for entry, _ in self._entries[:n])
        self._entries = [] if starts_before else self._entries[n:]
        return out


# ---- OpenAI shapes ----------------------------------------------------------------------------


def chat_logprobs(entries: tuple[LogprobEntry, ...] | list[LogprobEntry]) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion (or chunk)."""
    return {"content": [
        {"token": e.token.text, "logprob": e.logprob, "bytes": list(e.token.bytes),
         "top_logprobs": [{"token": t.text, "logprob": lp, "bytes": list(t.bytes)}
                          for t, lp in e.top]}
        for e in entries
    ]}


def completion_logprobs(entries: tuple[LogprobEntry, ...] | list[LogprobEntry]) -> dict[str, Any]:
    """`choices[i].logprobs` of a legacy completion (or chunk). `top_logprobs` maps token text
    to logprob and, as OpenAI's did, includes the sampled token (so up to logprobs+1 keys);
    `text_offset` counts characters from the start of the completion text (no echo)."""
    return {
        "tokens": [e.token.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{e.token.text: e.logprob} | {t.text: lp for t, lp in e.top}
                         for e in entries],
        "text_offset": [e.offset for e in entries],
    }
