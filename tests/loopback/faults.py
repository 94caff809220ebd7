"""Streams under fault: run N greedy streaming chat requests with the real `openai` client,
inject a fault (kill, stop, signal) once every stream is well under way, and measure what the
clients saw: each stream's token pieces with their arrival times, how it ended, when the
gateway noticed the fault and when tokens flowed again.

Used by test_failover.py. Every wait has a deadline; nothing here starts a process.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import openai

from zmqinfer.local import LocalCluster

# Eight prompts whose single-process greedy answers run the full 64 tokens without reaching EOS
# and have no near-tie on the way (smallest logprob gap between the best and second-best token
# over the 64 steps, measured 2026-11-27 with the embedded SmolLM2-135M float32: 0.0087 ..
# 0.086, against float rounding of ~1e-5), so batching them differently after a re-plan cannot
# flip a token.
PROMPTS = [
    "Tell me about the history of the Roman Empire.",
    "Explain photosynthesis to a child.",
    "What are the benefits of regular exercise?",
    "Give me a recipe for pancakes.",
    "Describe a busy city street at night.",
    "Write a short story about a robot who learns to paint.",
    "Write a poem about autumn leaves.",
    "Why do we have seasons on Earth?",
]
MAX_TOKENS = 64
FAULT_AFTER_TOKENS = 8  # inject the fault once every stream has at least this many tokens
READ_TIMEOUT_S = 120.0  # the client's own per-read limit (a silent stream fails, never hangs)


def aclient(url: str, timeout: float = READ_TIMEOUT_S) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=timeout, max_retries=0)


@dataclass
class Stream:
    """What one client saw of one streaming request."""

    prompt: str
    pieces: list[bytes] = field(default_factory=list)  # one per token (logprobs' bytes)
    times: list[float] = field(default_factory=list)  # time.monotonic() each piece arrived
    text: str = ""  # the concatenated content deltas
    finish_reason: str | None = None
    error: BaseException | None = None  # what the client raised, if anything
    hung: bool = False  # still running at the deadline: cancelled by us
    ended_at: float | None = None

    def ended_cleanly(self) -> bool:
        """Completed with a finish reason, or ended by the server with a proper error (an error
        event mid-stream or an HTTP error status): never a dropped connection, never a stream
        that stops without saying why, never a hang."""
        if self.hung:
            return False
        if self.error is None:
            return self.finish_reason is not None
        return isinstance(self.error, openai.APIError) and not isinstance(self.error, openai.APIConnectionError)

    def describe(self) -> str:
        how = ("hung" if self.hung else f"error {type(self.error).__name__}: {self.error}" if self.error
               else f"finish_reason={self.finish_reason}")
        return f"{self.prompt!r}: {len(self.pieces)} tokens, {how}"


async def stream_one(oc: openai.AsyncOpenAI, s: Stream, max_tokens: int = MAX_TOKENS) -> None:
    """One greedy streaming chat request, recorded into `s`; never raises (errors are kept)."""
    try:
        stream = await oc.chat.completions.create(
            model="default", messages=[{"role": "user", "content": s.prompt}], max_tokens=max_tokens,
            temperature=0, stream=True, logprobs=True)
        async for chunk in stream:
            now = time.monotonic()
            for ch in chunk.choices:
                s.text += ch.delta.content or ""
                if ch.logprobs is not None and ch.logprobs.content:
                    for t in ch.logprobs.content:
                        s.pieces.append(bytes(t.bytes) if t.bytes is not None else t.token.encode())
                        s.times.append(now)
                if ch.finish_reason is not None:
                    s.finish_reason = ch.finish_reason
    except asyncio.CancelledError:
        s.hung = True
        raise
    except Exception as e:  # noqa: BLE001 - every failure is the observation
        s.error = e
    finally:
        s.ended_at = time.monotonic()


async def run_streams(url: str, prompts: list[str], deadline_s: float, max_tokens: int = MAX_TOKENS,
                      during: Callable[[list[Stream]], Awaitable[Any]] | None = None) -> list[Stream]:
    """All `prompts` at once; `during(streams)` runs alongside them (the fault injector).
    Streams still open after `deadline_s` are cancelled and marked hung. If `during` raises, or
    has not finished by the deadline, that is raised (TimeoutError) after every task is gone."""
    streams = [Stream(p) for p in prompts]
    t_end = time.monotonic() + deadline_s
    async with aclient(url) as oc:
        tasks = [asyncio.create_task(stream_one(oc, s, max_tokens)) for s in streams]
        side = asyncio.create_task(during(streams)) if during is not None else None
        everything = [*tasks, *([side] if side is not None else [])]
        try:
            pending: set[asyncio.Task[Any]] = set(everything)
            while pending and (left := t_end - time.monotonic()) > 0:
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if side is not None and side in done:
                    side.result()  # the injector failed: stop here and say why
        finally:
            for t in everything:
                t.cancel()
            await asyncio.gather(*everything, return_exceptions=True)
        if side is not None and side.cancelled():
            raise TimeoutError(f"the fault step did not finish within {deadline_s:.0f}s: "
                               + "; ".join(s.describe() for s in streams))
    return streams


async def until_all_have(streams: list[Stream], n: int, timeout: float) -> None:
    """Wait until every stream has `n` tokens (or has ended); TimeoutError names the laggards."""
    deadline = time.monotonic() + timeout
    while not all(len(s.pieces) >= n or s.ended_at is not None for s in streams):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every stream reached {n} tokens within {timeout:.0f}s: "
                               + "; ".join(s.describe() for s in streams))
        await asyncio.sleep(0.02)


async def astatus(c: LocalCluster, timeout: float = 2.0) -> dict | None:
    """/cluster/status without blocking the event loop; None when the gateway does not answer."""
    try:
        return await asyncio.to_thread(c.status, timeout)
    except OSError:
        return None


def node_entry(status: dict, name: str) -> dict | None:
    return next((n for n in status["nodes"] if n["name"] == name), None)


def shows_dead(status: dict | None, name: str) -> bool:
    """The status names `name` as not alive (or no longer lists it)."""
    if status is None:
        return False
    n = node_entry(status, name)
    return n is None or n.get("alive") is False


async def detect(c: LocalCluster, name: str, since: float, timeout: float, every: float = 0.1) -> float | None:
    """Seconds from `since` until /cluster/status shows `name` dead, polled every `every` s;
    None if not within `timeout`."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        if shows_dead(await astatus(c), name):
            return time.monotonic() - since
        await asyncio.sleep(every)
    return None


@dataclass
class Comparison:
    """A run's streams against their no-fault outputs."""

    exact: int = 0  # streams identical to their no-fault output
    lost: int = 0  # no-fault tokens missing from the outputs
    repeated: int = 0  # tokens in the outputs that the no-fault outputs do not have
    changed: int = 0  # tokens replaced by others
    problems: list[str] = field(default_factory=list)


def compare(streams: list[Stream], expected: dict[str, "Stream"]) -> Comparison:
    """Token-for-token: the same pieces in the same order, the same text, the same finish."""
    out = Comparison()
    for s in streams:
        want = expected[s.prompt]
        ops = difflib.SequenceMatcher(a=want.pieces, b=s.pieces, autojunk=False).get_opcodes()
        for tag, i1, i2, j1, j2 in ops:
            if tag == "delete":
                out.lost += i2 - i1
            elif tag == "insert":
                out.repeated += j2 - j1
            elif tag == "replace":
                out.changed += max(i2 - i1, j2 - j1)
        same = (s.pieces == want.pieces and s.text == want.text and s.finish_reason == want.finish_reason
                and s.error is None and not s.hung)
        if same:
            out.exact += 1
        else:
            k = next((i for i, (a, b) in enumerate(zip(want.pieces, s.pieces)) if a != b),
                     min(len(want.pieces), len(s.pieces)))
            out.problems.append(f"{s.describe()}; first difference at token {k}: got "
                                f"{b''.join(s.pieces[k:k + 6])!r}, no-fault {b''.join(want.pieces[k:k + 6])!r}")
    return out


@dataclass
class Timings:
    """When things happened after the fault (seconds from the fault; None: never seen)."""

    fault: str
    at: float  # time.monotonic() of the fault
    detected_s: float | None  # /cluster/status shows the node dead
    first_token_any_s: float | None  # the first token any stream got after the fault
    first_token_all_s: float | None  # by then every stream still running had one
    resumed_any_s: float | None  # the same, counting only tokens after detection: the replay
    resumed_all_s: float | None
    longest_stall_s: float  # the longest gap between two tokens of one stream
    tokens_before_fault: list[int]
    streams_running_at_fault: int


def timings(fault: str, streams: list[Stream], t_fault: float, counts_at_fault: list[int],
            detected_s: float | None) -> Timings:
    running = [(s, k) for s, k in zip(streams, counts_at_fault) if s.ended_at is None or s.ended_at > t_fault]

    def first_after(t0: float) -> tuple[float | None, float | None]:
        firsts = [next((t for t in s.times if t > t0), None) for s, _ in running]
        seen = [t for t in firsts if t is not None]
        any_ = min(seen) - t_fault if seen else None
        all_ = max(seen) - t_fault if seen and len(seen) == len(firsts) else None
        return any_, all_

    any_, all_ = first_after(t_fault)
    r_any, r_all = first_after(t_fault + detected_s) if detected_s is not None else (None, None)
    stall = max((b - a for s in streams for a, b in zip(s.times, s.times[1:])), default=0.0)
    return Timings(fault, t_fault, detected_s, any_, all_, r_any, r_all, stall, counts_at_fault, len(running))


def report(test: str, data: dict[str, Any], tmp_dir: Path) -> None:
    """Print one test's measurements (flushed, for `pytest -s` and CI logs) and write them to
    tmp_dir/failover.json and, when $ZMQINFER_FAILOVER_REPORT is set, merge them into that file
    keyed by test name."""
    line = json.dumps({test: data}, default=_plain)
    print(f"\nfailover report: {line}", flush=True)
    targets = [tmp_dir / "failover.json"]
    if os.environ.get("ZMQINFER_FAILOVER_REPORT"):
        targets.append(Path(os.environ["ZMQINFER_FAILOVER_REPORT"]))
    for path in targets:
        try:
            merged = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            merged = {}
        merged[test] = json.loads(line)[test]
        path.write_text(json.dumps(merged, indent=2) + "\n")


def _plain(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)
