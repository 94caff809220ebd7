"""Which model families a stage may serve, and the driver that runs a slice of any of them with
mlx-lm's own model code.

Rather than re-write each family's forward, a stage calls the model's own `__call__` on a full
cache list, with its layers swapped for thin wrappers (`ModelDriver`):
* a layer outside the stage's range passes its input through untouched (`_Skip`), so the
  model's own code still builds every mask, embedding scale, soft-cap and head it always does;
* the stage's first layer replaces its input with the hidden state the previous stage sent (on
  stages after the first, the embedding is a stub of zeros: whatever the model does between its
  embedding and its first layer, e.g. gemma's scale, is computed on it and thrown away);
* the stage's last layer records its output: what the next stage receives. On the last stage,
  when only the last position's logits are wanted, it keeps that position alone, so norm and head
  run on one row (they are per-position; nothing after the last layer mixes positions).

Which cache slot each layer uses is read once by a dry run of the model's own `__call__` (a
layer's slot is the cache object it is handed), so families whose cache list skips layers
(nemotron_h's MLP layers) need no table. A slot outside the stage is given a cache of the stage
of the same kind, so masks built from it (gemma3's global mask from the layer at index 5) are
what that kind of layer sees; masks built from a slot of a kind the stage lacks feed only skipped
layers.

Families are served only once a test proves the split exact (tests/unit/node/test_families.py);
the others are refused at load by name, with the reason.
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import CacheList, RotatingKVCache, make_prompt_cache

from zmqinfer.protocol.wire import KVProfile

# Split against the unsplit mlx-lm model, token- and logit-exact (single sequence) and batched
# to float rounding, by tests/unit/node/test_families.py on tiny random models from mlx-lm's own
# ModelArgs (mlx-lm 0.32). "mistral" loads as llama (mlx-lm's MODEL_REMAPPING).
EXACT_FAMILIES: frozenset[str] = frozenset({
    "Klear", "afmoe", "apertus", "baichuan_m1", "bailing_moe", "cohere", "cohere2", "dbrx",
    "deepseek", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5", "ernie4_5_moe",
    "exaone", "exaone4", "exaone_moe", "falcon_h1", "gemma", "gemma2", "gemma3_text", "glm",
    "glm4", "glm4_moe", "glm4_moe_lite", "gpt2", "gpt_bigcode", "gpt_neox", "gpt_oss", "granite",
    "granitemoe", "granitemoehybrid", "helium", "hunyuan_v1_dense", "internlm2", "internlm3",
    "jamba", "kimi_linear", "laguna", "lfm2", "lfm2_moe", "lille-130m", "llama", "llama4_text",
    "longcat_flash", "mamba", "mamba2", "mimo", "mimo_v2_flash", "minicpm", "minimax",
    "ministral3", "mistral", "mixtral", "nanochat", "nemotron", "nemotron_h", "olmo2", "olmo3",
    "olmoe", "openelm", "phi3", "qwen", "qwen2", "qwen2_moe", "qwen3", "qwen3_5", "qwen3_5_moe",
    "qwen3_moe", "qwen3_next", "recurrent_gemma", "smollm3", "stablelm", "starcoder2", "step3p5",
    "telechat3", "youtu_llm"
})

# Families tried and refused, with why (what a user sees when a node refuses to load one).
_NOT_A_LIST = "its layers are not one list the model's code iterates"
_CROSS = ("its layers pass more than the hidden state between them (shared KV or extra state), "
          "which a cut between layers would drop")
_DIFFERS = "split, its output differs from the unsplit model's (state shared across layers)"
_EMBED = "its embedding is not one token embedding (per-token inputs only the first stage sees)"
_WRAP = "a multimodal wrapper with no text-only tiny model in mlx-lm's tests to prove it on"
REFUSED_FAMILIES: dict[str, str] = {
    "afm7": _NOT_A_LIST,
    "bailing_moe_linear": _DIFFERS,
    "bitnet": "its kernels need Metal: mlx's CPU build cannot run it",
    "gemma3n": _WRAP,
    "gemma4_text": _CROSS,
    "hunyuan": _CROSS,
    "iquestloopcoder": _DIFFERS,
    "llama4": _WRAP + "; its chunked-attention cache cannot be batched by mlx-lm",
    "longcat_flash_ngram": _EMBED,
    "phi3small": "its tiny model crashes mlx's CPU build (segfault): not proven",
    "plamo": "its layers are a list inside a module below the one holding its embedding",
    "plamo2": _EMBED,
    "rwkv7": _CROSS,
    "seed_oss": "its model code reads the embedding's weights on every stage",
}

# Families whose recurrent layers run their state over a right-padded batch's padding in mlx-lm
# 0.32 (they ignore the cache's lengths): their first chunks are prefilled one sequence at a
# time; their decode, which has no padding, is batched.
SOLO_PREFILL: frozenset[str] = frozenset({"mamba", "nemotron_h", "jamba"})

_FINAL_NORM_NAMES = ("norm", "norm_f", "final_layernorm", "ln_f", "final_norm")
_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "hidden_dim", "model_dim", "dim")


def refusal(family: str) -> str | None:
    """Why a stage must not serve `family`, or None when it is proven exact."""
    if family in EXACT_FAMILIES:
        return None
    reason = REFUSED_FAMILIES.get(family, "not proven exact when split (tests/unit/node/test_families.py)")
    return f"model family {family!r} is not served by the ring: {reason}"


def hidden_size(config: dict[str, Any]) -> int:
    text = config.get("text_config") or {}
    for key in _HIDDEN_KEYS:
        for src in (config, text):
            if isinstance(src.get(key), int):
                return int(src[key])
    raise ValueError("config.json names no hidden size")


def flat(cache: Any) -> list[Any]:
    """A cache's leaves (a CacheList holds several)."""
    return [x for c in cache.caches for x in flat(c)] if isinstance(cache, CacheList) else [cache]


def _kind(cache: Any) -> tuple[Any, ...]:
    """What makes two caches interchangeable for building a mask."""
    if isinstance(cache, CacheList):
        return ("list", *(_kind(c) for c in cache.caches))
    return (type(cache).__name__, getattr(cache, "max_size", None), getattr(cache, "keep", None),
            getattr(cache, "chunk_size", None), len(getattr(cache, "cache", ()) or ()))


def batchable(cache: Any) -> bool:
    """Whether mlx-lm can batch this cache (merge into a group, as its BatchGenerator does)."""
    return all(hasattr(type(c), "merge") for c in flat(cache))


class _IO:
    """What the wrappers read and write during one call (a plain object: an mx.array attribute
    of an nn.Module would count as one of its parameters)."""

    def __init__(self) -> None:
        self.inject: mx.array | None = None
        self.out: mx.array | None = None
        self.last_only = False
        self.seen: list[list[int]] = []


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    if args:
        return args[0], args[1:], kwargs
    key = next(iter(kwargs))
    rest = dict(kwargs)
    return rest.pop(key), (), rest


class _Stand(nn.Module):
    """Stands in for a layer: the model's own code may read the layer's attributes (gemma3's
    `use_sliding`, nemotron_h's `block_type`), so those fall through to the real layer, which is
    kept outside the module tree (its weights are no parameter of the stage)."""

    def __init__(self, real: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_real", real)

    def __getattr__(self, key: str) -> Any:
        try:
            return super().__getattr__(key)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), key)


class _Skip(_Stand):
    """A layer of another stage: its input passes through."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _hidden_arg(args, kwargs)[0]


class _Held(_Stand):
    """One of the stage's own layers, run as the model calls it."""

    def __init__(self, layer: nn.Module, io: _IO, first: bool, last: bool) -> None:
        super().__init__(layer)
        self.layer = layer
        self._io, self._first, self._last = io, first, last

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        x, rest, kw = _hidden_arg(args, kwargs)
        if self._first and self._io.inject is not None:
            x = self._io.inject
        out = self.layer(x, *rest, **kw)
        if self._last:
            if self._io.last_only:
                out = out[:, -1:, :]
            self._io.out = out
        return out


class _Recorder(_Stand):
    """Dry run only: notes which cache objects the model hands this layer."""

    def __init__(self, real: nn.Module, index: int, io: _IO) -> None:
        super().__init__(real)
        self._index, self._io = index, io

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        things = list(args) + list(kwargs.values())
        things += [y for t in things if isinstance(t, (tuple, list)) for y in t]
        self._io.seen[self._index] = [id(t) for t in things]
        return _hidden_arg(args, kwargs)[0]


class _Stub(nn.Module):
    """The embedding of a stage after the first: zeros of the hidden shape (the first layer
    replaces them); its head, when the last stage's head is tied to the embedding, is real."""

    def __init__(self, width: int, dtype: mx.Dtype, real: nn.Module | None) -> None:
        super().__init__()
        self._width, self._dtype = width, dtype
        if real is not None:
            self.real = real

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.zeros((*ids.shape, self._width), dtype=self._dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        # A middle stage's tied "head" is built by the model's code but never evaluated.
        return self.real.as_linear(x) if "real" in self else x


class _Identity(nn.Module):
    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


# What families call their list of layers (gpt2's h, dbrx's blocks).
_LAYER_LISTS = ("layers", "h", "blocks")


def _inner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module that owns the layer list the model's `layers` names (nested in a wrapper for
    some families: qwen3_5's language_model.model), and that list's attribute name."""
    layers = getattr(model, "layers", None)
    owners = [(m, k) for _, m in model.named_modules() for k in _LAYER_LISTS if isinstance(m.get(k), list)]
    for module, key in owners:  # the owner of that very list, else (a pipeline's view of it) its length
        if module.get(key) is layers:
            return cast(nn.Module, module), key
    for module, key in owners:
        if layers is None or len(module[key]) == len(layers):
            return cast(nn.Module, module), key
    raise ValueError("the model has no inner module with a list of layers")


def _embedding_name(inner: nn.Module) -> str:
    for name, child in inner.children().items():
        if isinstance(child, (nn.Embedding, nn.QuantizedEmbedding)):
            return name
    raise ValueError("the model's inner module has no token embedding")


def _layer_dtype(layer: nn.Module) -> mx.Dtype:
    """The dtype the residual stream has: a norm's weight's (never quantized), else the layer's
    most common floating dtype."""
    flat_params = cast(list[tuple[str, mx.array]], tree_flatten(layer.parameters()))
    params = [(n, v) for n, v in flat_params if mx.issubdtype(v.dtype, mx.floating)]
    for name, v in params:
        if "norm" in name:
            return v.dtype
    return params[0][1].dtype if params else mx.float32


class ModelDriver:
    """Runs layers [start, end) of a loaded mlx-lm model through the model's own `__call__`."""

    def __init__(self, model: nn.Module, config: dict[str, Any], start: int, end: int) -> None:
        self.model = model
        inner, self._key = _inner(model)
        n = len(inner[self._key])
        if not 0 <= start < end <= n:
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {n} layers")
        self.n_layers, self.start, self.end = n, start, end
        self.is_first, self.is_last = start == 0, end == n
        self.width = hidden_size(config)
        self.dtype = _layer_dtype(inner[self._key][start])
        self._io = _IO()
        embed_name = _embedding_name(inner)
        real_embed = getattr(inner, embed_name)
        # Its rows, not config.json's vocab_size: a wrapper (qwen3_5) keeps that in text_config.
        self.vocab_size = int(real_embed.weight.shape[0])
        # Tied: the head is the embedding (gemma's always is, and has no lm_head to say so).
        self.tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False)
                         or config.get("tie_word_embeddings", False)
                         or not isinstance(getattr(model, "lm_head", None), nn.Module))
        self.templates = make_prompt_cache(model)  # the model's own cache kinds, one per slot
        slot_of = self._slots(inner, n)
        own = [s for i in range(start, end) if (s := slot_of[i]) is not None]
        self.own_slots = sorted(set(own))
        kinds = {_kind(self.templates[s]): k for k, s in reversed(list(enumerate(self.own_slots)))}
        # For each slot: the index of the stage's own cache to hand the model there (None: an
        # untouched placeholder; its masks feed only skipped layers).
        mine = {s: k for k, s in enumerate(self.own_slots)}
        self._alias: list[int | None] = [mine.get(s, kinds.get(_kind(t))) for s, t in enumerate(self.templates)]
        self._spare = make_prompt_cache(model)
        setattr(inner, self._key, [_Held(l, self._io, i == start, i == end - 1) if start <= i < end
                                   else _Skip(l) for i, l in enumerate(inner[self._key])])
        if not self.is_first:
            setattr(inner, embed_name, _Stub(self.width, self.dtype,
                                             real_embed if self.is_last and self.tied else None))
        if not self.is_last:  # the head and final norm of another stage: never built or read
            for name in _FINAL_NORM_NAMES:
                if isinstance(getattr(inner, name, None), nn.Module):
                    setattr(inner, name, _Identity())
            if isinstance(getattr(model, "lm_head", None), nn.Module):
                model.lm_head = _Identity()
        self.batchable = all(batchable(self.templates[s]) for s in self.own_slots)

    def _slots(self, inner: nn.Module, n: int) -> list[int | None]:
        """Each layer's cache slot, read from a dry run of the model's own `__call__`."""
        layers = inner[self._key]
        self._io.seen = [[] for _ in range(n)]
        setattr(inner, self._key, [_Recorder(l, i, self._io) for i, l in enumerate(layers)])
        try:
            self.model(mx.zeros((1, 1), dtype=mx.int32), cache=self.templates)  # lazy: nothing runs
        finally:
            setattr(inner, self._key, layers)
        where = {id(c): s for s, c in enumerate(self.templates)}
        slots: list[int | None] = []
        for seen in self._io.seen:
            hits = [where[i] for i in seen if i in where]
            slots.append(hits[0] if hits else None)
        return slots

    def measure_caches(self) -> KVProfile:
        """One sequence's caches on this stage, by kind, measured on a one-token forward of
        mlx-lm's own caches: each attention cache's bytes per position it holds, a rotating
        (sliding-window) cache's with its window, and the recurrent states' bytes (SSM, conv),
        which do not grow with tokens."""
        caches = self.new_caches()
        self.run(mx.zeros((1, 1), dtype=mx.int32), mx.zeros((1, 1, self.width), dtype=self.dtype), caches, True)
        mx.eval([c.state for c in caches])
        per, state, windows = 0, 0, []
        for c in (x for c in caches for x in flat(c)):
            keys, values = getattr(c, "keys", None), getattr(c, "values", None)
            if isinstance(keys, mx.array) and isinstance(values, mx.array) and keys.ndim == 4:
                position = -(-(keys.nbytes + values.nbytes) // keys.shape[2])
                if isinstance(c, RotatingKVCache):
                    windows.append((position, int(c.max_size)))
                else:
                    per += position
            else:
                state += int(getattr(c, "nbytes", 0))
        return KVProfile(token_bytes=per, windows=tuple(windows), state_bytes=state)

    def new_caches(self) -> list[Any]:
        """Fresh caches for the stage's own slots (one sequence)."""
        fresh = make_prompt_cache(self.model)
        return [fresh[s] for s in self.own_slots]

    def full(self, own: list[Any]) -> list[Any]:
        return [own[a] if a is not None else self._spare[s] for s, a in enumerate(self._alias)]

    def run(self, ids: mx.array, hidden: mx.array | None, own: list[Any], last_only: bool) -> mx.array:
        """ids: int32 [B, L] (stage 0; zeros elsewhere, of the batch's shape); hidden: [B, L, width]
        from the previous stage. Returns the last layer's output [B, L, width] (non-last stages)
        or the logits [B, L or 1, vocab] (last stage; 1 when `last_only`)."""
        self._io.inject = None if self.is_first else hidden
        self._io.last_only = last_only and self.is_last
        self._io.out = None
        try:
            logits = self.model(ids, cache=self.full(own))
        finally:
            self._io.inject = None
        if self.is_last:
            return logits
        assert self._io.out is not None
        return self._io.out
