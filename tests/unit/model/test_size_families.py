"""KV per token by family, for placement and admission: under each family's own config names,
an SSM layer holding no per-token cache, a hybrid counting its attention layers only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.families import make_family_model
from zmqinfer.model.shards import model_size
from zmqinfer.node.stage import Stage


@pytest.mark.parametrize("family,expect", [
    ("qwen3", lambda c: 2 * c["num_key_value_heads"] * c["head_dim"] * 4),
    ("lille-130m", lambda c: 2 * c["n_kv_heads"] * (c["n_embd"] // c["n_head"]) * 4),
    ("mamba2", lambda c: 0),
    ("gpt2", lambda c: 2 * c["n_embd"] * 4),  # its layers are model.h.N: found all the same
    # 2 of its 4 layers are attention: half a layer's K+V per layer on average.
    ("granitemoehybrid", lambda c: 2 * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 4 // 2),
    ("nemotron_h", lambda c: 2 * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 4 // 2),
])
def test_kv_per_token_follows_the_family(tmp_path: Path, family: str, expect: object) -> None:
    path = make_family_model(tmp_path / family, family)
    config = json.loads((path / "config.json").read_text())
    size = model_size(path)
    assert size.kv_bytes_per_token == expect(config)  # type: ignore[operator]
    assert size.n_layers == len(Stage(path, 0, 1)._driver.model.layers) and size.layer_bytes > 0
