"""`zmqinfer bench --simulate`: is every device busy? Measured with simulated devices.

N nodes that sleep a configured cost instead of computing (node/simulated.py) stand in for N
machines; the real gateway, scheduler, wire, sockets and HTTP run between them. Ideal is what N
perfectly pipelined devices give: one token through the ring costs N steps, and with enough
micro-batches in flight a group step completes every `step_ms`, with every device busy all the
time. What the real parts add shows up as the gap.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from zmqinfer import local
from zmqinfer.bench import loadgen

PROMPT = [1000 + i for i in range(16)]  # any tokens: a simulated stage ignores them
STATUS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SimOptions:
    stages: int = 3
    step_ms: float = 10.0
    concurrency: int = 16
    tokens: int | None = None  # per request at `concurrency`; None: enough to outlast the window
    single_tokens: int = 64
    warm_s: float = 1.5  # after the load starts: every request joined its group
    window_s: float = 5.0  # busy and steps/s are measured over this much of the load

    def load_tokens(self) -> int:
        """Tokens per request such that the load outlasts the window (plus 2 s) even at the
        ideal rate: every group steps once per token, and the ring steps 1000/step_ms times a
        second in all (3 devices at 10 ms, 4 groups: 213 tokens, ~8.5 s)."""
        if self.tokens is not None:
            return self.tokens
        groups = self.stages + 1 if self.stages > 1 else 1  # as gateway/admission.groups() sizes them
        return math.ceil((self.warm_s + self.window_s + 2) * 1000 / self.step_ms / groups)


def run(opts: SimOptions, tmp: Path, log: Any = lambda s: None) -> dict[str, Any]:
    log(f"simulated ring: {opts.stages} devices at {opts.step_ms:g} ms a step")
    c = local.start(tmp, nodes=opts.stages, extra=["--simulate", f"{opts.step_ms:g}"])
    try:
        return asyncio.run(_measure(c.url, opts))
    finally:
        local.stop(c)


def run_safely(opts: SimOptions, tmp: Path) -> dict[str, Any]:
    """The `simulate` section of a full bench report, or what failed (the rest still reports)."""
    try:
        section: dict[str, Any] = run(opts, tmp)["simulate"]
        return section
    except (RuntimeError, OSError, loadgen.LoadError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


async def _status(s: aiohttp.ClientSession, url: str) -> tuple[float, dict[str, Any]]:
    """(when it was read, /cluster/status) without blocking the load running beside it."""
    async with s.get(url + "/cluster/status", timeout=aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)) as r:
        return time.perf_counter(), await r.json()


def _beats(at: float, status: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per node: (when its latest beat arrived, on our clock; the busy seconds it reported)."""
    return {n["name"]: (at - n["last_heartbeat_s"], n["busy_seconds"]) for n in status["nodes"]}


async def _measure(url: str, opts: SimOptions) -> dict[str, Any]:
    """One stream alone, then `concurrency` requests at once. Busy and steps/s are the steady
    state: measured over a window inside the load (`warm_s` after it starts, for `window_s`), so
    the ramps where requests join and finish, which any finite batch of requests has, are not
    counted against the pipeline. Busy is each node's own busy seconds over the time between
    the two beats that carried them."""
    async with aiohttp.ClientSession() as s:
        await loadgen.stream_once(s, url, PROMPT, 8)  # warm: first requests pay for imports
        tps, _ = await loadgen.stream_once(s, url, PROMPT, opts.single_tokens)
        t0 = time.perf_counter()
        load = asyncio.create_task(loadgen.aggregate(
            s, url, [PROMPT] * opts.concurrency, opts.load_tokens(),
            level_timeout_s=60 + opts.load_tokens() * opts.step_ms * opts.stages / 100))
        await asyncio.sleep(opts.warm_s)
        a_at, a = await _status(s, url)
        await asyncio.sleep(opts.window_s)
        b_at, b = await _status(s, url)
        inside = not load.done()
        agg = await load
    if "error" in agg:
        raise loadgen.LoadError(f"the c={opts.concurrency} level failed: {agg['error']}")
    if not inside:
        raise loadgen.LoadError(f"the c={opts.concurrency} load ended within {time.perf_counter() - t0:.1f}s,"
                                f" before the {opts.warm_s}+{opts.window_s}s window: ask for more tokens")
    ba, bb = _beats(a_at, a), _beats(b_at, b)
    busy = {n: round((bb[n][1] - ba[n][1]) / (bb[n][0] - ba[n][0]), 3) for n in bb
            if n in ba and bb[n][0] > ba[n][0]}
    steps = (b["decode_steps"] - a["decode_steps"]) / (b_at - a_at)
    return {"simulate": {
        "stages": opts.stages, "step_ms": opts.step_ms, "concurrency": opts.concurrency,
        "groups": b["groups"], "devices": b["devices"], "window_s": round(b_at - a_at, 2),
        "aggregate_steps_per_s": round(steps, 2), "ideal_steps_per_s": round(1000 / opts.step_ms, 2),
        "aggregate_tokens_per_s": round(agg["tps"], 1), "busy": busy,
        "single_stream_ms_per_token": round(1000 / tps, 2),
        "ideal_ms_per_token": round(opts.stages * opts.step_ms, 2)}}
