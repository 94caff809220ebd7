"""Every family the ring serves, split into stages by the real Stage code, against the unsplit
mlx-lm model: one sequence token- and logit-exact, batched (prefilled as one batch, decoded as
one group) to float rounding. Families not proven here are refused at load, by name."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from tests.families import (ALIASES, CONFIGS, PROMPT, PROMPTS, agree, make_family_model, reference,
                            run_batched, run_split, vocab_of)
from zmqinfer.model.size import KV_STEP
from zmqinfer.node.families import EXACT_FAMILIES, REFUSED_FAMILIES
from zmqinfer.node.stage import Stage, StageError
from zmqinfer.protocol.wire import SeqId

STEPS = 8
TESTED = sorted(EXACT_FAMILIES)


def bounds(n: int, k: int) -> list[int]:
    """n layers cut into k near-equal stages."""
    return [round(i * n / k) for i in range(k + 1)]


def build(tmp: Path, family: str, **kw: object) -> Path:
    return make_family_model(tmp / family, family, **kw)


def assert_split_exact(path: Path, cut: list[int]) -> None:
    prompt = [x % vocab_of(path) for x in PROMPT]
    ref_tokens, ref_logits = reference(path, prompt, STEPS)
    stages = [Stage(path, a, b) for a, b in zip(cut, cut[1:])]
    tokens, logits = run_split(stages, SeqId(1), prompt, STEPS)
    assert tokens == ref_tokens, f"cut {cut}"
    for i, (a, b) in enumerate(zip(logits, ref_logits)):
        assert mx.array_equal(a, b).item(), f"cut {cut}: logits differ at step {i}"


def assert_batched_agrees(path: Path, cut: list[int]) -> None:
    prompts = [[x % vocab_of(path) for x in p] for p in PROMPTS]
    refs = [reference(path, p, STEPS) for p in prompts]
    got = run_batched([Stage(path, a, b) for a, b in zip(cut, cut[1:])], prompts, STEPS,
                      [tokens for tokens, _ in refs])
    for i, logits in got.items():
        assert len(logits) >= STEPS // 2
        for k, (a, b) in enumerate(zip(logits, refs[i][1])):
            assert (why := agree(a, b)) is None, f"sequence {i} step {k}: {why}"


@pytest.fixture(scope="module", params=TESTED)
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("fam"), request.param)


def n_layers(path: Path) -> int:
    return Stage(path, 0, 1).n_layers


def test_split_into_two_and_three_stages_is_exact(family_model: Path) -> None:
    n = n_layers(family_model)
    for k in (2, 3):
        if n >= k:
            assert_split_exact(family_model, bounds(n, k))


def test_batched_prefill_and_decode_agree_with_alone(family_model: Path) -> None:
    n = n_layers(family_model)
    assert_batched_agrees(family_model, bounds(n, min(n, 3)))


def test_every_family_tested_is_served_or_refused_with_a_reason() -> None:
    assert set(CONFIGS) <= EXACT_FAMILIES | set(REFUSED_FAMILIES)
    assert EXACT_FAMILIES <= set(CONFIGS) | set(ALIASES)  # each served family is proven above
    assert not EXACT_FAMILIES & set(REFUSED_FAMILIES)


@pytest.mark.parametrize("family", sorted(set(REFUSED_FAMILIES) & set(CONFIGS))[:8] + ["no_such_family"])
def test_a_family_not_proven_is_refused_at_load_by_name(tmp_path: Path, family: str) -> None:
    # Refused from config.json alone, before a weight is opened (there are none here).
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS.get(family, {}), "model_type": family}))
    with pytest.raises(StageError, match=f"model family '{family}' is not served"):
        Stage(tmp_path, 0, 1)


@pytest.mark.parametrize("family,bits,mixed", [("qwen3", 8, False), ("qwen3", 4, False),
                                               ("llama", 4, True), ("qwen3_moe", 4, False),
                                               ("mixtral", 8, False), ("gemma3_text", 4, False)])
def test_quantized_models_split_exactly(tmp_path: Path, family: str, bits: int, mixed: bool) -> None:
    path = build(tmp_path, family, bits=bits, mixed=mixed)
    q = json.loads((path / "config.json").read_text())["quantization"]
    assert q["bits"] == bits and (not mixed or any(isinstance(v, dict) and v.get("bits") == 8 for v in q.values()))
    n = n_layers(path)
    assert_split_exact(path, bounds(n, min(n, 3)))
    assert_batched_agrees(path, bounds(n, min(n, 3)))


def test_the_seed_deployment_28_layer_8_bit_qwen3_split_10_9_9(tmp_path: Path) -> None:
    path = make_family_model(tmp_path / "seed", "qwen3", bits=8, num_hidden_layers=28, hidden_size=64,
                             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, vocab_size=512)
    assert n_layers(path) == 28
    assert_split_exact(path, [0, 10, 19, 28])
    assert_batched_agrees(path, [0, 10, 19, 28])


def test_an_ssm_state_counts_against_the_kv_budget(tmp_path: Path) -> None:
    """A recurrent state does not grow with tokens but does with sequences: a node's KV budget
    bounds how many it holds. (Attention-only families hold none.)"""
    stage = Stage(build(tmp_path, "mamba2"), 0, 2)
    assert stage.state_tokens > 0
    assert Stage(build(tmp_path, "qwen3"), 0, 2).state_tokens == 0
    stage.max_kv_tokens = 3 * (stage.state_tokens + 4)  # three 4-token prompts, no more
    for i in range(3):
        stage.forward(SeqId(i), 0, mx.array([1, 2, 3, 4], dtype=mx.int32), None, want_logits=False)
    with pytest.raises(StageError, match="KV cache full"):
        stage.forward(SeqId(9), 0, mx.array([1, 2, 3, 4], dtype=mx.int32), None, want_logits=False)
    with pytest.raises(StageError, match="KV cache full"):
        stage.prefill_batch([SeqId(10), SeqId(11)], [mx.array([1], dtype=mx.int32)] * 2, None)
    stage.release([SeqId(0)])
    stage.forward(SeqId(9), 0, mx.array([1, 2, 3, 4], dtype=mx.int32), None, want_logits=False)


def test_a_wrapper_config_with_its_vocabulary_in_text_config_loads(tmp_path: Path) -> None:
    """qwen3_5 as published: model_type and text_config, no vocab_size of its own. Token ids are
    bounded by the embedding's rows (mlx does not bounds-check a gather)."""
    path = build(tmp_path, "qwen3_5", text_config=dict(CONFIGS["qwen3_5"]))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": config["text_config"]}))
    assert [Stage(path, a, b).vocab_size for a, b in ((0, 2), (2, 4))] == [CONFIGS["qwen3_5"]["vocab_size"]] * 2
    assert_split_exact(path, [0, 2, 4])


def test_a_sliding_window_stops_what_a_sequence_counts_against_the_kv_budget(tmp_path: Path) -> None:
    """A stage of sliding-window layers holds a window (and one chunk beyond it, while a chunk
    is prefilled) of a long sequence: its room check counts that, not every position."""
    path = build(tmp_path, "gemma3_text", sliding_window=16, num_hidden_layers=6)
    stage = Stage(path, 0, 5)  # gemma3's first 5 of every 6 layers slide
    assert stage.kv.token_bytes == 0 and len(stage.kv.windows) == 5
    held = 16 + KV_STEP  # what one sequence of 400 positions holds, in tokens of KV
    stage.max_kv_tokens = 2 * held  # two such sequences, where counting all 800 positions holds one
    prompt = mx.array([(7 * x) % vocab_of(path) for x in range(400)], dtype=mx.int32)
    for i in range(2):
        stage.forward(SeqId(i), 0, prompt[:200], None, want_logits=False)
        stage.forward(SeqId(i), 200, prompt[200:], None, want_logits=False)
    with pytest.raises(StageError, match="KV cache full"):
        stage.forward(SeqId(9), 0, prompt[:10], None, want_logits=False)
    assert stage.kv_tokens() == 800  # positions seen; the caches hold their windows
    stage.release([SeqId(0)])
    stage.forward(SeqId(9), 0, prompt[:10], None, want_logits=False)


def test_a_stage_of_layers_without_caches_nemotron_h_mlp_layers(tmp_path: Path) -> None:
    """nemotron_h's MLP layers ("-") have no cache slot: a stage of only those holds no cache,
    and the cache slots of the others are found by what the model hands each layer."""
    path = make_family_model(tmp_path / "nh", "nemotron_h", num_hidden_layers=6,
                             hybrid_override_pattern=["*", "-", "-", "M", "-", "*"])
    cut = [0, 1, 3, 6]
    assert [len(Stage(path, a, b)._driver.own_slots) for a, b in zip(cut, cut[1:])] == [1, 0, 2]
    assert_split_exact(path, cut)
    assert_batched_agrees(path, cut)


@pytest.mark.parametrize("family,kw", [("ministral3", {}), ("gemma3_text", {"sliding_window": 8}),
                                       ("qwen3_next", {}), ("mamba2", {})])
def test_a_prompt_prefilled_in_chunks_longer_than_the_window(tmp_path: Path, family: str,
                                                              kw: dict[str, object]) -> None:
    """The gateway prefills a long prompt chunk by chunk; sliding windows (8 positions here)
    shorter than a chunk keep what the unsplit model's one-chunk prefill keeps: the same
    tokens, logits to float rounding (other chunk shapes change OpenBLAS's summation order and
    an SSM's scan order; with mlx's bundled BLAS the attention families are bit-identical)."""
    path = build(tmp_path, family, **kw)
    prompt = [(x * 7 + 3) % vocab_of(path) for x in range(40)]
    tokens, logits = reference(path, prompt, 6)
    stages = [Stage(path, 0, 2), Stage(path, 2, n_layers(path))]
    for a, b in ((0, 13), (13, 29), (29, len(prompt) - 1)):
        h = None
        for st in stages:
            h = st.forward(SeqId(1), a, mx.array(prompt[a:b], dtype=mx.int32), h, want_logits=False)
    y, pos = prompt[-1], len(prompt) - 1
    for k in range(6):
        h = None
        for st in stages:
            h = st.forward(SeqId(1), pos, mx.array([y], dtype=mx.int32), h, want_logits=True)
        assert (why := agree(h, logits[k])) is None, f"step {k}: {why}"
        assert int(mx.argmax(h).item()) == tokens[k], f"step {k}"
        y, pos = tokens[k], pos + 1
