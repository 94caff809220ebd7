"""Hidden states travel in the dtype the model computes in: half the bytes of float32 on Metal,
where models compute in bfloat16 (here: a bfloat16 tiny model on the CPU)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from tests.tiny import make_tiny_model
from zmqinfer.node.loading import load_shard
from zmqinfer.node.worker import Worker
from zmqinfer.protocol.codec import encode, tokens_to_wire
from zmqinfer.protocol.wire import NO_GROUP, Chunk, Epoch, Forward, SeqId

HIDDEN = 64


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_hidden_states_travel_in_the_compute_dtype(tmp_path: Path, dtype: str) -> None:
    path = make_tiny_model(tmp_path / "m", "llama", hidden=HIDDEN)
    weights = dict(tree_flatten(mx.load(str(path / "model.safetensors"))))
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()}, metadata={"format": "mlx"})
    w = Worker()
    w.install(load_shard(str(path), 0, 2))
    prefill = Forward(epoch=Epoch(1), step=1, chunks=(Chunk(seq=SeqId(1), start=0, length=3, sample=False),),
                      group=NO_GROUP, tokens=tokens_to_wire([1, 2, 3]))
    w.run(prefill)
    step = Forward(epoch=Epoch(1), step=2, chunks=(Chunk(seq=SeqId(1), start=3, length=1, sample=True),),
                   group=0, tokens=tokens_to_wire([4]))
    out, failures = w.run(step)
    assert not failures and isinstance(out, Forward) and out.hidden is not None
    assert out.hidden.dtype == dtype
    wire = sum(len(memoryview(f)) for f in encode(out))
    per_value = 2 if dtype == "bfloat16" else 4
    # DESIGN.md section 1: hidden x 2 bytes per sequence in bf16, plus a small header.
    assert wire <= HIDDEN * per_value + 256, wire
