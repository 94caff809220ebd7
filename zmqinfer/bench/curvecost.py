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

from zmqinfer.bench import launch, loadgen
from zmqinfer.bench.run import Options, workload

ROUNDS = 3  # alternating rounds; the shared machine's noise is larger than Curve's cost
LEVEL_TIMEOUT_S = 300.0


def run(nodes: int = 2, rounds: int = ROUNDS, tokens: int = 32, concurrency: int = 16,
        batch_tokens: int = 16, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from mlx_lm.utils import load_tokenizer

    from zmqinfer.model.resolve import resolve_model

    model_path = resolve_model(None)
    opts = Options(tokens=tokens, concurrency=(concurrency,), batch_tokens=batch_tokens)
    work = workload(load_tokenizer(model_path), model_path, opts)
    with tempfile.TemporaryDirectory(prefix="zmqinfer-curve-cost-") as tmp:
        log(f"starting two {nodes}-node rings (curve, plain)")
        rings = {"curve": launch.start(Path(tmp), nodes), "plain": launch.start(Path(tmp), nodes, ["--no-curve"])}
        try:
            return asyncio.run(_measure(rings, work, rounds, concurrency, log))
        finally:
            for c in rings.values():
                launch.stop(c)


async def _measure(rings: dict[str, launch.LocalCluster], work: dict[str, Any], rounds: int,
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


def table(report: dict[str, Any]) -> str:
    med, ratio, c = report["median"], report["curve_over_plain"], report["concurrency"]
    lines = [f"{'':8} {'decode tok/s':>14} {'c=' + str(c) + ' tok/s':>14}"]
    for k in ("curve", "plain"):
        lines.append(f"{k:8} {med[k]['decode_tps']:14.2f} {med[k]['aggregate_tps']:14.2f}")
    lines.append(f"{'ratio':8} {ratio['decode_tps']:14.3f} {ratio['aggregate_tps']:14.3f}   (curve / plain, "
                 f"medians of {report['rounds']} interleaved rounds)")
    return "\n".join(lines)
