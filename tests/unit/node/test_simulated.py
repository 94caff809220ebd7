"""Simulated devices (node/simulated.py) and the rules that size micro-batching by device."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import pytest

from tests.tiny import make_tiny_model
from zmqinfer.gateway.admission import SPARE_GROUPS, groups
from zmqinfer.node.sampling import SeqSampler, sample_batch
from zmqinfer.node.simulated import (
    FIRST_TOKEN,
    SimulatedCost,
    SimulatedCostError,
    SimulatedStage,
)
from zmqinfer.protocol.wire import SamplingParams, SeqId


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sim") / "m", "llama", n_layers=3, hidden=32, vocab=2048)


def test_costs_parse_and_bad_ones_are_refused() -> None:
    assert SimulatedCost.parse("10") == SimulatedCost(10.0)
    assert SimulatedCost.parse("10,0.5,0.25") == SimulatedCost(10.0, 0.5, 0.25)
    for bad in ("", "x", "1,2,3,4", "-1", "20000"):
        with pytest.raises(SimulatedCostError):
            SimulatedCost.parse(bad)


def test_a_simulated_stage_sleeps_its_cost_and_passes_real_widths(model: Path) -> None:
    first = SimulatedStage(model, 0, 1, SimulatedCost(20.0, 5.0, 1.0))
    t0 = time.perf_counter()
    h = first.forward(SeqId(1), 0, mx.array([5] * 10, dtype=mx.int32), None, want_logits=False)
    assert time.perf_counter() - t0 >= 0.010 and h.shape == (10, 32)  # 10 tokens x 1 ms
    t0 = time.perf_counter()
    h = first.decode(0, [SeqId(1), SeqId(2)], [10, 0], mx.array([5, 6], dtype=mx.int32), None)
    assert time.perf_counter() - t0 >= 0.030 and h.shape == (2, 32)  # 20 ms + 2 x 5 ms
    assert first.sequences == 2 and not first.is_last
    first.release([SeqId(1)])
    assert first.seq_ids == (SeqId(2),)


def test_the_last_stage_makes_greedy_pick_a_token_of_its_position(model: Path) -> None:
    last = SimulatedStage(model, 2, 3, SimulatedCost(0.0))
    logits = last.decode(0, [SeqId(1), SeqId(2)], [7, 41], mx.array([1, 2], dtype=mx.int32), mx.zeros((2, 32)))
    samplers = [SeqSampler(SeqId(i), SamplingParams()) for i in (1, 2)]
    assert [s.token for s in sample_batch(samplers, logits)] == [FIRST_TOKEN + 8, FIRST_TOKEN + 42]


def test_one_device_gets_one_group_several_get_a_spare() -> None:
    assert groups(1) == 1  # stages sharing one machine: one batch, as batch_generate
    assert groups(3) == 3 + SPARE_GROUPS
