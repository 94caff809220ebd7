"""A stand-in for a device: a stage that sleeps a configured cost instead of computing.

"Every device busy" must be measurable without N machines. A simulated stage has the real
stage's interface and is driven by the real worker, node process, sockets, wire, scheduler,
gateway and HTTP; only the arithmetic is replaced: prefill costs `prefill_token_ms` per token,
a decode step `decode_step_ms` plus `decode_seq_ms` per sequence in the group. It passes hidden
states of the model's real width (zeros), and the last stage's logits make greedy sampling pick
a token that depends only on the position, so every run generates the same text and never EOS.
Sleeping releases the CPU, so N simulated devices on one small machine behave as N machines do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from zmqinfer.model.resolve import layer_count, read_config
from zmqinfer.node.stage import StageError
from zmqinfer.protocol.wire import KVProfile, SeqId

# Simulated tokens stay clear of the low ids, where tokenizers keep EOS and other specials.
FIRST_TOKEN = 200
TOKEN_SPAN = 1000
DEVICE_PREFIX = "simulated"  # how a simulated node names its device: each one counts as a device


class SimulatedCostError(ValueError):
    pass


@dataclass(frozen=True)
class SimulatedCost:
    decode_step_ms: float  # one decode step of a micro-batch group
    decode_seq_ms: float = 0.0  # plus this per sequence in the group
    prefill_token_ms: float = 0.0  # a prefill chunk: this per token

    @classmethod
    def parse(cls, text: str) -> SimulatedCost:
        """`STEP_MS[,SEQ_MS[,PREFILL_TOKEN_MS]]`, e.g. "10" or "10,0.5,0.2"."""
        try:
            parts = [float(x) for x in text.split(",")]
        except ValueError:
            raise SimulatedCostError(f"--simulate {text!r}: expected STEP_MS[,SEQ_MS[,PREFILL_TOKEN_MS]] "
                                     "in milliseconds") from None
        if not 1 <= len(parts) <= 3 or any(not 0 <= p <= 10_000 for p in parts):
            raise SimulatedCostError(f"--simulate {text!r}: one to three costs, each 0..10000 ms")
        return cls(*parts)

    def text(self) -> str:
        return f"{self.decode_step_ms:g},{self.decode_seq_ms:g},{self.prefill_token_ms:g}"


class SimulatedStage:
    """Layers [start, end) of the model at `model_path`, simulated. Only the mlx thread uses it."""

    def __init__(self, model_path: Path, start: int, end: int, cost: SimulatedCost) -> None:
        config = read_config(model_path)
        n_layers = layer_count(config)
        if not 0 <= start < end <= n_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {n_layers} layers")
        self.start, self.end, self.cost = start, end, cost
        self.is_first, self.is_last = start == 0, end == n_layers
        self.hidden_size = int(config["hidden_size"])
        self.hidden_dtype = "float32"  # the zeros it passes on
        self.vocab_size = int(config["vocab_size"])
        self.shard_bytes = 0  # holds no weights
        self._offsets: dict[SeqId, int] = {}  # tokens each sequence has seen: its cache length

    @property
    def seq_ids(self) -> tuple[SeqId, ...]:
        return tuple(self._offsets)

    @property
    def sequences(self) -> int:
        return len(self._offsets)

    @property
    def kv_bytes(self) -> int:
        return 0  # a simulated cache holds nothing

    kv_bytes_per_token = 0
    kv: KVProfile | None = None  # its caches hold nothing: the gateway counts config.json's
    max_kv_tokens: int | None = None
    # Its greedy picks follow positions, not text, so prompt lookup would never draft anything
    # they accept: a simulated ring does not speculate.
    rollback = False

    def kv_tokens(self) -> int:
        return sum(self._offsets.values())

    def release(self, seqs: list[SeqId] | tuple[SeqId, ...]) -> None:
        for s in seqs:
            self._offsets.pop(s, None)

    def seed(self, seq: SeqId, prefix: int, start: int) -> None:
        self._offsets[seq] = start  # a simulated cache holds nothing: any prefix is "held"

    def keep(self, seq: SeqId, prefix: int, length: int) -> bool:
        return seq in self._offsets

    def drop_prefixes(self, prefixes: tuple[int, ...] | None) -> None:
        pass

    def expire_idle(self, now: float | None = None) -> list[SeqId]:
        return []  # nothing to free: a simulated cache costs no memory

    def forward(self, seq: SeqId, start: int, tokens: mx.array, hidden: mx.array | None,
                want_logits: bool) -> mx.array:
        n = tokens.shape[0]
        time.sleep(self.cost.prefill_token_ms * n / 1000)
        self._offsets[seq] = start + n
        if self.is_last:
            return mx.zeros((0,), dtype=mx.float32)
        return mx.zeros((n, self.hidden_size), dtype=mx.float32)

    def prefill_batch(self, seqs: list[SeqId], tokens: list[mx.array], hidden: list[mx.array] | None,
                      starts: list[int] | None = None) -> list[mx.array]:
        """Several sequences' prefill chunks: the cost of their tokens, slept once."""
        time.sleep(self.cost.prefill_token_ms * sum(t.shape[0] for t in tokens) / 1000)
        for s, at, t in zip(seqs, starts or [0] * len(seqs), tokens):
            self._offsets[s] = at + t.shape[0]
        if self.is_last:
            return [mx.zeros((0,), dtype=mx.float32) for _ in seqs]
        return [mx.zeros((t.shape[0], self.hidden_size), dtype=mx.float32) for t in tokens]

    def verify(self, seq: SeqId, start: int, trim: int, tokens: mx.array,
               hidden: mx.array | None) -> mx.array:
        raise StageError(f"sequence {seq}: a simulated stage takes no drafted tokens")

    def decode(self, group: int, seqs: list[SeqId], starts: list[int], tokens: mx.array,
               hidden: mx.array | None) -> mx.array:
        time.sleep((self.cost.decode_step_ms + self.cost.decode_seq_ms * len(seqs)) / 1000)
        for s, at in zip(seqs, starts):
            self._offsets[s] = at + 1
        if not self.is_last:
            return mx.zeros((len(seqs), self.hidden_size), dtype=mx.float32)
        # Greedy picks FIRST_TOKEN + (position + 1) mod TOKEN_SPAN: the same text every run. The
        # logits cover only the ids it can pick, so that sampling them costs next to nothing:
        # what is measured is the pipeline, not a vocabulary-wide softmax.
        width = min(FIRST_TOKEN + TOKEN_SPAN, self.vocab_size)
        target = FIRST_TOKEN + (mx.array(starts, dtype=mx.int32) + 1) % (width - FIRST_TOKEN)
        return (mx.arange(width)[None, :] == target[:, None]).astype(mx.float32)
