"""A growing conversation's time to first token, with and without the prefix cache (issue 22).

Each turn's prompt is the previous turn's plus `growth` new tokens (its reply and the next user
message, as a chat client re-sends them), so with the cache every turn after the first prefills
only its new tokens. "Without" runs on the same ring: the same prompts, each with a first token
no other prompt starts with, so no cached prefix can serve any of them (a cold prompt of the
same length, which is what every turn costs with no cache at all).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import aiohttp

# The turns from this one on are compared (the "turns 5-10"): long enough to matter.
LATE_TURN = 5
# First tokens for the cold prompts: ordinary ids, one per turn, none a template's first token.
COLD_FIRST = 1000


def turns(first: list[int], extra: Callable[[int], list[int]], n: int) -> list[list[int]]:
    """`n` prompts, each the previous one plus `extra(turn)`."""
    out = [list(first)]
    while len(out) < n:
        out.append(out[-1] + extra(len(out)))
    return out


def cold(prompts: list[list[int]]) -> list[list[int]]:
    return [[COLD_FIRST + i, *p[1:]] for i, p in enumerate(prompts)]


async def measure(session: aiohttp.ClientSession, url: str, work: dict[str, Any],
                  first_token: Callable[[aiohttp.ClientSession, str, list[int]], Any]) -> dict[str, Any]:
    """Cold first (so nothing it leaves behind can serve the warm run), then the conversation."""
    prompts = work["turns"]
    without = [await first_token(session, url, p) for p in cold(prompts)]
    with_cache = [await first_token(session, url, p) for p in prompts]
    late = slice(min(LATE_TURN - 1, len(prompts) - 1), None)
    w, c = statistics.median(with_cache[late]), statistics.median(without[late])
    return {"turns": len(prompts), "prompt_tokens": [len(p) for p in prompts],
            "with_cache_s": with_cache, "without_cache_s": without, "late_from_turn": late.start + 1,
            "late_with_cache_s": w, "late_without_cache_s": c, "late_speedup": round(c / w, 2) if w else None}


def table(rings: list[dict[str, Any]]) -> str:
    """Markdown: each ring's late turns' time to first token with and without the cache."""
    rows = []
    for r in rings:
        c = r["conversation"]
        if "error" in c:
            rows.append(f"| {r['setup']} | failed: {c['error']} | | | |")
            continue
        rows.append(f"| {r['setup']} | {c['turns']} turns, {c['prompt_tokens'][-1]} tokens at the last | "
                    f"{1000 * c['late_with_cache_s']:.0f} ms | {1000 * c['late_without_cache_s']:.0f} ms | "
                    f"{c['late_speedup']}x |")
    if not rows:
        return ""
    return "\n".join(["Conversation (prefix cache), median time to first token of the late turns:",
                      "| server | conversation | with cache | without | speedup |", "|---|---|---|---|---|", *rows])
