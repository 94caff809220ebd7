"""Issue 10, scheduler half, under load: real processes, real sockets, the real `openai` client
with retries off (a retried request would hide a 504).

* 8 concurrent ~1,000-token prompts on the session's 3-node ring (embedded model) all complete:
  a request queued behind the others' prefill waits its turn, it does not time out.
* 32 concurrent long requests on one node with a small `--memory-limit`, on a toy model whose
  KV cache dwarfs its weights (128 KB a token): the gateway admits what the node's KV budget
  holds and queues (or 429s) the rest; the node is never killed (same pid) nor grows past its
  limit, and every request completes or gets a 429/503 with a clear message.

Bounded in count and time: LOAD_DEADLINE_S for each whole run.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.loopback import faults
from tests.tiny import with_real_tokenizer
from zmqinfer import local
from zmqinfer.local import LocalCluster

LOAD_DEADLINE_S = 420.0  # a whole run on 2 shared, busy cores
PROMPT_WORDS = 200  # ~1,000 tokens (5 a word) of the embedded tokenizer with the chat template
MAX_TOKENS = 8
MEMORY_REQUESTS = 32
MEMORY_WORDS = 30  # ~200 tokens with the template: with 32 new ones, 256 positions a request
MEMORY_MAX_TOKENS = 32
# The toy model's node offers this much: its runtime (~90-170 MB), weights (~45 MB), the
# planner's reserve (1,024 tokens x 128 KB + 32 MiB headroom: ~170 MB) and, halved for caches
# copied as they grow, room for several requests of 256 positions (32 MB each) beside them;
# all 32 at once would need ~1 GB (2 GB counting the copies).
MEMORY_LIMIT = 700_000_000


def long_prompt(i: int, n_words: int = PROMPT_WORDS) -> str:
    words = [f"w{i}x{k % 97}" for k in range(n_words)]
    return f"Request {i}. Summarise this list in one word: " + " ".join(words)


async def one(oc: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One chat completion: its outcome as plain data (never raises for an HTTP error)."""
    t0 = time.monotonic()
    try:
        r = await oc.chat.completions.with_raw_response.create(
            model="default", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0)
        body = r.parse()
        return {"status": 200, "seconds": time.monotonic() - t0, "prompt_tokens": body.usage.prompt_tokens,
                "completion_tokens": body.usage.completion_tokens}
    except openai.APIStatusError as e:
        return {"status": e.status_code, "seconds": time.monotonic() - t0, "message": e.message,
                "retry_after": e.response.headers.get("Retry-After")}
    except openai.APIError as e:
        return {"status": None, "seconds": time.monotonic() - t0, "message": f"{type(e).__name__}: {e}"}


def test_eight_concurrent_long_prompts_all_complete(cluster: LocalCluster, tmp_path: Path) -> None:
    async def run() -> list[dict[str, Any]]:
        async with asyncio.timeout(LOAD_DEADLINE_S):
            async with faults.aclient(cluster.url, timeout=LOAD_DEADLINE_S) as oc:
                return list(await asyncio.gather(*(one(oc, long_prompt(i), MAX_TOKENS) for i in range(8))))

    t0 = time.monotonic()
    results = asyncio.run(run())
    seconds = time.monotonic() - t0
    faults.report("eight_long_prompts", {"seconds": round(seconds, 2), "results": results}, tmp_path)
    bad = [r for r in results if r["status"] != 200]
    assert not bad, f"not every request completed: {bad}"
    assert all(r["prompt_tokens"] >= 900 for r in results), [r["prompt_tokens"] for r in results]
    assert all(r["completion_tokens"] >= 1 for r in results)


@pytest.fixture(scope="module")
def kv_heavy_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights, 128 KB of KV per token (16 layers x 4 KV heads x 256 dims x K+V x f32),
    the embedded model's tokenizer so that the gateway can template and tokenize. Short prompts
    of wide KV: memory without the prefill compute that long prompts cost on 2 shared cores."""
    return with_real_tokenizer(tmp_path_factory.mktemp("kvheavy"), model_dir, n_layers=16, hidden=64,
                               kv_heads=4, head_dim=256)


def test_a_small_node_under_32_long_requests_queues_them_and_is_never_killed(
        kv_heavy_model: Path, tmp_path: Path) -> None:
    c = local.start(tmp_path, nodes=1, extra=["--model", str(kv_heavy_model),
                                               "--memory-limit", str(MEMORY_LIMIT)])
    try:
        st = c.status()
        pid, budget = st["nodes"][0]["pid"], st["kv_tokens"]
        assert budget is not None and 256 < budget < MEMORY_REQUESTS * 256, budget
        peak = {"rss": 0, "queued": 0}

        async def watch() -> None:
            while True:
                s = await faults.astatus(c)
                if s is not None:
                    peak["rss"] = max(peak["rss"], s["nodes"][0]["rss_bytes"] or 0)
                    peak["queued"] = max(peak["queued"], s["queued_requests"])
                await asyncio.sleep(0.2)

        async def run() -> list[dict[str, Any]]:
            async with asyncio.timeout(LOAD_DEADLINE_S), asyncio.TaskGroup() as tg:
                watcher = tg.create_task(watch())
                async with faults.aclient(c.url, timeout=LOAD_DEADLINE_S) as oc:
                    out = list(await asyncio.gather(*(one(oc, long_prompt(i, MEMORY_WORDS), MEMORY_MAX_TOKENS)
                                                      for i in range(MEMORY_REQUESTS))))
                watcher.cancel()
                return out

        t0 = time.monotonic()
        results = asyncio.run(run())
        after = c.status()
        faults.report("small_node_32_long", {
            "seconds": round(time.monotonic() - t0, 2), "memory_limit": MEMORY_LIMIT, "kv_tokens": budget,
            "peak_rss": peak["rss"], "peak_queued": peak["queued"],
            "statuses": sorted(str(r["status"]) for r in results), "results": results}, tmp_path)
        assert after["nodes"][0]["pid"] == pid, "the node was restarted"
        assert local.pid_running(pid)
        for r in results:
            if r["status"] == 429:
                assert r["retry_after"] and "retry" in r["message"], r
            elif r["status"] == 503:
                assert "KV" in r["message"] or "unavailable" in r["message"], r
            else:
                assert r["status"] == 200 and r["completion_tokens"] >= 1, r
        assert sum(r["status"] == 200 for r in results) >= MEMORY_REQUESTS // 4
        assert peak["queued"] > 0 or any(r["status"] == 429 for r in results), "nothing was ever held back"
        assert peak["rss"] <= MEMORY_LIMIT, f"the node grew to {peak['rss']} bytes, past its limit"
    finally:
        local.stop(c)

