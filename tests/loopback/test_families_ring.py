"""Issue 19: failover on the families beyond the dense four, on a real 3-node ring (`zmqinfer
up`, real processes and sockets) through the real gateway and the real `openai` client: an MoE
and a hybrid (attention + SSM). Each tiny random model speaks the embedded model's tokenizer.
Alone, a request's text equals single-process mlx-lm's greedy output; several at once (batched
prefill and decode) equal it too (these models have no near-ties: their weights are scaled up);
and kill -9 of the middle node mid-stream leaves every stream equal to its no-fault run (replay
recomputes an SSM state). Every other family on the issue's list is served by a ring in
test_family_rings.py, which shares its nodes between families."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.families import with_tokenizer
from tests.loopback import faults
from tests.loopback.conftest import Reference
from zmqinfer import local

PROMPTS = faults.PROMPTS[:3]
MAX_TOKENS = 24
DEADLINE_S = 120.0
DETECT_S = 15.0
RINGS: list[tuple[str, dict[str, Any]]] = [  # family, model keywords
    ("qwen3_moe", {}),
    ("granitemoehybrid", {"mamba_d_head": 32}),  # transformers checks heads x dim = 2 x width
]


@pytest.mark.parametrize("family,kw", RINGS, ids=[f for f, _ in RINGS])
def test_a_family_served_by_a_ring_survives_a_node_killed(model_dir: Path, tmp_path: Path, family: str,
                                                          kw: dict[str, Any]) -> None:
    path = with_tokenizer(tmp_path / family, model_dir, family, **kw)
    ref = Reference(path)
    # A random model's first token may start with a space, which the API's streamed text keeps
    # apart from a whole decode's: compared without leading whitespace, and by token count.
    ids = {p: ref.greedy(ref.chat_ids(p), MAX_TOKENS) for p in PROMPTS}
    want = {p: ref.text(ids[p]).lstrip() for p in PROMPTS}

    def same(s: faults.Stream) -> bool:
        return s.error is None and s.text.lstrip() == want[s.prompt] and len(s.pieces) == len(ids[s.prompt])

    c = local.start(tmp_path, extra=["--model", str(path)])
    try:
        assert c.status()["model_info"]["family"] == family
        alone = asyncio.run(faults.run_streams(c.url, PROMPTS[:1], DEADLINE_S, MAX_TOKENS))[0]
        assert same(alone), f"{alone.describe()}: {alone.text!r} != {want[alone.prompt]!r}"
        together = asyncio.run(faults.run_streams(c.url, PROMPTS, DEADLINE_S, MAX_TOKENS))
        for s in together:
            assert same(s), f"{s.describe()}: {s.text!r} != {want[s.prompt]!r}"
        st = c.status()
        middle = next(n for n in st["nodes"] if n.get("layers") and 0 < n["layers"][0] and n["layers"][1] < st["n_layers"])
        pid = c.node_pids()[middle["name"]]
        mark: dict[str, float] = {}

        async def kill_middle(streams: list[faults.Stream]) -> None:
            await faults.until_all_have(streams, 6, DEADLINE_S / 2)
            mark["t"] = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            assert await faults.detect(c, middle["name"], mark["t"], DETECT_S) is not None

        faulted = asyncio.run(faults.run_streams(c.url, PROMPTS, DEADLINE_S, MAX_TOKENS, during=kill_middle))
        cmp = faults.compare(faulted, {s.prompt: s for s in together})
        assert not cmp.problems, "\n".join(cmp.problems)
        assert all(same(s) for s in faulted)
    finally:
        local.stop(c)
