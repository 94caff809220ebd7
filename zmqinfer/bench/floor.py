"""`zmqinfer bench --floor`: the least one token can cost to go round a ring on this machine.

A chain of processes passes one decode step's hidden state (576 float32: 2,304 B) round a ring
of `stages` relays and back over TCP on 127.0.0.1 (PUSH -> PULL, one message in flight, as the
ring's data plane does), with none of zmqinfer's own code in the way. Each way of relaying adds
one part of what a node does:

    sync     a blocking recv and send in one thread: ZeroMQ and the kernel alone
    asyncio  zmq.asyncio on an event loop (the gateway and every node are asyncio processes)
    thread   + a hand-off to a worker thread and back (a node computes on its mlx thread)
    mlx      + bytes -> mx.array -> one op -> bytes in that thread (a stage's least work)

Beside them, in the same run, the real ring: `up --nodes stages --simulate 0` (devices that cost
nothing, Curve on as `up` has it), one stream's milliseconds per token. The ring's one-stream
target (within 1 ms a token of the ideal) is a budget for everything above `sync`.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import aiohttp
import zmq
import zmq.asyncio

from zmqinfer import local
from zmqinfer.bench import loadgen
from zmqinfer.bench.simulate import PROMPT

MODES = ("sync", "asyncio", "thread", "mlx")
PAYLOAD_BYTES = 576 * 4  # one sequence's hidden state of the embedded model, float32
TRIPS = 2000  # round trips per measurement: about a second at this machine's floor
WARM_TRIPS = 100
RING_TOKENS = 200  # one stream through the simulated ring
RECV_TIMEOUT_MS = 10_000  # a relay whose peer died gives up instead of hanging
LINGER_MS = 1000  # a relay's last message (the stop) still leaves as it exits
START_TIMEOUT_S = 60.0  # relays start (spawned interpreters, mlx imported) within this


def _relay(port_in: int, port_out: int, mode: str) -> None:
    """One stage of the chain: receive on `port_in`, pass on to `port_out`, until b"stop"."""
    if mode == "sync":
        ctx = zmq.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        push.setsockopt(zmq.LINGER, LINGER_MS)
        pull.bind(f"tcp://127.0.0.1:{port_in}")
        push.connect(f"tcp://127.0.0.1:{port_out}")
        while True:
            frames = pull.recv_multipart()
            push.send_multipart(frames)
            if frames[0] == b"stop":
                return
    asyncio.run(_relay_async(port_in, port_out, mode))


async def _relay_async(port_in: int, port_out: int, mode: str) -> None:
    ctx = zmq.asyncio.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, LINGER_MS)
    pull.bind(f"tcp://127.0.0.1:{port_in}")
    push.connect(f"tcp://127.0.0.1:{port_out}")
    work = _work(mode)
    pool = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    while True:
        async with asyncio.timeout(RECV_TIMEOUT_MS / 1000):
            frames = await pull.recv_multipart()
        if work is not None and frames[0] != b"stop":
            frames = await loop.run_in_executor(pool, work, frames)
        await push.send_multipart(frames)
        if frames[0] == b"stop":
            pool.shutdown()
            return


def _work(mode: str) -> Callable[[list[bytes]], list[Any]] | None:
    if mode == "asyncio":
        return None
    if mode == "thread":
        return lambda frames: frames
    import mlx.core as mx
    import numpy as np

    def stage(frames: list[bytes]) -> list[Any]:
        h = mx.array(np.frombuffer(frames[1], dtype=np.float32)) + 1
        mx.eval(h)
        return [frames[0], np.asarray(h).tobytes()]

    return stage


def relay_ms(stages: int, mode: str, trips: int = TRIPS) -> float:
    """Milliseconds per round trip through `stages` relays (`stages` + 1 hops), median of three
    runs of `trips` trips."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {MODES}")
    base = local.free_port_block(stages + 1)
    spawn = mp.get_context("spawn")  # as on macOS: no state of this process leaks into a relay
    relays = [spawn.Process(target=_relay, args=(base + i + 1, base + (i + 2) % (stages + 1), mode), daemon=True)
              for i in range(stages)]
    for p in relays:
        p.start()
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 0)
    pull.bind(f"tcp://127.0.0.1:{base}")
    push.connect(f"tcp://127.0.0.1:{base + 1}")
    payload = [b"h", bytes(PAYLOAD_BYTES)]

    def go_round(n: int, frames: list[bytes] = payload) -> None:
        for _ in range(n):
            push.send_multipart(frames)
            pull.recv_multipart()

    try:
        pull.setsockopt(zmq.RCVTIMEO, int(START_TIMEOUT_S * 1000))  # the first trip waits for start-up
        go_round(1)
        pull.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        runs = []
        for _ in range(3):
            go_round(WARM_TRIPS)
            t0 = time.perf_counter()
            go_round(trips)
            runs.append((time.perf_counter() - t0) * 1000 / trips)
        go_round(1, [b"stop"])
        return statistics.median(runs)
    finally:
        for p in relays:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        pull.close()
        push.close()
        ctx.term()


def ring_ms(stages: int, tmp: Path, tokens: int = RING_TOKENS) -> float:
    """One stream's milliseconds per token through `up --nodes stages --simulate 0`."""
    c = local.start(tmp, nodes=stages, extra=["--simulate", "0"])
    try:
        async def stream() -> float:
            async with aiohttp.ClientSession() as s:
                await loadgen.stream_once(s, c.url, PROMPT, 8)  # warm-up
                return statistics.median([1000 / (await loadgen.stream_once(s, c.url, PROMPT, tokens))[0]
                                          for _ in range(3)])
        return asyncio.run(stream())
    finally:
        local.stop(c)


def run(stages: tuple[int, ...] = (1, 3), trips: int = TRIPS, ring_tokens: int = RING_TOKENS,
        log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    out: dict[str, Any] = {"payload_bytes": PAYLOAD_BYTES, "trips": trips, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="zmqinfer-floor-") as tmp:
        for n in stages:
            row: dict[str, float] = {}
            for mode in MODES:
                log(f"{n} relay(s), {mode}")
                row[mode] = round(relay_ms(n, mode, trips), 3)
            log(f"{n} simulated node(s), one stream")
            row["ring"] = round(ring_ms(n, Path(tmp), ring_tokens), 3)
            out["stages"][str(n)] = row
    return out


def table(r: dict[str, Any]) -> str:
    head = ("| stages (hops) | sync | asyncio | + thread | + mlx op | the ring, `--simulate 0` |\n"
            "|---|---|---|---|---|---|")
    rows = [f"| {n} ({int(n) + 1}) | " + " | ".join(f"{row[k]:.2f}" for k in (*MODES, "ring")) + " |"
            for n, row in r["stages"].items()]
    return (f"**Floor** (ms per token round the ring: relays passing {r['payload_bytes']} B over TCP "
            f"on 127.0.0.1, median of 3 x {r['trips']} trips; the ring: one stream, Curve on)\n\n"
            + "\n".join([head, *rows]))
