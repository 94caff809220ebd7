"""The benchmark's reference: single-process mlx-lm on the same token ids as the rings.

    python -m zmqinfer.bench.baseline WORKLOAD.json RESULT.json [--cpu N]

Always a process of its own: the benchmark never holds a second copy of the model while the
rings run, and the pinned comparison needs a process whose BLAS thread count is fixed before
OpenBLAS loads (`OPENBLAS_NUM_THREADS` is read once, at load, and bin/ preloads OpenBLAS at
exec) and whose CPU affinity is set before mlx starts any thread. The benchmark writes the
workload (the exact token ids the rings get) and reads back the result. Everything is greedy.

* single stream: `generate_step`, decode tokens/s = (tokens - 1) / time after the first token;
* time to first token: `generate_step` until its first token, per prompt;
* aggregate: `batch_generate` of all of a level's prompts at once, tokens / wall time.

The first repetition of each single-request measurement warms caches and is discarded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zmqinfer.bench.baseline")
    p.add_argument("workload", type=Path)
    p.add_argument("result", type=Path)
    p.add_argument("--cpu", type=int, default=None, help="pin this process (and its threads) to one core")
    args = p.parse_args(argv)
    if args.cpu is not None:
        # Every thread there is (a preloaded OpenBLAS may have started some) and, since mlx is
        # not imported yet, every thread there will be: new threads inherit the mask.
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), {args.cpu})
    work = json.loads(args.workload.read_text())
    args.result.write_text(json.dumps(run(work, load(work["model_path"]))))
    return 0


def load(model_path: str) -> tuple[Any, Any, float]:
    """(model, tokenizer, seconds it took)."""
    from mlx_lm import load as mlx_lm_load

    t0 = time.perf_counter()
    model, tokenizer = mlx_lm_load(model_path)[:2]  # (model, tokenizer[, config])
    return model, tokenizer, time.perf_counter() - t0


def run(work: dict[str, Any], loaded: tuple[Any, Any, float]) -> dict[str, Any]:
    import mlx.core as mx
    import psutil

    from zmqinfer.bench import blasinfo

    model, tokenizer, load_s = loaded
    out: dict[str, Any] = {"load_s": load_s}
    if work.get("single"):
        s = work["single"]
        out["single"] = _single(model, s["prompt"], s["tokens"], s["reps"])
    out["ttft"] = {length: _ttft(model, prompts) for length, prompts in work.get("ttft", {}).items()}
    if work.get("batch"):
        _warm_batch(model, tokenizer)
        out["batch"] = {c: _batch(model, tokenizer, level["prompts"], level["max_tokens"], level["reps"])
                        for c, level in work["batch"].items()}
    mx.synchronize()
    out["process"] = blasinfo.describe()
    out["rss_bytes"] = psutil.Process().memory_info().rss  # model + KV caches + runtime, as nodes report
    return out


def _single(model: Any, prompt: list[int], tokens: int, reps: int) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tps, ttft = [], []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        first = 0.0
        for n, _ in enumerate(generate_step(mx.array(prompt), model, max_tokens=tokens)):
            if n == 0:
                first = time.perf_counter()
        tps.append((tokens - 1) / (time.perf_counter() - first))
        ttft.append(first - t0)
        mx.synchronize()
    return {"decode_tps": statistics.median(tps[1:]), "ttft_s": statistics.median(ttft[1:]),
            "runs": tps[1:], "tokens": tokens}


def _ttft(model: Any, prompts: list[list[int]]) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    runs = []
    for prompt in prompts:  # prompts[0] is the warm-up
        t0 = time.perf_counter()
        for _ in generate_step(mx.array(prompt), model, max_tokens=1):
            runs.append(time.perf_counter() - t0)
            break
        mx.synchronize()  # generate_step queued one more step; finish it outside the timing
    return {"median_s": statistics.median(runs[1:]), "runs": runs[1:]}


def _warm_batch(model: Any, tokenizer: Any) -> None:
    from mlx_lm import batch_generate

    batch_generate(model, tokenizer, [[1, 2, 3], [4, 5, 6, 7]], max_tokens=2)


def _batch(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int, reps: int) -> dict[str, Any]:
    from mlx_lm import batch_generate

    runs: list[dict[str, Any]] = []
    for _ in range(reps):
        t0, cpu0 = time.perf_counter(), time.process_time()
        r = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        tokens = sum(len(ids) for ids in r.token_ids or [])  # asked for: never None
        runs.append({"tokens": tokens, "wall_s": wall, "tps": tokens / wall,
                     "cpu_ms_per_token": {"mlx-lm": round(1000 * cpu / max(1, tokens), 2)}})
    best = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]  # the median run, whole
    return {**best, "runs": [r["tps"] for r in runs], "requests": len(prompts)}


if __name__ == "__main__":
    sys.exit(main())
