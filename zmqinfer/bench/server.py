"""`mlx_lm.server` at the ring's concurrency levels: the best single-process server a user would
try next to `zmqinfer up` on the same machine, fed the same requests over HTTP.

It takes text prompts, so each workload prompt goes as its token ids decoded to text (the chat
template's special tokens included): it re-tokenizes to the same ids but for rare merges, and
throughput counts the completion tokens each server reports, so the comparison holds.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from zmqinfer import local
from zmqinfer.bench import conversation, loadgen

STARTUP_TIMEOUT_S = 120.0  # loading the model; it compiles nothing ahead
POLL_S = 0.5


def run(model_path: Path, tokenizer: Any, work: dict[str, Any], tmp: Path, level_timeout_s: float) -> dict[str, Any]:
    port = local.free_port_block(1)
    log = tmp / f"mlx-lm-server-{port}.log"
    out: dict[str, Any] = {"setup": "mlx_lm.server, single process"}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(model_path),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        if (why := _wait_up(url, proc)) is not None:
            return {**out, "error": f"{why}; its log: {log.read_text(errors='replace')[-500:]}"}
        out["batch"] = asyncio.run(_levels(url, str(model_path), tokenizer, work, level_timeout_s, proc.pid))
        if work.get("conversation"):  # the same growing conversation as the rings' (its prompt cache)
            out["conversation"] = asyncio.run(_conversation(url, str(model_path), tokenizer, work["conversation"]))
    finally:
        local.stop(local.LocalCluster(port, proc, log))
    return out


def _wait_up(url: str, proc: subprocess.Popen) -> str | None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"mlx_lm.server exited with status {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=POLL_S * 4):
                return None
        except (urllib.error.URLError, OSError):
            time.sleep(POLL_S)
    return f"mlx_lm.server did not answer within {STARTUP_TIMEOUT_S:.0f}s"


async def _levels(url: str, model: str, tokenizer: Any, work: dict[str, Any],
                  level_timeout_s: float, pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        for c, level in work.get("batch", {}).items():
            prompts: list[list[int] | str] = [tokenizer.decode(p) for p in level["prompts"]]
            await loadgen.aggregate(s, url, prompts[:1], 2, level_timeout_s, model)  # warm-up
            out[c] = await loadgen.aggregate_cpu(s, url, prompts, level["max_tokens"], level_timeout_s,
                                                 {"mlx_lm.server": pid}, model)
    return out


async def _conversation(url: str, model: str, tokenizer: Any, work: dict[str, Any]) -> dict[str, Any]:
    """Each turn's time to first token, as text (see the module docstring): mlx_lm.server's own
    LRU prompt cache serves the turns after the first, as the ring's prefix cache does."""

    async def first_token(s: aiohttp.ClientSession, u: str, prompt: list[int]) -> float:
        return await loadgen.first_token(s, u, tokenizer.decode(prompt), model)

    async with aiohttp.ClientSession() as s:
        try:
            return await conversation.measure(s, url, work, first_token)
        except loadgen.FAILURES as e:
            return {"error": loadgen.why(e)}
