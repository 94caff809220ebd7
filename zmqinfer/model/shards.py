"""One stage's shard of a model: which weight files a layer range needs, and only those.

A stage [start, end) needs the weights of its layers, the embedding when it is first (and when
it is last with a tied head), the final norm and head when it is last, and any tensor we cannot
place (shared, to be safe). With a weight index (model.safetensors.index.json) that maps to a
subset of the weight files: :func:`shard_weight_files` picks them, :func:`fetch_shard`
downloads only those (the one function here that may download), :func:`load_shard_model` opens
only those, and :func:`model_size` reads what each part costs (for ring.plan_by_memory) from the
safetensors headers.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from zmqinfer.model.resolve import WEIGHT_INDEX, ModelNotFound, layer_count, read_config
from zmqinfer.model.size import ModelSize, kv_bytes_per_layer_token

_LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")  # mlx-lm's rule, and gpt2's h, dbrx's blocks
# Everything of a hub model except its weights (mlx_lm.utils.sharded_load fetches the same).
_META_PATTERNS = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
                  "*.jsonl", "*.jinja"]


def stage_needs(tensor: str, start: int, end: int, n_layers: int, tied: bool) -> bool:
    """Whether stage [start, end) of an n_layers model needs the checkpoint tensor `tensor`."""
    if (m := _LAYER_KEY.search(tensor)) is not None:
        return start <= int(m[1]) < end  # layers past n_layers (MTP heads) belong to no stage
    first, last = start == 0, end == n_layers
    if "embed_tokens." in tensor:
        return first or (last and tied)
    if tensor.startswith(("lm_head.", "model.norm.")):
        return last
    return True


def _weight_map(path: Path) -> dict[str, str] | None:
    index = path if path.is_file() else path / WEIGHT_INDEX
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map")
    return weight_map


def shard_weight_files(model: Path | str, start: int, end: int, n_layers: int | None = None,
                       tied: bool | None = None) -> list[str]:
    """The weight files (names relative to the model directory) that stage [start, end) needs.

    `model` is a model directory or its `model.safetensors.index.json`. Without an index every
    `model*.safetensors` is returned (one unindexed file holds everything). `n_layers` defaults
    to config.json's; `tied` to "the index has no lm_head" (what mlx-lm's loaders also imply).
    """
    path = Path(model)
    weight_map = _weight_map(path)
    if weight_map is None:
        return sorted(p.name for p in path.glob("model*.safetensors"))
    if n_layers is None:
        config_dir = path.parent if path.is_file() else path
        config = read_config(config_dir)
        n_layers = layer_count(config)
    if tied is None:
        tied = not any(name.startswith("lm_head.") for name in weight_map)
    if not 0 <= start < end <= n_layers:
        raise ValueError(f"layer range [{start}, {end}) is outside the model's {n_layers} layers")
    return sorted({f for name, f in weight_map.items() if stage_needs(name, start, end, n_layers, tied)})


def fetch_shard(repo_id: str, start: int, end: int | None, *, revision: str | None = None,
                local_files_only: bool = False, cache_dir: Path | None = None) -> Path:
    """The local snapshot of hub model `repo_id` holding what stage [start, end) needs (end None:
    through the last layer).

    Downloads the small files first (config, tokenizer, weight index), then only the weight
    files shard_weight_files selects (all of them when the repo has no index). With
    `local_files_only` nothing is downloaded: the shard must already be in the cache, else
    ModelNotFound. This is the only function in zmqinfer that may download weights.
    """
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir,
                              "local_files_only": local_files_only}

    def download(patterns: list[str], what: str) -> Path:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
        # The hub reports "cannot get it" with many unrelated types (see _from_hub_cache).
        except Exception as exc:
            how = "it is not in the local cache" if local_files_only else f"download failed: {exc}"
            raise ModelNotFound(f"cannot get {what} of {repo_id!r}: {how}") from exc

    meta = download(_META_PATTERNS, "the config, tokenizer and weight index")
    if end is None:
        end = layer_count(read_config(meta))
    weights = (shard_weight_files(meta, start, end) if (meta / WEIGHT_INDEX).is_file()
               else ["model*.safetensors"])
    return download([*_META_PATTERNS, *weights], f"{', '.join(weights)} (layers [{start}, {end}))")


def load_shard_model(path: Path, start: int, end: int) -> tuple[Any, dict[str, Any]]:
    """`mlx_lm.utils.load_model(path, lazy=True)` that opens only stage [start, end)'s weight
    files, so a shard-only download (fetch_shard) loads and nothing else is ever read.

    Returns the whole (lazy) model like load_model; only the stage's parameters hold real
    weights, the rest stay unevaluated initialisers that the Stage drops. Raises ValueError if
    a parameter the stage needs is in none of its files. A range outside the model is left
    for the caller (Stage) to refuse.
    """
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    path = Path(path)
    config = read_config(path)
    n = layer_count(config)
    weight_map = _weight_map(path)
    lo, hi = min(max(start, 0), n), min(max(end, 0), n)
    if weight_map is None:
        return load_model(path, lazy=True)  # one unindexed file: nothing to leave out
    if lo >= hi:  # no layer of the range exists; the Stage refuses it right after
        return load_model(path, lazy=True, strict=False)
    files = set(shard_weight_files(path, lo, hi, n))
    # load_model globs model*.safetensors in a directory: give it one with only our files.
    # mx.load keeps each file open, so the lazy weights outlive the temporary links.
    with tempfile.TemporaryDirectory(prefix="zmqinfer-shard-") as tmp:
        for f in path.iterdir():
            if f.is_file() and (not f.name.endswith(".safetensors") or f.name in files):
                (Path(tmp) / f.name).symlink_to(f.resolve())
        model, config = load_model(Path(tmp), lazy=True, strict=False)
    # strict=False would leave a missing weight at its random initial value: check instead.
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    have = {name for name, f in weight_map.items() if f in files}
    params = dict(tree_flatten(model.parameters()))  # {dotted name: array}
    missing = [name for name in params if stage_needs(name, lo, hi, n, tied) and name not in have]
    if missing:
        raise ValueError(f"{path}: weights for layers [{lo}, {hi}) are incomplete, e.g. "
                         f"{', '.join(missing[:3])} is in none of {sorted(files)}")
    return model, config


def model_size(path: Path) -> ModelSize:
    """ring.ModelSize of a local model, from the safetensors headers alone (no weights read)."""
    path = Path(path)
    config = read_config(path)
    n = layer_count(config)
    layers: dict[int, int] = {}
    parts = {"embed": 0, "head": 0, "shared": 0}
    dtypes: dict[str, str] = {}
    for f in sorted(path.glob("model*.safetensors")):
        with open(f, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            nbytes = t["data_offsets"][1] - t["data_offsets"][0]
            dtypes[name] = t["dtype"]
            if (m := _LAYER_KEY.search(name)) is not None:
                if int(m[1]) < n:
                    layers[int(m[1])] = layers.get(int(m[1]), 0) + nbytes
            elif "embed_tokens." in name:
                parts["embed"] += nbytes
            elif name.startswith(("lm_head.", "model.norm.")):
                parts["head"] += nbytes
            else:
                parts["shared"] += nbytes
    if not layers:
        raise ValueError(f"{path}: no layer weights found in model*.safetensors")
    # The KV cache has the activations' dtype, which a norm weight (never quantized) shows.
    # (gpt2 calls its norms ln_1, ln_f; failing any norm, the floats most tensors have.)
    norms = [d for name, d in dtypes.items() if ("norm" in name or ".ln_" in name) and name.endswith(".weight")]
    floats = [d for d in dtypes.values() if d in ("F32", "F16", "BF16")]
    act = 4 if (norms[0] if norms else max(set(floats), key=floats.count, default="")) == "F32" else 2
    return ModelSize(n_layers=n, layer_bytes=max(layers.values()), embed_bytes=parts["embed"],
                     layers=tuple(layers.get(i, 0) for i in range(n)),
                     head_bytes=parts["head"], tied=not any(k.startswith("lm_head.") for k in dtypes),
                     shared_bytes=parts["shared"], kv_bytes_per_token=kv_bytes_per_layer_token(config, act))
