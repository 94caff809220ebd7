"""KV per token by family, for placement and admission: under each family's own config names,
an SSM layer holding no per-token cache, a hybrid counting its attention layers only."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
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


def test_each_layer_is_weighed_on_its_own_deepseek_dense_first_layers(tmp_path: Path) -> None:
    """deepseek_v3's first layer is dense, the others mixtures of experts: placement weighs each
    layer by its own bytes, read from the weight files' headers, and they add up to the model."""
    path = make_family_model(tmp_path / "ds", "deepseek_v3", first_k_dense_replace=1)
    size = model_size(path)
    assert len(size.layers) == size.n_layers == 4
    assert size.layers[0] < size.layers[1] == size.layers[2] == size.layers[3] == size.layer_bytes
    weights = mx.load(str(path / "model.safetensors"))
    assert size.stage_bytes(0, 4) == sum(v.nbytes for v in weights.values())
    assert size.weights(0, 1) == sum(v.nbytes for k, v in weights.items() if k.startswith("model.layers.0."))
