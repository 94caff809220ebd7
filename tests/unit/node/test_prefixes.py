"""Cached prefixes on real stages (issue 22): a sequence started from a cached prefix computes
exactly what a cold prefill cut at the same positions computes, the prefix is never changed by
the sequences that use it, and a full stage evicts prefixes before it refuses a sequence."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from tests.tiny import FAMILIES, make_tiny_model
from zmqinfer.node.stage import Stage, StageError
from zmqinfer.protocol.wire import SeqId

HISTORY = [3, 17, 250, 9, 41, 77, 5, 128, 64, 2, 199, 31, 8, 90]  # turn 1: prompt + reply
NEXT = HISTORY[:9] + [12, 150, 6, 44, 201]  # turn 2 agrees with turn 1 on its first 9 tokens
CUT = 9
STEPS = 6


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(request.param), request.param, n_layers=4)


def ring(path: Path) -> list[Stage]:
    return [Stage(path, 0, 2), Stage(path, 2, 3), Stage(path, 3, 4)]


def through(stages: list[Stage], seq: SeqId, start: int, ids: list[int], want: bool) -> mx.array:
    h = None
    for st in stages:
        h = st.forward(seq, start, mx.array(ids, dtype=mx.int32), h, want_logits=want)
    return h


def decode(stages: list[Stage], seq: SeqId, pos: int, y: int, group: int) -> list[mx.array]:
    """STEPS greedy decode steps in a micro-batch group (its batch cache: what `keep` cuts from)."""
    logits = []
    for _ in range(STEPS):
        h = None
        for st in stages:
            h = st.decode(group, [seq], [pos], mx.array([y], dtype=mx.int32), h)
        logits.append(h)
        y, pos = int(mx.argmax(h, axis=-1).item()), pos + 1
    return logits


def cold(stages: list[Stage], seq: SeqId) -> list[mx.array]:
    """NEXT prefilled from 0, cut at CUT as the cached run is, then decoded."""
    through(stages, seq, 0, NEXT[:CUT], False)
    through(stages, seq, CUT, NEXT[CUT:-1], False)
    return decode(stages, seq, len(NEXT) - 1, NEXT[-1], group=1)


def test_a_sequence_from_a_cached_prefix_equals_a_cold_prefill(tiny: Path) -> None:
    stages = ring(tiny)
    expected = cold(stages, SeqId(50))
    for st in stages:
        st.release([SeqId(50)])
    # Turn 1: prefill, then decode in a group; its first 11 positions are kept as prefix 7 on
    # every stage (cut out of the group's batch cache), and its caches freed. Its prefill is cut
    # at CUT too: a K/V row is bit-identical only when computed in a chunk of the same size
    # (BLAS blocks by rows); any other cut agrees to float rounding (the next test).
    through(stages, SeqId(1), 0, HISTORY[:CUT], False)
    through(stages, SeqId(1), CUT, HISTORY[CUT:10], False)
    decode(stages, SeqId(1), 10, HISTORY[10], group=0)
    for st in stages:
        assert st.keep(SeqId(1), 7, 11)
        st.release([SeqId(1)])
    assert all(st.prefixes.tokens() == 11 and st.kv_tokens() == 11 for st in stages)
    # Turn 2 shares 9 tokens: it starts from the prefix cut back to 9, twice (the prefix must
    # come out of the first use unchanged).
    for seq in (SeqId(2), SeqId(3)):
        for st in stages:
            st.seed(seq, 7, CUT)
        through(stages, seq, CUT, NEXT[CUT:-1], False)
        got = decode(stages, seq, len(NEXT) - 1, NEXT[-1], group=seq)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert mx.array_equal(a, b).item(), f"sequence {seq}: logits differ at step {i}"
    # A different continuation really was computed: the test would catch a stale cache.
    assert not mx.array_equal(expected[0], decode(stages, SeqId(1), 0, 5, group=9)[0]).item()


def test_a_prefix_computed_in_other_chunks_agrees_to_float_rounding(tiny: Path) -> None:
    stages = ring(tiny)
    expected = cold(stages, SeqId(50))
    through(stages, SeqId(1), 0, HISTORY, False)
    for st in stages:
        assert st.keep(SeqId(1), 7, len(HISTORY))
    for st in stages:
        st.seed(SeqId(2), 7, CUT)
    through(stages, SeqId(2), CUT, NEXT[CUT:-1], False)
    got = decode(stages, SeqId(2), len(NEXT) - 1, NEXT[-1], group=2)
    for a, b in zip(got, expected):
        assert mx.allclose(a, b, atol=1e-4).item()
        assert int(mx.argmax(a).item()) == int(mx.argmax(b).item())


def test_seeding_what_is_not_held_is_refused(tiny: Path) -> None:
    st = Stage(tiny, 0, 4)
    st.forward(SeqId(1), 0, mx.array(HISTORY[:5], dtype=mx.int32), None, want_logits=False)
    assert not st.keep(SeqId(1), 3, 6), "kept more positions than the sequence holds"
    assert not st.keep(SeqId(99), 3, 2), "kept a sequence that is not there"
    assert st.keep(SeqId(1), 3, 5)
    with pytest.raises(StageError, match="not held"):
        st.seed(SeqId(2), 3, 6)  # longer than the prefix
    with pytest.raises(StageError, match="not held"):
        st.seed(SeqId(2), 4, 2)  # never kept
    with pytest.raises(StageError, match="already holds"):
        st.seed(SeqId(1), 3, 2)
    st.drop_prefixes((3,))
    with pytest.raises(StageError, match="not held"):
        st.seed(SeqId(2), 3, 2)


def test_a_full_stage_evicts_prefixes_before_refusing(tiny: Path) -> None:
    st = Stage(tiny, 0, 4)
    for pid in (1, 2):
        seq = SeqId(pid)
        st.forward(seq, 0, mx.array(HISTORY[:8], dtype=mx.int32), None, want_logits=False)
        assert st.keep(seq, pid, 8)
        st.release([seq])
    st.seed(SeqId(5), 2, 4)  # prefix 2 used last: prefix 1 is the least recently used
    st.release([SeqId(5)])
    st.max_kv_tokens = 20
    # 16 held in prefixes; 10 more fit only once prefix 1 (8) goes, and prefix 2 stays.
    st.forward(SeqId(3), 0, mx.array(HISTORY[:10], dtype=mx.int32), None, want_logits=False)
    assert 1 not in st.prefixes and 2 in st.prefixes
    # Past what evicting every prefix frees: refused, as before.
    with pytest.raises(StageError, match="KV cache full"):
        st.forward(SeqId(4), 0, mx.array(HISTORY[:12], dtype=mx.int32), None, want_logits=False)
    assert len(st.prefixes) == 0


# ---- caches that cannot be cut: a whole snapshot, used only whole ---------------------------


@pytest.fixture(scope="module", params=["mamba2", "gemma3_text", "granitemoehybrid"])
def uncuttable(request, tmp_path_factory) -> Path:
    from tests.families import make_family_model

    return make_family_model(tmp_path_factory.mktemp(request.param), request.param)


def test_a_stage_that_cannot_cut_its_caches_keeps_them_whole(uncuttable: Path) -> None:
    """An SSM state or a sliding window: kept only at the sequence's end, used only whole, each
    use a copy of its own (these caches write in place); the same chunks as a cold run give the
    same logits bit for bit."""
    stages = [Stage(uncuttable, 0, 1), Stage(uncuttable, 1, 2)]
    turn, more = HISTORY[:10], NEXT[CUT:]
    through(stages, SeqId(50), 0, turn, False)
    expected = through(stages, SeqId(50), len(turn), more, True)
    through(stages, SeqId(1), 0, turn, False)
    # (a hybrid's attention-only stage can cut its caches; the others cannot)
    assert not all([st.keep(SeqId(1), 7, CUT) for st in stages]), "kept a part of caches that cannot be cut"
    for st in stages:
        assert st.keep(SeqId(1), 7, len(turn))
        st.release([SeqId(1)])
    for seq in (SeqId(2), SeqId(3)):  # twice: the first use must leave the snapshot unchanged
        for st in stages:
            st.seed(seq, 7, len(turn))
        got = through(stages, seq, len(turn), more, True)
        assert mx.array_equal(got, expected).item(), f"sequence {seq}: logits differ"
    with pytest.raises(StageError, match="not held"):  # a part of it: refused (then asked whole)
        next(st for st in stages if st.prefixes._held[7].snapshot is not None).seed(SeqId(4), 7, CUT)
