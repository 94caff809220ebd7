"""`zmqinfer bench`: single-stream speed of the ring next to single-process mlx-lm, in one run.

These machines are noisy, so only ratios measured side by side mean anything: the mlx-lm
baseline runs before and after the rings (its mean is the reference), each setup repeats the
same greedy request and reports the median. Rings are real `zmqinfer up` clusters on loopback,
measured through the HTTP API with a streaming request, as a user sees them.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import launch

PROMPT = "Describe a cat to someone who has never seen one."


@dataclass
class Result:
    setup: str
    decode_tps: float  # median over repetitions, tokens after the first / their time
    ttft_s: float  # median time to first token
    runs: list[float] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)  # per node: layers, rss, shard


def mlx_lm_single_process(model: str | None, tokens: int, reps: int) -> Result:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from .model import resolve_model

    m, tok = load(str(resolve_model(model)))
    ids = mx.array(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True))
    tps, ttft = [], []
    for _ in range(reps + 1):  # the first run warms caches and is discarded
        t0 = time.perf_counter()
        first = 0.0
        for n, _ in enumerate(generate_step(ids, m, max_tokens=tokens)):
            if n == 0:
                first = time.perf_counter()
        tps.append((tokens - 1) / (time.perf_counter() - first))
        ttft.append(first - t0)
    return Result("mlx-lm, single process", statistics.median(tps[1:]), statistics.median(ttft[1:]), tps[1:])


def ring(nodes: int, model: str | None, tokens: int, reps: int, log_dir: Path) -> Result:
    extra = ["--model", model] if model else []
    c = launch.start(log_dir, nodes, extra)
    try:
        tps, ttft = [], []
        for _ in range(reps + 1):
            t, f = _stream(c.url, tokens)
            tps.append(t)
            ttft.append(f)
        st = c.status()
        per_node = [{"name": n["name"], "layers": n["layers"], "rss_bytes": n["rss_bytes"],
                     "shard_bytes": n["shard_bytes"]} for n in st["nodes"]]
        return Result(f"ring, {nodes} node{'s' if nodes > 1 else ''}", statistics.median(tps[1:]),
                      statistics.median(ttft[1:]), tps[1:], per_node)
    finally:
        launch.stop(c)


def _stream(url: str, tokens: int) -> tuple[float, float]:
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, n = 0.0, 0
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and not first:
                first = time.perf_counter()
    if n != tokens:
        raise RuntimeError(f"expected {tokens} tokens, got {n}: pick a prompt that does not stop early")
    return (n - 1) / (time.perf_counter() - first), first - t0


def run(model: str | None, node_counts: list[int], tokens: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="zmqinfer-bench-") as tmp:
        before = mlx_lm_single_process(model, tokens, reps)
        rings = [ring(n, model, tokens, reps, Path(tmp)) for n in node_counts]
        after = mlx_lm_single_process(model, tokens, reps)
    base = (before.decode_tps + after.decode_tps) / 2
    return {"tokens": tokens, "reps": reps, "baseline_tps": base,
            "results": [asdict(r) for r in (before, *rings, after)]}


def table(report: dict[str, Any]) -> str:
    base = report["baseline_tps"]
    lines = ["| setup | decode tok/s | vs mlx-lm | time to first token |", "|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['setup']} | {r['decode_tps']:.2f} | {r['decode_tps'] / base:.2f}x "
                     f"| {1000 * r['ttft_s']:.0f} ms |")
    mem = ["", "| ring | node | layers | resident memory | shard bytes |", "|---|---|---|---|---|"]
    for r in report["results"]:
        for n in r["nodes"]:
            mem.append(f"| {r['setup']} | {n['name']} | [{n['layers'][0]},{n['layers'][1]}) "
                       f"| {n['rss_bytes'] / 2**20:.0f} MiB | {n['shard_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines + (mem if len(mem) > 3 else []))
