"""HTTP load against a running gateway, timed the way a client sees it.

`measure(url, work, level_timeout_s)` runs, in order, on one ring:

* ping: `POST /cluster/ping` a few times while the ring is idle (ring probe and control round
  trips, medians);
* single stream: one streaming `/v1/completions` at a time; decode tokens/s = (tokens - 1) /
  time from the first text chunk to the end of the stream;
* an enforced JSON schema's cost to one stream (structured.py);
* time to first token: a non-streaming request with `max_tokens=1` per prompt of exactly N
  tokens (sent as token ids), whose response arrives the moment that token exists;
* aggregate: each concurrency level's prompts all at once (non-streaming, greedy, same
  max_tokens); tokens/s = completion tokens of all of them / wall time from the first send to
  the last response. A level must finish within `level_timeout_s` or it is reported as failed
  (and larger levels are skipped): a slow ring is a result, never a hang. Each level also
  reports the CPU milliseconds each of the named processes spent per generated token.

`work` is the same workload the single-process baseline gets (`baseline.py`), so both sides
process identical token ids. The first repetition of each single request warms and is dropped.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import psutil

from zmqinfer.bench import conversation, structured

REQUEST_BASE_S = 60.0  # any single request: this much plus REQUEST_PER_TOKEN_S per token asked
REQUEST_PER_TOKEN_S = 2.0  # a ring slower than 0.5 tok/s for one stream is broken, not slow
CONTROL_TIMEOUT_S = 15.0  # /cluster/ping waits up to a second per node plus a 5 s probe


class LoadError(RuntimeError):
    """A request failed (HTTP error, short answer, deadline): the measurement is not valid."""


def _body(prompt: list[int] | str, max_tokens: int, stream: bool, model: str = "bench") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _timeout(tokens: int) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=REQUEST_BASE_S + REQUEST_PER_TOKEN_S * tokens)


async def _post_json(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                     timeout: aiohttp.ClientTimeout) -> dict[str, Any]:
    async with session.post(url, json=body, timeout=timeout) as r:
        text = await r.text()
        if r.status != 200:
            raise LoadError(f"HTTP {r.status} from {url}: {text[:300]}")
        return json.loads(text)


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 timeout: aiohttp.ClientTimeout) -> tuple[float, float, int, str]:
    """One streamed completion (legacy or chat, `body` says which, with usage included): when
    its first text arrived and the stream ended (perf_counter), its completion tokens and text.
    LoadError on an HTTP error or an error mid-stream."""
    first, n, text = 0.0, 0, ""
    async with session.post(url, json=body, timeout=timeout) as r:
        if r.status != 200:
            raise LoadError(f"HTTP {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise LoadError(f"error mid-stream: {chunk['error']}")
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                choice = chunk["choices"][0]
                if piece := choice.get("text") or (choice.get("delta") or {}).get("content"):
                    text += piece
                    first = first or time.perf_counter()
    return first, time.perf_counter(), n, text


async def stream_once(session: aiohttp.ClientSession, url: str, prompt: list[int],
                      tokens: int) -> tuple[float, float]:
    """(decode tokens/s, time to first text) of one streaming completion."""
    t0 = time.perf_counter()
    first, end, n, _ = await stream(session, url + "/v1/completions", _body(prompt, tokens, True),
                                    _timeout(tokens))
    if n != tokens or not first:
        raise LoadError(f"expected {tokens} tokens, got {n}: the prompt must not stop early")
    return (n - 1) / (end - first), first - t0


async def first_token(session: aiohttp.ClientSession, url: str, prompt: list[int] | str,
                      model: str = "bench") -> float:
    t0 = time.perf_counter()
    r = await _post_json(session, url + "/v1/completions", _body(prompt, 1, False, model),
                         _timeout(len(prompt) // 64 + 1))
    if r["usage"]["completion_tokens"] != 1:
        raise LoadError(f"expected 1 token, got {r['usage']['completion_tokens']}")
    return time.perf_counter() - t0


async def aggregate(session: aiohttp.ClientSession, url: str, prompts: Sequence[list[int] | str],
                    max_tokens: int, level_timeout_s: float, model: str = "bench") -> dict[str, Any]:
    """All `prompts` at once; completion tokens / wall time, or an error saying what failed.
    `model`: what the body names (the gateway serves one; mlx_lm.server loads what it names)."""
    done: list[int] = []

    async def one(prompt: list[int] | str) -> None:
        r = await _post_json(session, url + "/v1/completions", _body(prompt, max_tokens, False, model),
                             aiohttp.ClientTimeout(total=level_timeout_s + 5))
        done.append(r["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(level_timeout_s):
            async with asyncio.TaskGroup() as tg:  # the first failure cancels the rest
                for p in prompts:
                    tg.create_task(one(p))
    except TimeoutError:
        return {"error": f"{len(done)} of {len(prompts)} requests finished within {level_timeout_s:.0f}s",
                "timed_out": True, "requests": len(prompts)}
    except ExceptionGroup as eg:  # the first failing request, which cancelled the others
        return {"error": why(eg.exceptions[0]), "requests": len(prompts)}
    wall = time.perf_counter() - t0
    return {"tokens": sum(done), "wall_s": wall, "tps": sum(done) / wall, "requests": len(prompts)}


async def ping(session: aiohttp.ClientSession, url: str, times: int) -> dict[str, Any]:
    rings: list[float] = []
    control: dict[str, list[float]] = {}
    errors: list[str] = []
    for _ in range(times):
        r = await _post_json(session, url + "/cluster/ping", {}, aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S))
        if r.get("ring_ms") is not None:
            rings.append(r["ring_ms"])
        else:
            errors.append(r.get("ring_error", "?"))
        for n in r.get("nodes", []):
            if "control_ms" in n:
                control.setdefault(n["name"], []).append(n["control_ms"])
    return {"ring_ms": statistics.median(rings) if rings else None, "ring_runs": rings,
            "control_ms": {k: statistics.median(v) for k, v in control.items()}, "errors": errors}


def why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (deadline passed?)"


FAILURES = (LoadError, aiohttp.ClientError, TimeoutError, KeyError, ValueError)


def cpu_seconds(procs: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, all threads) each named process has used; gone ones left out."""
    out = {}
    for name, pid in procs.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[name] = t.user + t.system
    return out


def cpu_ms_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """Each process's CPU milliseconds per generated token between two `cpu_seconds` readings."""
    return {n: round(1000 * (after[n] - before[n]) / max(1, tokens), 2) for n in before if n in after}


async def aggregate_cpu(session: aiohttp.ClientSession, url: str, prompts: Sequence[list[int] | str],
                        max_tokens: int, level_timeout_s: float, procs: dict[str, int],
                        model: str = "bench") -> dict[str, Any]:
    """`aggregate`, plus what it cost each of `procs` in CPU per generated token."""
    before = cpu_seconds(procs)
    r = await aggregate(session, url, prompts, max_tokens, level_timeout_s, model)
    if "error" not in r:
        r["cpu_ms_per_token"] = cpu_ms_per_token(before, cpu_seconds(procs), r["tokens"])
    return r


async def measure(url: str, work: dict[str, Any], level_timeout_s: float, pings: int,
                  procs: dict[str, int] | None = None) -> dict[str, Any]:
    """Every measurement of one ring (see the module docstring); a part that fails says why in
    its place and the others still run."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        try:
            await _warm(s, url)
        except (*FAILURES, ExceptionGroup) as e:
            first = e.exceptions[0] if isinstance(e, ExceptionGroup) else e
            return {"error": f"warm-up request failed: {why(first)}"}
        try:
            out["ping"] = await ping(s, url, pings)
        except FAILURES as e:
            out["ping"] = {"error": why(e)}
        if work.get("single"):
            w = work["single"]
            try:
                streams = [await stream_once(s, url, w["prompt"], w["tokens"]) for _ in range(w["reps"] + 1)]
                tps = [r[0] for r in streams[1:]]
                out["single"] = {"decode_tps": statistics.median(tps), "runs": tps, "tokens": w["tokens"],
                                 "ttft_s": statistics.median(r[1] for r in streams[1:])}
            except FAILURES as e:
                out["single"] = {"error": why(e)}
        out["ttft"] = {}
        for length, prompts in work.get("ttft", {}).items():
            try:
                firsts = [await first_token(s, url, p) for p in prompts]
                out["ttft"][length] = {"median_s": statistics.median(firsts[1:]), "runs": firsts[1:]}
            except FAILURES as e:
                out["ttft"][length] = {"error": why(e)}
        if work.get("structured"):
            w = work["structured"]
            try:
                out["structured"] = await structured.measure(s, url, w["tokens"], w["reps"], stream)
            except FAILURES as e:
                out["structured"] = {"error": why(e)}
        if work.get("conversation"):  # before the batch levels: their prompts would not evict it
            try:
                out["conversation"] = await conversation.measure(s, url, work["conversation"], first_token)
            except FAILURES as e:
                out["conversation"] = {"error": why(e)}
        out["batch"] = {}
        skip = ""
        for c, level in work.get("batch", {}).items():
            if skip:
                out["batch"][c] = {"error": skip, "requests": len(level["prompts"])}
                continue
            runs = [await aggregate_cpu(s, url, level["prompts"], level["max_tokens"], level_timeout_s, procs or {})
                    for _ in range(level["reps"])]
            failed = next((r for r in runs if "error" in r), None)
            if failed is not None:
                out["batch"][c] = failed
                if failed.get("timed_out"):
                    skip = f"skipped: concurrency {c} did not finish within {level_timeout_s:.0f}s"
                continue
            best = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]
            out["batch"][c] = {**best, "runs": [r["tps"] for r in runs]}
    out["measure_s"] = round(time.perf_counter() - t0, 1)
    return out


async def _warm(s: aiohttp.ClientSession, url: str) -> None:
    """A concurrent pair of short requests: first-use costs (connections, mlx kernels for one and
    for a batch of sequences) belong to no measurement."""
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    async with asyncio.TaskGroup() as tg:
        for i in range(2):
            tg.create_task(_post_json(s, url + "/v1/completions", _body(prompt[i:], 3, False), _timeout(3)))
