"""What an enforced JSON schema costs a decode (issue 20): one streamed chat completion at a
time on the same ring, with and without `response_format: json_schema`, alternated so that both
see the same machine.

The last stage masks each step's logits with the sequence's llguidance matcher (node/grammar.py)
and samples that sequence on its own; this measures what that costs a stream end to end. Decode
tokens/s = (completion tokens - 1) / time from the first content chunk to the end of the stream.
A schema lets the model stop once its JSON closes (then it must be whole); the tokens each run
produced are reported beside its rate. A failed run raises ValueError or loadgen's LoadError
(both in loadgen's FAILURES).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

PROMPT = "List twenty famous novels with their authors and one sentence about each, as JSON."
SCHEMA = {"type": "object", "required": ["novels"], "properties": {"novels": {
    "type": "array", "items": {"type": "object", "required": ["title", "author", "about"],
                               "properties": {"title": {"type": "string"}, "author": {"type": "string"},
                                              "about": {"type": "string"}}}}}}
REQUEST_BASE_S, REQUEST_PER_TOKEN_S = 60.0, 2.0  # as loadgen's: slower is broken, not slow


# loadgen.stream: (first text at, end at, completion tokens, text) of one streamed request.
Stream = Callable[[aiohttp.ClientSession, str, dict[str, Any], aiohttp.ClientTimeout],
                  Awaitable[tuple[float, float, int, str]]]


async def stream_chat(session: aiohttp.ClientSession, url: str, tokens: int, grammar: bool,
                      stream: Stream) -> tuple[float, int]:
    """(decode tokens/s, completion tokens) of one streamed chat completion."""
    body: dict[str, Any] = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if grammar:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "novels", "schema": SCHEMA, "strict": True}}
    first, end, n, text = await stream(session, url + "/v1/chat/completions", body,
                                       aiohttp.ClientTimeout(total=REQUEST_BASE_S + REQUEST_PER_TOKEN_S * tokens))
    if n < 2 or not first:
        raise ValueError(f"{n} token(s): too few to time a decode")
    if grammar and n < tokens:
        json.loads(text)  # it stopped by itself: then its JSON must be whole (ValueError if not)
    return (n - 1) / (end - first), n


async def measure(session: aiohttp.ClientSession, url: str, tokens: int, reps: int,
                  stream: Stream) -> dict[str, Any]:
    """A warm-up of each, then `reps` alternating pairs; medians and their ratio."""
    await stream_chat(session, url, tokens, False, stream)
    await stream_chat(session, url, tokens, True, stream)
    plain, forced = [], []
    for _ in range(reps):
        plain.append(await stream_chat(session, url, tokens, False, stream))
        forced.append(await stream_chat(session, url, tokens, True, stream))
    p, f = statistics.median(r[0] for r in plain), statistics.median(r[0] for r in forced)
    return {"plain_tps": p, "grammar_tps": f, "ratio": round(f / p, 3),
            "plain_runs": [{"tps": t, "tokens": n} for t, n in plain],
            "grammar_runs": [{"tps": t, "tokens": n} for t, n in forced]}


def table(rings: list[dict[str, Any]]) -> str:
    """Markdown: each ring's single stream with and without the schema."""
    rows = []
    for r in rings:
        g = r.get("structured")
        if not g:
            continue
        if "error" in g:
            rows.append(f"| {r['setup']} | failed: {g['error']} | | |")
            continue
        tokens = "/".join(str(x["tokens"]) for x in g["grammar_runs"])
        rows.append(f"| {r['setup']} | {g['plain_tps']:.2f} | {g['grammar_tps']:.2f} ({tokens} tokens) | {g['ratio']}x |")
    if not rows:
        return ""
    return "\n".join(["**Enforced JSON schema**, one streamed chat completion, decode tok/s:",
                      "| ring | plain | json_schema | ratio |", "|---|---|---|---|", *rows])
