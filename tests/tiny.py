"""Tiny random mlx-lm models written to disk, for tests that need a real model but not a good one.

They load through the same `mlx_lm.utils.load_model` path as any downloaded model, so a stage
built on one exercises exactly the code a real deployment runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

FAMILIES = ("llama", "qwen3")


def make_tiny_model(dest: Path, family: str, *, n_layers: int = 4, hidden: int = 64,
                    vocab: int = 256, tied: bool = False, seed: int = 0, kv_heads: int = 2,
                    head_dim: int | None = None) -> Path:
    """`kv_heads` and `head_dim` set the KV cache per token independently of the (tiny)
    weights: a model whose KV dwarfs its weights, for memory tests."""
    config = {
        "model_type": family,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim or hidden // 4,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tied,
    }
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Default inits give near-uniform logits; scale them up so greedy picks are far from ties.
    weights = {k: v * 4 if v.ndim == 2 else v for k, v in tree_flatten(model.parameters())}
    dest.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def with_real_tokenizer(dest: Path, model_dir: Path, **shape: Any) -> Path:
    """A tiny random llama at `dest` (`shape`: make_tiny_model's keywords) that speaks the
    embedded model's tokenizer (chat template, EOS ids), so a gateway can template and tokenize
    for it: real HTTP requests without a real model's compute."""
    src = json.loads((model_dir / "config.json").read_text())
    return speak_tokenizer(make_tiny_model(dest, "llama", vocab=src["vocab_size"], **shape), model_dir)


def speak_tokenizer(made: Path, model_dir: Path) -> Path:
    """Give the model at `made` the tokenizer files and token ids of the model at `model_dir`
    (its vocabulary size must already match)."""
    src = json.loads((model_dir / "config.json").read_text())
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, made / f.name)
    cfg = json.loads((made / "config.json").read_text())
    cfg.update({k: src[k] for k in ("bos_token_id", "eos_token_id", "max_position_embeddings")})
    (made / "config.json").write_text(json.dumps(cfg))
    return made
