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


def test_a_release_keeps_a_prefix_a_later_forward_starts_from_and_drops_it(tiny: Path) -> None:
    """The prefix cache's wire path (issue 22): Release.keep, Chunk.prefix, Release.drop."""
    from zmqinfer.protocol.wire import Keep

    w = Worker()
    w.install(load_shard(str(tiny), 0, N_LAYERS))
    prompt, params = [5, 6, 7, 8, 9, 10, 11], SamplingParams()

    def sampled(seq: SeqId, prefix: int | None, start: int) -> int:
        first = Chunk(seq, start, 6 - start, sample=False, params=params, prefix=prefix)
        _, failures = w.run(Forward(Epoch(1), 1, (first,), NO_GROUP, tokens_to_wire(prompt[start:6])))
        assert not failures, failures
        out, failures = w.run(Forward(Epoch(1), 2, (Chunk(seq, 6, 1, sample=True),), 0, tokens_to_wire(prompt[6:])))
        assert not failures, failures
        return out.samples[0].token  # type: ignore[union-attr]

    cold = sampled(SeqId(1), None, 0)
    w.release((SeqId(1),), keep=(Keep(SeqId(1), 4, 7),))
    assert w.sequences == 0 and w.kv_tokens == 7  # the prefix's positions stay, counted
    assert sampled(SeqId(2), 4, 4) == cold  # from the prefix's first 4 positions
    w.release((SeqId(2),), drop=(4,))
    assert w.kv_tokens == 0
    first = Chunk(SeqId(3), 4, 2, sample=False, params=params, prefix=4)
    _, failures = w.run(Forward(Epoch(1), 3, (first,), NO_GROUP, tokens_to_wire(prompt[4:6])))
    assert failures and "not held" in failures[0][1] and w.sequences == 0
