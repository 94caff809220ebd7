"""`zmqinfer bench --curve-cost`: what CurveZMQ costs, on one machine, in one run.

Two local rings of the same size run side by side, one with Curve (the default) and one with
`--no-curve`; the measurements alternate between them (A B, B A, ...) so that whatever else the
machine is doing lands on both sides alike. Each round measures, on each ring, single-stream
decode tokens/s (loadgen.stream_once) and aggregate tokens/s at one concurrency level
(loadgen.aggregate). Reported: every sample, the medians, and curve / plain ratios.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import aiohttp

from zmqinfer import local
from zmqinfer.bench import loadgen
from zmqinfer.bench.run import Options, workload

ROUNDS = 3  # alternating rounds; the shared machine's noise is larger than Curve's cost
LEVEL_TIMEOUT_S = 300.0
# The hop microbenchmark: a DEALER -> ROUTER echo over tcp on 127.0.0.1, one message in flight,
# of one decode step's hidden state for one sequence of a 576-wide float32 model (2304 B) and of
# a 16-sequence micro-batch (36 KiB). Enough round trips for a stable median in about a second.
HOP_BYTES = (576 * 4, 16 * 576 * 4)
HOP_TRIPS = 2000
HOP_ROUNDS = 5


def run(nodes: int = 2, rounds: int = ROUNDS, tokens: int = 32, concurrency: int = 16,
        batch_tokens: int = 16, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from mlx_lm.utils import load_tokenizer

    from zmqinfer.model.resolve import resolve_model

    log("hop round trips, curve vs plain")
    hops = hop_cost()
    model_path = resolve_model(None)
    opts = Options(tokens=tokens, concurrency=(concurrency,), batch_tokens=batch_tokens)
    work = workload(load_tokenizer(model_path), model_path, opts)
    with tempfile.TemporaryDirectory(prefix="zmqinfer-curve-cost-") as tmp:
        log(f"starting two {nodes}-node rings (curve, plain)")
        rings = {"curve": local.start(Path(tmp), nodes), "plain": local.start(Path(tmp), nodes, ["--no-curve"])}
        try:
            return {**asyncio.run(_measure(rings, work, rounds, concurrency, log)), "hop_us": hops}
        finally:
            for c in rings.values():
                local.stop(c)


async def _measure(rings: dict[str, local.LocalCluster], work: dict[str, Any], rounds: int,
                   concurrency: int, log: Callable[[str], None]) -> dict[str, Any]:
    single, batch = work["single"], work["batch"][str(concurrency)]
    samples: dict[str, dict[str, list[float]]] = {k: {"decode_tps": [], "aggregate_tps": []} for k in rings}
    async with aiohttp.ClientSession() as s:
        for c in rings.values():  # warm-up: first requests pay for compilation and allocation
            await loadgen.stream_once(s, c.url, single["prompt"], single["tokens"])
        for r in range(rounds):
            order = list(rings) if r % 2 == 0 else list(reversed(rings))
            for name in order:
                url = rings[name].url
                tps, _ = await loadgen.stream_once(s, url, single["prompt"], single["tokens"])
                agg = await loadgen.aggregate(s, url, batch["prompts"], batch["max_tokens"], LEVEL_TIMEOUT_S)
                if "error" in agg:
                    raise loadgen.LoadError(f"{name}: {agg['error']}")
                samples[name]["decode_tps"].append(tps)
                samples[name]["aggregate_tps"].append(agg["tps"])
                log(f"round {r + 1} {name}: decode {tps:.2f} tok/s, c={concurrency} {agg['tps']:.2f} tok/s")
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in samples.items()}
    ratio = {m: med["curve"][m] / med["plain"][m] for m in ("decode_tps", "aggregate_tps")}
    return {"samples": samples, "median": med, "curve_over_plain": ratio, "concurrency": concurrency,
            "tokens": work["single"]["tokens"], "batch_tokens": batch["max_tokens"], "rounds": rounds}


def hop_cost() -> dict[str, dict[str, float]]:
    """Median round-trip microseconds per message size, curve and plain, rounds interleaved."""
    import time

    import zmq

    from zmqinfer.protocol.keys import CurveKeys, apply

    pub_s, sec_s = zmq.curve_keypair()
    pub_c, sec_c = zmq.curve_keypair()
    server = CurveKeys("server", pub_s, sec_s, Path("."))
    client = CurveKeys("client", pub_c, sec_c, Path("."), server_key=pub_s)
    samples: dict[str, dict[str, list[float]]] = {m: {str(b): [] for b in HOP_BYTES} for m in ("curve", "plain")}
    ctx = zmq.Context()
    try:
        for r in range(HOP_ROUNDS):
            for mode in (("curve", "plain") if r % 2 == 0 else ("plain", "curve")):
                router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
                try:
                    # No ZAP handler here: the handshake is not what is measured, only traffic.
                    apply(router, server if mode == "curve" else None, server=True)
                    apply(dealer, client if mode == "curve" else None, server=False)
                    port = router.bind_to_random_port("tcp://127.0.0.1")
                    dealer.connect(f"tcp://127.0.0.1:{port}")
                    for size in HOP_BYTES:
                        payload = b"x" * size
                        for i in range(HOP_TRIPS + 50):  # the first 50 warm the connection
                            t0 = time.perf_counter()
                            dealer.send(payload)
                            ident, msg = router.recv_multipart()
                            router.send_multipart([ident, msg])
                            dealer.recv()
                            if i >= 50:
                                samples[mode][str(size)].append((time.perf_counter() - t0) * 1e6)
                finally:
                    router.close(0)
                    dealer.close(0)
    finally:
        ctx.term()
    return {m: {b: statistics.median(v) for b, v in d.items()} for m, d in samples.items()}


def table(report: dict[str, Any]) -> str:
    med, ratio, c = report["median"], report["curve_over_plain"], report["concurrency"]
    lines = [f"{'':8} {'decode tok/s':>14} {'c=' + str(c) + ' tok/s':>14}"]
    for k in ("curve", "plain"):
        lines.append(f"{k:8} {med[k]['decode_tps']:14.2f} {med[k]['aggregate_tps']:14.2f}")
    lines.append(f"{'ratio':8} {ratio['decode_tps']:14.3f} {ratio['aggregate_tps']:14.3f}   (curve / plain, "
                 f"medians of {report['rounds']} interleaved rounds)")
    for size, plain in report["hop_us"]["plain"].items():
        curve = report["hop_us"]["curve"][size]
        lines.append(f"hop round trip, {int(size):6d} B: curve {curve:7.1f} us, plain {plain:7.1f} us "
                     f"(+{curve - plain:.1f} us)")
    return "\n".join(lines)
