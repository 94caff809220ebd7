"""Admission by cache type (gateway/kvroom.py) with what real stages measure of mlx-lm's own
caches: a sliding-window model is admitted past what a full-KV estimate would hold, an SSM
state is counted once per sequence whatever its length, a group is padded to its longest."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.families import make_family_model
from tests.unit.gateway.test_scheduler import EOS, MemoryRing, collect, running, settle
from zmqinfer.gateway.errors import RingUnavailable
from zmqinfer.gateway.kvroom import KVRoom, StageRoom, ring_room
from zmqinfer.gateway.placement import RUNTIME_HEADROOM_BYTES, NodeCapacity, Placement
from zmqinfer.gateway.scheduler import Scheduler
from zmqinfer.model.shards import model_size
from zmqinfer.model.size import KV_COPY_FACTOR, KV_STEP, sequence_bytes
from zmqinfer.node.stage import Stage
from zmqinfer.protocol.wire import KVProfile, NodeId, SamplingParams

MIB = 1 << 20
TEST_DEADLINE_S = 20.0  # every test here ends well within this, or fails


def test_what_a_stage_measures_follows_its_cache_kinds(tmp_path: Path) -> None:
    # gemma3_text: 5 of every 6 layers slide over a window (here 16), the 6th attends to all.
    gemma = make_family_model(tmp_path / "g", "gemma3_text", sliding_window=16, num_hidden_layers=6)
    kv = Stage(gemma, 0, 6).kv
    assert [w for _, w in kv.windows] == [16] * 5 and kv.token_bytes > 0 and kv.state_bytes == 0
    assert Stage(gemma, 0, 5).kv.token_bytes == 0  # only sliding layers: no cache that keeps growing
    one = kv.windows[0][0]
    assert sequence_bytes(kv, 10_000) == kv.token_bytes * 10_000 + 5 * one * (16 + KV_STEP)
    # mamba2: a state per sequence, nothing per position.
    ssm = Stage(make_family_model(tmp_path / "m", "mamba2"), 0, 2).kv
    assert ssm.token_bytes == 0 and not ssm.windows and ssm.state_bytes > 0
    assert sequence_bytes(ssm, 1) == sequence_bytes(ssm, 100_000) == ssm.state_bytes


def test_a_sliding_window_model_admits_contexts_a_full_kv_estimate_would_refuse(tmp_path: Path) -> None:
    path = make_family_model(tmp_path / "g", "gemma3_text", sliding_window=16, num_hidden_layers=6)
    size, measured = model_size(path), Stage(path, 0, 6).kv
    assert measured.position_bytes == size.kv_bytes_per_token * 6  # the same bytes per position ...
    where = [Placement(NodeId("a"), 0, 6)]
    free = size.stage_bytes(0, 6) + RUNTIME_HEADROOM_BYTES + KV_COPY_FACTOR * 4 * MIB
    cap = [NodeCapacity(NodeId("a"), free)]
    windowed = ring_room(where, cap, size, {"a": measured})
    estimated = ring_room(where, cap, size, {"a": None})  # a stage that measured nothing
    assert windowed is not None and estimated is not None
    context = 8192
    assert windowed.fits([[context]]) and not estimated.fits([[context]])  # ... but windows stop
    longest = windowed.longest()
    assert longest is not None and longest > 5 * (estimated.longest() or 0)


def test_an_ssm_state_counts_once_per_sequence_whatever_its_length(tmp_path: Path) -> None:
    ssm = Stage(make_family_model(tmp_path / "m", "mamba2"), 0, 2).kv
    room = KVRoom((StageRoom(3 * ssm.state_bytes + ssm.state_bytes // 2, ssm),))
    assert room.longest() is None  # one sequence alone: any length
    assert room.fits([[100_000]] * 3) and not room.fits([[1]] * 4)
    assert room.fits([[10, 20, 30]]) and not room.fits([[10, 20], [30, 40]])  # a group is n states


def test_a_group_costs_its_members_padded_to_the_longest() -> None:
    room = KVRoom.of_tokens(1000)
    assert room.fits([[100, 400]] + [[100]]) and not room.fits([[100, 400, 300]])  # 3 x 400 > 1000
    assert room.fits([], 1000) and not room.fits([[1]], 1000)  # cached prefixes count too


async def test_admission_by_measured_windows_starts_a_long_request_a_full_kv_ring_refuses(tmp_path: Path) -> None:
    path = make_family_model(tmp_path / "g", "gemma3_text", sliding_window=16, num_hidden_layers=6)
    kv = Stage(path, 0, 6).kv
    full = KVProfile(token_bytes=kv.position_bytes)  # the same model counted without its windows
    room = 2 * sequence_bytes(kv, 4096)
    prompt, max_tokens = list(range(1, 3000)), 1000  # 4,096 positions with its cache steps
    for profile, admitted in ((kv, True), (full, False)):
        ring = MemoryRing(n_stages=1)
        ring.kv = KVRoom((StageRoom(room, profile),))
        sched = Scheduler(ring, {EOS}, max_queued=2)
        async with asyncio.timeout(TEST_DEADLINE_S), running(sched):
            if not admitted:
                with pytest.raises(RingUnavailable, match="may need 4096 tokens"):
                    await anext(sched.generate(prompt, SamplingParams(), max_tokens))
                continue
            tasks = [asyncio.create_task(collect(sched.generate(prompt, SamplingParams(), 4), []))
                     for _ in range(3)]
            await settle()
            assert sched.queued == 1  # two fit the room the windows leave, the third waits
            for t in tasks:
                t.cancel()
