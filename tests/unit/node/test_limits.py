"""A node's own guards (issue 10): a stage refuses new sequences beyond its KV cap and sequence
cap with a StageError (the gateway hears StepFailed) instead of growing until the process is
killed; the event loop reads plain counters the mlx thread publishes, never the stage's dicts;
a silent gateway's caches are freed whenever the beat loop looks, not only inside a 1 s window."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from tests.tiny import make_tiny_model
from zmqinfer.model.size import KV_COPY_FACTOR
from zmqinfer.node.loading import cap_kv, load_shard
from zmqinfer.node.process import GATEWAY_GONE_S, gateway_gone
from zmqinfer.node.stage import Stage, StageError
from zmqinfer.node.worker import Worker
from zmqinfer.protocol.codec import tokens_to_wire
from zmqinfer.protocol.wire import Chunk, Epoch, Forward, SamplingParams, SeqId


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", n_layers=2)


def prefill(st: Stage, seq: int, n: int) -> None:
    st.forward(SeqId(seq), 0, mx.array(list(range(1, n + 1)), dtype=mx.int32), None, want_logits=False)


def test_a_full_stage_refuses_new_sequences_and_keeps_serving_the_old(tiny: Path) -> None:
    st = Stage(tiny, 0, 2)
    assert st.kv_bytes_per_token == 2 * 2 * 16 * 4 * 2  # K+V x kv_heads x head_dim x f32 x layers
    st.max_kv_tokens = 100
    prefill(st, 1, 60)
    with pytest.raises(StageError, match="KV cache full"):
        prefill(st, 2, 50)  # 60 + 50 > 100
    assert st.sequences == 1 and st.kv_tokens() == 60
    st.forward(SeqId(1), 60, mx.array([7], dtype=mx.int32), None, want_logits=False)  # the old one goes on
    prefill(st, 3, 30)  # what fits is still taken
    assert st.kv_tokens() == 91


def test_a_stage_caps_its_sequences(tiny: Path) -> None:
    st = Stage(tiny, 0, 2, max_sequences=3)
    for s in range(3):
        prefill(st, s, 2)
    with pytest.raises(StageError, match="already holds 3 sequences"):
        prefill(st, 9, 2)
    st.release([SeqId(0)])
    prefill(st, 9, 2)


def test_the_worker_publishes_plain_counters(tiny: Path) -> None:
    w = Worker()
    w.install(load_shard(str(tiny), 0, 2))
    # 10 tokens of room once the copies mlx makes while a cache grows are counted.
    assert w.stage is not None
    assert cap_kv(w.stage, KV_COPY_FACTOR * 10 * w.stage.kv_bytes_per_token) == 10
    fwd = Forward(Epoch(1), 1, (Chunk(SeqId(5), 0, 4, sample=False, params=SamplingParams()),), -1,
                  tokens_to_wire([1, 2, 3, 4]))
    msg, failures = w.run(fwd)
    assert not failures and (w.sequences, w.kv_tokens) == (1, 4) and w.shard_bytes > 0
    big = Forward(Epoch(1), 2, (Chunk(SeqId(6), 0, 8, sample=False, params=SamplingParams()),), -1,
                  tokens_to_wire(list(range(1, 9))))
    _, failures = w.run(big)  # 4 + 8 > 10: refused as a failed chunk, the worker goes on
    assert [f[0] for f in failures] == [(SeqId(6),)] and "KV cache full" in failures[0][1]

    class Busy:  # what the event loop would meet if it walked the stage mid-step
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"the event loop read stage.{name}")

    real, w.stage = w.stage, Busy()  # type: ignore[assignment]
    try:
        assert (w.sequences, w.shard_bytes) == (1, real.shard_bytes)  # type: ignore[union-attr]
    finally:
        w.stage = real
    w.release((SeqId(5),))
    assert w.sequences == 0 and w.kv_tokens == 0


def test_a_silent_gateways_caches_are_freed_whenever_the_beat_looks() -> None:
    # The beat loop waits up to CONTROL_SEND_TIMEOUT_S per send with no gateway, so it looks
    # every ~2.5 s: a 1 s window after GATEWAY_GONE_S was usually missed.
    assert gateway_gone(GATEWAY_GONE_S + 2.7, sequences=3)
    assert gateway_gone(GATEWAY_GONE_S * 4, sequences=1)
    assert not gateway_gone(GATEWAY_GONE_S - 1, sequences=3)
    assert not gateway_gone(GATEWAY_GONE_S + 5, sequences=0)  # nothing to free
