"""What `/cluster/status`, `zmqinfer status` and `/v1/models` say about the served model: its
family, quantization, context length and parameter counts (all, and those one token uses in a
mixture-of-experts model), read from config.json and the safetensors headers (no weight read)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from zmqinfer.clusterstatus import ModelInfo
from zmqinfer.model.resolve import read_config

# Families mlx-lm cannot batch (its code takes a cache's offset for one number): every node runs
# each sequence alone (node/stage.py), and status says so.
ONE_AT_A_TIME: frozenset[str] = frozenset({"gpt_bigcode"})

# Where families keep their routed experts (mlx-lm stacks them: switch_mlp, gpt_oss's experts);
# a shared expert runs for every token.
_EXPERT_MARKS = (".switch_mlp.", ".experts.", ".block_sparse_moe.switch", ".feed_forward.experts")
_TOTAL_EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_activated_experts")


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for src in (config, config.get("text_config") or {}, config.get("ffn_config") or {}):
        for k in keys:
            if isinstance(src.get(k), int) and src[k] > 0:
                return int(src[k])
    return None


def quantization(config: dict[str, Any]) -> str:
    """"8-bit, group 64", "4-bit, group 32 (mixed: 4, 8)" for per-layer recipes, or the
    weights' own dtype."""
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return str(config.get("torch_dtype") or "unquantized")
    widths = {int(q["bits"])} | {int(v["bits"]) for v in q.values() if isinstance(v, dict) and "bits" in v}
    head = f"{q['bits']}-bit" + (f", group {q['group_size']}" if "group_size" in q else "")
    return head if len(widths) == 1 else f"{head} (mixed: {', '.join(map(str, sorted(widths)))})"


def _bits_for(name: str, q: dict[str, Any] | None) -> int | None:
    if not isinstance(q, dict):
        return None
    module = name.rsplit(".", 1)[0]
    own = q.get(module)
    return int(own["bits"]) if isinstance(own, dict) and "bits" in own else int(q.get("bits") or 0) or None


def model_info(path: Path) -> ModelInfo:
    path = Path(path)
    config = read_config(path)
    q = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
    headers: dict[str, Any] = {}
    for f in sorted(path.glob("model*.safetensors")):
        with open(f, "rb") as handle:
            headers.update(json.loads(handle.read(int.from_bytes(handle.read(8), "little"))))
    headers.pop("__metadata__", None)
    total = experts = 0
    for name, t in headers.items():
        if name.endswith((".scales", ".biases")) and f"{name.rsplit('.', 1)[0]}.weight" in headers \
                and headers[f"{name.rsplit('.', 1)[0]}.weight"]["dtype"] == "U32":
            continue  # a quantized weight's scales: not parameters of the model
        n = math.prod(t["shape"])
        if t["dtype"] == "U32" and (bits := _bits_for(name, q)):
            n = n * 32 // bits  # packed quantized weights
        total += n
        if any(m in f".{name}" for m in _EXPERT_MARKS) and "shared_expert" not in name:
            experts += n
    n_exp, top_k = _first_int(config, _TOTAL_EXPERT_KEYS), _first_int(config, _TOP_K_KEYS)
    active = total - experts + experts * top_k // n_exp if experts and n_exp and top_k else None
    context = _first_int(config, ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"))
    return {"family": str(config.get("model_type", "?")), "quantization": quantization(config),
            "context_length": context, "params_total": total, "params_active": active,
            "batching": "one sequence at a time" if config.get("model_type") in ONE_AT_A_TIME else "batched"}
