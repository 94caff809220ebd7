"""`zmqinfer bench --simulate`: is every device busy? Measured with simulated devices.

N nodes that sleep a configured cost instead of computing (node/simulated.py) stand in for N
machines; the real gateway, scheduler, wire, sockets and HTTP run between them. Ideal is what N
perfectly pipelined devices give: one token through the ring costs N steps, and with enough
micro-batches in flight a group step completes every `step_ms`, with every device busy all the
time. What the real parts add shows up as the gap.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from zmqinfer.bench import launch, loadgen

PROMPT = [1000 + i for i in range(16)]  # any tokens: a simulated stage ignores them
STATUS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SimOptions:
    stages: int = 3
    step_ms: float = 10.0
    concurrency: int = 16
    tokens: int = 64  # per request: long enough that joining and leaving are a small part
    single_tokens: int = 64


def run(opts: SimOptions, tmp: Path, log: Any = lambda s: None) -> dict[str, Any]:
    log(f"simulated ring: {opts.stages} devices at {opts.step_ms:g} ms a step")
    c = launch.start(tmp, nodes=opts.stages, extra=["--simulate", f"{opts.step_ms:g}"])
    try:
        return asyncio.run(_measure(c.url, opts))
    finally:
        launch.stop(c)


def run_safely(opts: SimOptions, tmp: Path) -> dict[str, Any]:
    """The `simulate` section of a full bench report, or what failed (the rest still reports)."""
    try:
        section: dict[str, Any] = run(opts, tmp)["simulate"]
        return section
    except (RuntimeError, OSError, loadgen.LoadError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/cluster/status", timeout=STATUS_TIMEOUT_S) as r:
        status: dict[str, Any] = json.loads(r.read())
        return status


async def _measure(url: str, opts: SimOptions) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        await loadgen.stream_once(s, url, PROMPT, 8)  # warm: first requests pay for imports
        tps, _ = await loadgen.stream_once(s, url, PROMPT, opts.single_tokens)
        before, t0 = _status(url), time.perf_counter()
        agg = await loadgen.aggregate(s, url, [PROMPT] * opts.concurrency, opts.tokens,
                                      level_timeout_s=60 + opts.tokens * opts.step_ms * opts.stages / 100)
        after, wall = _status(url), time.perf_counter() - t0
    if "error" in agg:
        raise loadgen.LoadError(f"the c={opts.concurrency} level failed: {agg['error']}")
    busy_before = {n["name"]: n["busy_seconds"] for n in before["nodes"]}
    # A node's busy_seconds reach the gateway with its beats (every 0.5 s): over a run of many
    # seconds that lag is a small error, and it is the same at both ends.
    busy = {n["name"]: round((n["busy_seconds"] - busy_before[n["name"]]) / wall, 3) for n in after["nodes"]}
    steps = (after["decode_steps"] - before["decode_steps"]) / wall
    return {"simulate": {
        "stages": opts.stages, "step_ms": opts.step_ms, "concurrency": opts.concurrency,
        "groups": after["groups"], "devices": after["devices"],
        "aggregate_steps_per_s": round(steps, 2), "ideal_steps_per_s": round(1000 / opts.step_ms, 2),
        "aggregate_tokens_per_s": round(agg["tps"], 1), "busy": busy,
        "single_stream_ms_per_token": round(1000 / tps, 2),
        "ideal_ms_per_token": round(opts.stages * opts.step_ms, 2)}}
