"""Issue 19: every family on the issue's list served by a real ring through the real gateway and
the real `openai` client, equal to single-process mlx-lm.

Three lone `zmqinfer node` processes serve the whole module: each family gets its own gateway
(`zmqinfer gateway` with that model in its nodes.toml), which assigns the nodes its model's
layers (3 stages; 2 when the model has fewer layers), and is killed before the next one starts.
The nodes load each model as any assignment (their old shard goes first), so a family costs a
gateway's start and its requests, not a ring's. Each tiny random model (mlx-lm's ModelArgs for
the family, tests/family_configs.json) speaks the embedded model's tokenizer. Alone, a request's
text equals mlx-lm's greedy output; three at once (batched prefill and decode) equal it too,
these models having no near-ties (their weights are scaled up). Families that also have a node
killed mid-stream are in test_families_ring.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.families import with_tokenizer
from tests.loopback import faults
from tests.loopback.conftest import Reference
from zmqinfer import local

PROMPTS = faults.PROMPTS[:3]
MAX_TOKENS = 16
DEADLINE_S = 120.0  # one family's requests, alone and together, end well within this
NAMES = ["f0", "f1", "f2"]
# family, the model's keywords. Where transformers validates a config as it loads the tokenizer,
# the values it insists on (float step limits; heads x head_dim = 2 x width).
FAMILIES: list[tuple[str, dict[str, Any]]] = [
    ("llama", {}), ("mistral", {}), ("ministral3", {}), ("qwen2", {}), ("qwen3", {}),
    ("qwen2_moe", {}), ("qwen3_moe", {"bits": 4}), ("mixtral", {}), ("gpt_oss", {}),
    ("gemma2", {"query_pre_attn_scalar": 144}), ("gemma3_text", {"sliding_window": 16}), ("deepseek_v3", {}),
    ("glm4_moe", {}), ("phi3", {}), ("olmo2", {}), ("starcoder2", {}), ("cohere2", {}),
    ("smollm3", {}), ("falcon_h1", {}), ("qwen3_next", {}), ("qwen3_5", {}), ("qwen3_5_moe", {}),
    ("lfm2", {}), ("nemotron_h", {}), ("mamba2", {"time_step_limit": [0.01, 10.0], "head_dim": 32}),
]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """Three lone nodes reporting to whichever gateway listens on the block's control port."""
    tmp = tmp_path_factory.mktemp("family-nodes")
    port = local.free_port_block()
    control = f"127.0.0.1:{port + local.CONTROL_OFFSET}"
    procs = [local.start_node(tmp, name, control, port + local.DATA_OFFSET + i) for i, name in enumerate(NAMES)]
    try:
        yield port, tmp
    finally:
        for n in procs:  # all told at once: each spends seconds saying goodbye to a dead gateway
            n.proc.send_signal(signal.SIGTERM)
        for n in procs:
            local.stop_node(n)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("family,kw", FAMILIES, ids=[f"{f}{'-4bit' if k.get('bits') else ''}" for f, k in FAMILIES])
def test_a_family_served_by_a_ring_equals_mlx_lm(nodes: tuple[int, Path], model_dir: Path, tmp_path: Path,
                                                  family: str, kw: dict[str, Any]) -> None:
    port, logs = nodes
    path = with_tokenizer(tmp_path / family, model_dir, family, **kw)
    ref = Reference(path)
    n_layers = len(ref.model.layers)
    # A random model's first token may start with a space, which the API's streamed text keeps
    # apart from a whole decode's: compared without leading whitespace, and by token count.
    ids = {p: ref.greedy(ref.chat_ids(p), MAX_TOKENS) for p in PROMPTS}
    want = {p: ref.text(ids[p]).lstrip() for p in PROMPTS}

    def same(s: faults.Stream) -> bool:
        return s.error is None and s.text.lstrip() == want[s.prompt] and len(s.pieces) == len(ids[s.prompt])

    config = local.write_config(tmp_path / "nodes.toml", port, NAMES, path)
    t0 = time.monotonic()
    gw = local.start_gateway(logs, config, port)
    try:
        stages = min(3, n_layers)
        st = local.wait_status(gw, lambda s: bool(s["ready"]) and len([n for n in s["nodes"] if n.get("layers")]) == stages,
                               local.STARTUP_TIMEOUT_S, f"a ring of {stages} serving {family}")
        ready_s = time.monotonic() - t0
        info = st["model_info"]
        assert info["family"] == family and ("bits" not in kw or info["quantization"].startswith("4-bit"))
        card = _get(f"{gw.url}/v1/models")["data"][0]
        assert {k: card[k] for k in info} == info  # /v1/models says the same
        alone = asyncio.run(faults.run_streams(gw.url, PROMPTS[:1], DEADLINE_S, MAX_TOKENS))[0]
        assert same(alone), f"{alone.describe()}: {alone.text!r} != {want[alone.prompt]!r}"
        together = asyncio.run(faults.run_streams(gw.url, PROMPTS, DEADLINE_S, MAX_TOKENS))
        for s in together:
            assert same(s), f"{s.describe()}: {s.text!r} != {want[s.prompt]!r}"
        print(f"\n{family}: {n_layers} layers, ring ready in {ready_s:.1f}s, "
              f"served in {time.monotonic() - t0:.1f}s", flush=True)
    finally:
        gw.proc.kill()  # the nodes stay, for the next family's gateway
        gw.proc.wait()
