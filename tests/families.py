"""Tiny random models of every family mlx-lm's own test suite builds, and the checks that a
split ring computes what the unsplit mlx-lm model does.

tests/family_configs.json holds the ModelArgs mlx-lm's tests/test_models.py builds each family
with (read out of that file's literals; one config per family the installed mlx-lm has). A model
built from one is written to disk like any downloaded model and loads through mlx-lm's own
`load_model`, so a Stage on it runs exactly what a deployment runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_model, quantize_model

from tests.tiny import speak_tokenizer
from zmqinfer.protocol.wire import SeqId

CONFIGS: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "family_configs.json").read_text())
# mlx-lm's MODEL_REMAPPING loads these as another family's code: built from that family's config.
ALIASES = {"mistral": "llama"}
# Families small() cannot cut by its generic keys, cut by their own: jamba's Mamba width is
# mamba_expand x hidden_size (mlx-lm's test: 128 x 128), openelm's sizes are per-layer lists,
# qwen's head width is kv_channels. Each took 40-60 s or more a test at mlx-lm's sizes.
FITTED: dict[str, dict[str, Any]] = {
    "jamba": {"mamba_expand": 2, "mamba_d_state": 16},
    "openelm": {"model_dim": 128, "head_dim": 32, "num_transformer_layers": 4, "num_query_heads": [4] * 4,
                "num_kv_heads": [2] * 4, "ffn_multipliers": [0.5, 1.0, 2.0, 4.0], "vocab_size": 1000},
    "qwen": {"kv_channels": 32},
}
PROMPT = [3, 17, 250, 9, 41, 77, 5, 128, 64, 2, 199]
PROMPTS = [[5, 9, 2, 44, 17, 3], [8], [31, 7, 19, 25, 2, 61, 90, 12, 4, 33, 70], [12, 6, 3]]


def small(config: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's config cut to a CPU test's size where it is large (some are real models' shapes:
    gpt_neox's 6144 x 44): width 128 in 4 heads of 32, a 1000-token vocabulary, 6 layers unless
    a per-layer list fixes the count. Shapes the family derives stay its own."""
    _, args_cls = _get_classes(config)
    c = {**config}
    try:  # the family's defaults too: some of mlx-lm's tests build real sizes from them
        full = dataclasses.asdict(args_cls.from_dict(config))
        # (A wrapper's nested text_config default is the config itself: it would shadow overrides.)
        c = {**{k: v for k, v in full.items() if v is not None and k != "text_config"}, **config}
    except TypeError:
        pass
    width = next((c[k] for k in ("hidden_size", "d_model", "n_embd") if isinstance(c.get(k), int)), 0)
    if width > 256:
        for k in ("hidden_size", "d_model", "n_embd", "block_dim"):
            if k in c:
                c[k] = 128
        for k, v in (("intermediate_size", 256), ("num_attention_heads", 4), ("n_head", 4), ("num_heads", 4), ("n_heads", 4),
                     ("head_dim", 32), ("moe_intermediate_size", 64), ("block_ff_dim", 256), ("shared_expert_intermediate_size", 64)):
            if isinstance(c.get(k), int):
                c[k] = v
        for k in ("num_key_value_heads", "n_head_kv", "num_kv_heads", "kv_n_heads"):
            if isinstance(c.get(k), int):
                c[k] = min(c[k], 4) if 4 % min(c[k], 4) == 0 else 4
    if isinstance(c.get("vocab_size"), int) and c["vocab_size"] > 1000:
        c["vocab_size"] = 1000
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        n = c.get(key)
        if isinstance(n, int) and n > 6 and not any(isinstance(v, list) and len(v) == n for v in c.values()):
            c[key] = 6
    return c


def make_family_model(dest: Path, family: str, *, bits: int | None = None, mixed: bool = False,
                      seed: int = 0, **overrides: Any) -> Path:
    """A tiny random `family` model at `dest`, quantized to `bits` (mlx affine, group 32) if
    given; `mixed`: mlx-community's mixed recipe shape, the first and last layers at 8 bits and
    the rest at `bits`, recorded per layer in config.json as mlx_lm.convert writes it."""
    config = {**small(CONFIGS[ALIASES.get(family, family)]), **FITTED.get(family, {}), "model_type": family,
              **overrides}
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    args = model.args if hasattr(model, "args") else args_cls.from_dict(config)
    text = getattr(args, "text_config", None) or {}
    config.setdefault("vocab_size", getattr(args, "vocab_size", None) or text["vocab_size"])  # defaults
    # Default inits give near-uniform logits; scale them up so greedy picks are far from ties.
    weights = {k: v * 4 if v.ndim == 2 and mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(weights.items()))
    if bits is not None:
        n = len(model.layers)
        predicate: Callable[[str, nn.Module], bool | dict[str, Any]] | None = None
        if mixed:
            def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
                if not hasattr(module, "to_quantized") or module.weight.shape[-1] % 32:
                    return False
                edge = any(f"layers.{i}." in path + "." for i in (0, n - 1))
                return {"group_size": 32, "bits": 8 if edge else bits}
        model, config = quantize_model(model, config, 32, bits, quant_predicate=predicate)
    dest.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest


def vocab_of(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())
    return int(cfg.get("vocab_size") or cfg["text_config"]["vocab_size"])


def reference(path: Path, prompt: list[int], steps: int) -> tuple[list[int], list[mx.array]]:
    """Greedy tokens and logits of the unsplit model, prefilling as mlx-lm's generate_step does
    (all but the last prompt token, then the last one alone)."""
    model, _ = load_model(path)
    cache = make_prompt_cache(model)
    if len(prompt) > 1:
        model(mx.array(prompt[:-1])[None], cache=cache)
    y, tokens, logits = prompt[-1], [], []
    for _ in range(steps):
        out = model(mx.array([[y]]), cache=cache)[:, -1, :]
        logits.append(out)
        y = int(mx.argmax(out, axis=-1).item())
        tokens.append(y)
    return tokens, logits


def run_split(stages: list[Any], seq: SeqId, prompt: list[int], steps: int) -> tuple[list[int], list[mx.array]]:
    """The same through `stages` (Stage objects), one sequence: prefill, then decode alone."""
    def through(start: int, ids: list[int], want: bool) -> mx.array:
        h = None
        for st in stages:
            h = st.forward(seq, start, mx.array(ids, dtype=mx.int32), h, want_logits=want)
        return h

    if len(prompt) > 1:
        through(0, prompt[:-1], False)
    pos, y, tokens, logits = len(prompt) - 1, prompt[-1], [], []
    for _ in range(steps):
        out = through(pos, [y], True)
        pos += 1
        logits.append(out)
        y = int(mx.argmax(out, axis=-1).item())
        tokens.append(y)
    return tokens, logits


def run_batched(stages: list[Any], prompts: list[list[int]], steps: int,
                forced: list[list[int]]) -> dict[int, list[mx.array]]:
    """All prompts prefilled in two batches (prefill_batch: first chunks, then the rest at
    their positions, each sequence's cache merged in), then decoded as one group, one leaving
    half-way: each sequence's logits per step. Each is fed `forced[i]` (the unsplit model's
    greedy tokens), so a near-tie picked the other way cannot move later steps."""
    seqs = [SeqId(100 + i) for i in range(len(prompts))]
    # A one-token prompt has nothing to prefill: it joins the group with an empty cache.
    cut = {i: max(1, (len(p) - 1) // 2) for i, p in enumerate(prompts) if len(p) > 1}
    rest = [i for i, c in cut.items() if c < len(prompts[i]) - 1]
    for chunk in ({i: (0, prompts[i][:c]) for i, c in cut.items()},
                  {i: (cut[i], prompts[i][cut[i]:-1]) for i in rest}):
        if not chunk:
            continue
        h: list[mx.array] | None = None
        for st in stages:
            h = st.prefill_batch([seqs[i] for i in chunk], [mx.array(ids, dtype=mx.int32) for _, ids in chunk.values()],
                                 h, [at for at, _ in chunk.values()])
    members = list(range(len(prompts)))
    toks = {i: p[-1] for i, p in enumerate(prompts)}
    pos = {i: len(p) - 1 for i, p in enumerate(prompts)}
    got: dict[int, list[mx.array]] = {i: [] for i in members}
    for k in range(steps):
        if k == steps // 2 and len(members) > 2:
            gone = members.pop(1)
            for st in stages:
                st.release([seqs[gone]])
        out = None
        for st in stages:
            out = st.decode(3, [seqs[i] for i in members], [pos[i] for i in members],
                            mx.array([toks[i] for i in members], dtype=mx.int32), out)
        assert out is not None
        for j, i in enumerate(members):
            got[i].append(out[j:j + 1])
            toks[i], pos[i] = forced[i][k], pos[i] + 1
    return got


def agree(a: mx.array, b: mx.array) -> str | None:
    """Why logits `a` (batched) are not `b` (alone) to float rounding, or None: within 1e-3
    relative, and the greedy pick unmoved unless two candidates are within that rounding.
    Looser than test_stage's 1e-4: a batch's matmul shapes change OpenBLAS's summation order,
    and some families' random tiny models amplify it (granite: 1.6e-4 under pytest, 0 alone);
    a real batching mistake moves logits by whole units (0.4 to 21 in the ones seen)."""
    diff = mx.max(mx.abs(a - b)).item()
    if diff > 1e-3 * max(1.0, mx.max(mx.abs(b)).item()):
        return f"logits differ by {diff} (largest {mx.max(mx.abs(b)).item():.1f})"
    top2 = mx.sort(b[0])[-2:].tolist()
    if top2[1] - top2[0] > 10 * diff and mx.argmax(a).item() != mx.argmax(b).item():
        return "the greedy pick moved"
    return None


def with_tokenizer(dest: Path, model_dir: Path, family: str, **kw: Any) -> Path:
    """A tiny random `family` model (make_family_model's keywords) that speaks the embedded
    model's tokenizer (its vocabulary size, chat template and EOS ids), so a gateway can serve
    it over HTTP: real requests through a real ring, with a tiny model's compute."""
    src = json.loads((model_dir / "config.json").read_text())
    return speak_tokenizer(make_family_model(dest, family, vocab_size=src["vocab_size"], **kw), model_dir)
