"""What status says about a model: family, quantization, context, parameters (total, active)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

from tests.families import make_family_model
from zmqinfer.cli.status import model_summary
from zmqinfer.model.facts import model_info


def _count(path: Path) -> tuple[int, int]:
    """(all parameters, those in routed experts) of an unquantized model, from its weights."""
    weights = mx.load(str(path / "model.safetensors"))
    assert isinstance(weights, dict)
    total = sum(math.prod(v.shape) for v in weights.values())
    experts = sum(math.prod(v.shape) for k, v in weights.items() if ".switch_mlp." in k)
    return total, experts


def test_a_dense_model_counts_every_parameter_and_none_active(tmp_path: Path) -> None:
    path = make_family_model(tmp_path / "d", "qwen3")
    info = model_info(path)
    assert info["family"] == "qwen3" and info["params_active"] is None
    assert info["params_total"] == _count(path)[0]
    assert model_info(make_family_model(tmp_path / "q", "qwen3", bits=4))["quantization"] == "4-bit, group 32"
    assert model_info(make_family_model(tmp_path / "m", "qwen3", bits=4, mixed=True))["params_total"] == \
        info["params_total"]
    assert info["context_length"] == json.loads((path / "config.json").read_text())["max_position_embeddings"]


def test_quantized_counts_unpack_to_the_same_parameters(tmp_path: Path) -> None:
    plain = make_family_model(tmp_path / "p", "qwen3_moe")
    total, experts = _count(plain)
    cfg = json.loads((plain / "config.json").read_text())
    active = total - experts + experts * cfg["num_experts_per_tok"] // cfg["num_experts"]
    assert active < total
    # mlx-lm's own recipe keeps an MoE's router at 8 bits: mixed even when asked for 4 alone.
    for bits, mixed, label in ((4, False, "4-bit, group 32 (mixed: 4, 8)"), (8, False, "8-bit, group 32"),
                               (4, True, "4-bit, group 32 (mixed: 4, 8)")):
        q = make_family_model(tmp_path / f"q{bits}{mixed}", "qwen3_moe", bits=bits, mixed=mixed)
        info = model_info(q)
        assert info["quantization"] == label
        assert info["params_total"] == total, label
        assert info["params_active"] == active, label
    assert model_info(plain)["params_active"] == active
    assert "active)" in model_summary(model_info(plain)) and "qwen3_moe" in model_summary(model_info(plain))


def test_a_family_mlx_lm_cannot_batch_says_so_and_runs_alone(tmp_path: Path) -> None:
    from zmqinfer.node.stage import Stage

    alone = make_family_model(tmp_path / "b", "gpt_bigcode")
    assert model_info(alone)["batching"] == "one sequence at a time"
    assert "one sequence at a time" in model_summary(model_info(alone))
    assert Stage(alone, 0, 1).solo
    plain = make_family_model(tmp_path / "q", "qwen3")
    assert model_info(plain)["batching"] == "batched" and not Stage(plain, 0, 1).solo
