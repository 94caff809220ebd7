"""Issue 19: families beyond the dense four, served by a real 3-node ring (`zmqinfer up`,
real processes and sockets) through the real gateway and the real `openai` client: an MoE, a
sliding-window model, a hybrid (attention + SSM), a 4-bit MoE, a pure SSM (mamba2), gpt_oss and
deepseek_v3. Each tiny random model speaks
the embedded model's tokenizer. Alone, a request's text equals single-process mlx-lm's greedy
output; several at once (batched prefill and decode) equal it too (these models have no
near-ties: their weights are scaled up); and kill -9 of the middle node mid-stream on the MoE and
the hybrid leaves every stream equal to its no-fault run (replay recomputes an SSM state)."""

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
RINGS: list[tuple[str, dict[str, Any], bool]] = [  # family, model keywords, kill the middle node
    ("qwen3_moe", {}, True),
    ("gemma3_text", {"sliding_window": 16}, False),  # windows far shorter than each sequence
    ("granitemoehybrid", {"mamba_d_head": 32}, True),  # transformers checks heads x dim = 2 x width
    ("qwen3_moe", {"bits": 4}, False),
    ("gpt_oss", {}, False),  # attention sinks, alternating sliding and full layers
    ("deepseek_v3", {}, False),  # latent attention, dense first layers before the MoE ones
    # SSM only: no per-token KV for placement. (transformers, loading the tokenizer, validates
    # the config: float step limits, heads x head_dim = 2 x width.)
    ("mamba2", {"time_step_limit": [0.01, 10.0], "head_dim": 32}, False),
]


@pytest.mark.parametrize("family,kw,kill", RINGS, ids=[f"{f}{'-4bit' if k.get('bits') else ''}" for f, k, _ in RINGS])
def test_a_family_served_by_a_ring_equals_mlx_lm(model_dir: Path, tmp_path: Path, family: str,
                                                  kw: dict[str, Any], kill: bool) -> None:
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
        info = c.status()["model_info"]
        assert info["family"] == family and ("bits" not in kw or info["quantization"].startswith("4-bit"))
        alone = asyncio.run(faults.run_streams(c.url, PROMPTS[:1], DEADLINE_S, MAX_TOKENS))[0]
        assert same(alone), f"{alone.describe()}: {alone.text!r} != {want[alone.prompt]!r}"
        together = asyncio.run(faults.run_streams(c.url, PROMPTS, DEADLINE_S, MAX_TOKENS))
        for s in together:
            assert same(s), f"{s.describe()}: {s.text!r} != {want[s.prompt]!r}"
        if not kill:
            return
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
