"""What a node's heartbeat reports about its work (Worker counters, Stage.kv_bytes), on a tiny
real model through the real worker: steps, token rows, busy time, layers held, KV-cache bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import make_tiny_model
from zmqinfer.node.loading import load_shard
from zmqinfer.node.worker import Worker
from zmqinfer.protocol.codec import tokens_to_wire
from zmqinfer.protocol.wire import (
    NO_GROUP,
    Chunk,
    Epoch,
    Forward,
    SamplingParams,
    SeqId,
)

N_LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 16  # make_tiny_model's defaults (hidden 64, 4 heads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", n_layers=N_LAYERS)


def test_counters_and_kv_bytes_follow_the_work(tiny: Path) -> None:
    w = Worker()
    assert (w.steps, w.tokens, w.kv_bytes, w.layers) == (0, 0, 0, 0)
    w.install(load_shard(str(tiny), 0, N_LAYERS))
    assert w.layers == N_LAYERS and w.kv_bytes == 0
    seq, prompt = SeqId(1), [5, 6, 7, 8, 9]
    params = SamplingParams()
    w.run(Forward(Epoch(1), 1, (Chunk(seq, 0, 4, sample=False, params=params),), NO_GROUP,
                  tokens_to_wire(prompt[:4])))
    # mlx-lm's KVCache grows 256 positions at a time: keys + values, per layer, float32.
    per_layer = 2 * KV_HEADS * 256 * HEAD_DIM * 4
    assert (w.steps, w.tokens, w.kv_bytes) == (1, 4, N_LAYERS * per_layer)
    assert w.kv_bytes == w.stage.kv_bytes  # type: ignore[union-attr]
    out, failures = w.run(Forward(Epoch(1), 2, (Chunk(seq, 4, 1, sample=True),), 0, tokens_to_wire(prompt[4:])))
    assert not failures and out.samples  # type: ignore[union-attr]
    assert (w.steps, w.tokens) == (2, 5) and w.kv_bytes > 0 and w.busy_seconds > 0
    w.release((seq,))
    assert w.kv_bytes == 0 and w.sequences == 0 and w.steps == 2  # totals stay: they are counters
