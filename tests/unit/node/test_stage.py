"""Split equivalence: a model cut into stages computes exactly what the unsplit mlx-lm model does."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from tests.tiny import FAMILIES, make_tiny_model
from zmqinfer.node.stage import Stage, StageError
from zmqinfer.protocol.wire import SeqId

N_LAYERS = 4
DECODE_STEPS = 16
PROMPT = [3, 17, 250, 9, 41, 77, 5, 128, 64, 2, 199]


@pytest.fixture(scope="module", params=[(f, tied) for f in FAMILIES for tied in (False, True)],
                ids=lambda p: f"{p[0]}{'-tied' if p[1] else ''}")
def tiny(request, tmp_path_factory) -> Path:
    family, tied = request.param
    return make_tiny_model(tmp_path_factory.mktemp(family), family, n_layers=N_LAYERS, tied=tied)


def reference(path: Path) -> tuple[list[int], list[mx.array]]:
    """Greedy tokens and logits of the unsplit model, prefilling as mlx-lm's generate_step does
    (all but the last prompt token, then the last one alone)."""
    model, _ = load_model(path)
    cache = make_prompt_cache(model)
    model(mx.array(PROMPT[:-1])[None], cache=cache)
    y = mx.array(PROMPT[-1:])
    tokens, logits = [], []
    for _ in range(DECODE_STEPS + 1):
        out = model(y[None], cache=cache)[:, -1, :]
        logits.append(out)
        tokens.append(int(mx.argmax(out, axis=-1).item()))
        y = mx.array(tokens[-1:])
    return tokens, logits


def run_split(stages: list[Stage], seq: SeqId) -> tuple[list[int], list[mx.array]]:
    def through(start: int, ids: list[int], want: bool) -> mx.array:
        toks = mx.array(ids, dtype=mx.int32)
        h = None
        for st in stages:
            h = st.forward(seq, start, toks, h, want_logits=want)
        return h

    through(0, PROMPT[:-1], False)
    pos, y = len(PROMPT) - 1, PROMPT[-1]
    tokens, logits = [], []
    for _ in range(DECODE_STEPS + 1):
        out = through(pos, [y], True)
        pos += 1
        logits.append(out)
        tokens.append(int(mx.argmax(out, axis=-1).item()))
        y = tokens[-1]
    return tokens, logits


def cuts(n_stages: int) -> list[list[int]]:
    """Every way to cut N_LAYERS into n_stages non-empty contiguous ranges."""
    return [[0, *c, N_LAYERS] for c in itertools.combinations(range(1, N_LAYERS), n_stages - 1)]


@pytest.mark.parametrize("n_stages", [2, 3])
def test_every_cut_equals_unsplit(tiny: Path, n_stages: int) -> None:
    ref_tokens, ref_logits = reference(tiny)
    assert len(set(ref_tokens)) > 1, "degenerate reference: the test would prove little"
    for bounds in cuts(n_stages):
        stages = [Stage(tiny, a, b) for a, b in zip(bounds, bounds[1:])]
        tokens, logits = run_split(stages, SeqId(1))
        assert tokens == ref_tokens, f"cut {bounds}"
        for i, (a, b) in enumerate(zip(logits, ref_logits)):
            assert mx.array_equal(a, b).item(), f"cut {bounds}: logits differ at step {i}"


def held_parts(stage: Stage) -> dict[str, Any]:
    """Which of the model's parts a stage's parameters include (what it evaluated, i.e. read)."""
    names = [n for n, _ in tree_flatten(stage._driver.model.parameters())]
    return {"layers": {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")},
            "embed": any("embed_tokens" in n for n in names),
            "norm": any(n.startswith("model.norm.") for n in names),
            "head": any(n.startswith("lm_head.") for n in names)}


def test_stages_hold_only_their_layers(tiny: Path) -> None:
    whole = Stage(tiny, 0, N_LAYERS)
    parts = [Stage(tiny, 0, 1), Stage(tiny, 1, 3), Stage(tiny, 3, N_LAYERS)]
    held = [held_parts(p) for p in parts]
    assert [h["layers"] for h in held] == [{0}, {1, 2}, {3}]
    assert held[0]["embed"] and not held[0]["norm"] and not held[0]["head"]
    assert not held[1]["embed"] and not held[1]["norm"] and not held[1]["head"]
    assert held[2]["norm"] and held[2]["head"] == (not held[2]["embed"])  # tied: the embedding is the head
    # The middle stage is pure layers: strictly smaller than its share of the whole.
    assert sum(p.shard_bytes for p in parts) >= whole.shard_bytes
    assert parts[1].shard_bytes < whole.shard_bytes / 2


def test_sequences_are_isolated_and_positions_checked(tiny: Path) -> None:
    stage = Stage(tiny, 0, N_LAYERS)
    a, b = SeqId(1), SeqId(2)
    toks = mx.array([1, 2, 3], dtype=mx.int32)
    first = stage.forward(a, 0, toks, None, True)
    stage.forward(b, 0, mx.array([9, 9], dtype=mx.int32), None, True)
    again = stage.forward(SeqId(3), 0, toks, None, True)
    assert mx.array_equal(first, again).item(), "another sequence's cache leaked into this one"
    with pytest.raises(StageError, match="position 5"):
        stage.forward(a, 5, toks, None, True)
    with pytest.raises(StageError, match="no cache"):
        stage.forward(SeqId(4), 3, toks, None, True)
    stage.release([a, b])
    assert stage.sequences == 1


def test_bad_layer_range_is_refused(tiny: Path) -> None:
    with pytest.raises(StageError, match="outside"):
        Stage(tiny, 2, N_LAYERS + 1)


PROMPTS = [PROMPT, [7, 7, 3], [200, 100, 50, 25, 12, 6, 3, 1], [42]]


def test_batched_decode_groups_equal_solo_decoding(tiny: Path) -> None:
    """Sequences of different lengths decoded as one group (joining at different steps, one
    leaving early) give the logits each gets decoded alone on the unsplit model."""
    model, _ = load_model(tiny)

    def solo(prompt: list[int], steps: int) -> list[mx.array]:
        cache = make_prompt_cache(model)
        if len(prompt) > 1:
            model(mx.array(prompt[:-1])[None], cache=cache)
        y, out = prompt[-1], []
        for _ in range(steps):
            logits = model(mx.array([[y]]), cache=cache)[:, -1, :]
            out.append(logits)
            y = int(mx.argmax(logits, axis=-1).item())
        return out

    ref = {i: solo(p, 10) for i, p in enumerate(PROMPTS)}
    stages = [Stage(tiny, 0, 2), Stage(tiny, 2, N_LAYERS)]
    state = {}  # seq -> (next token, position)
    got: dict[int, list[mx.array]] = {i: [] for i in range(len(PROMPTS))}

    def prefill(i: int) -> None:
        p = PROMPTS[i]
        if len(p) > 1:
            h = None
            for st in stages:
                h = st.forward(SeqId(i), 0, mx.array(p[:-1], dtype=mx.int32), h, want_logits=False)
        state[i] = (p[-1], len(p) - 1)

    def step(members: list[int]) -> None:
        toks = mx.array([state[i][0] for i in members], dtype=mx.int32)
        h = None
        for st in stages:
            h = st.decode(7, [SeqId(i) for i in members], [state[i][1] for i in members], toks, h)
        for j, i in enumerate(members):
            got[i].append(h[j:j + 1])
            state[i] = (int(mx.argmax(h[j]).item()), state[i][1] + 1)

    prefill(0)
    prefill(1)
    for _ in range(3):
        step([0, 1])
    prefill(2)
    prefill(3)
    for _ in range(7):
        step([0, 1, 2, 3])
    for st in stages:
        st.release([SeqId(1)])  # sequence 1 leaves mid-way
    for _ in range(3):
        step([2, 0, 3])  # and the order may change
    # Batching changes the matmul shapes, and a BLAS may then sum in another order (OpenBLAS
    # does; mlx's bundled reference BLAS does not), so logits agree to float rounding, not bit
    # for bit, and greedy tokens agree unless two candidates are within that rounding.
    for i, logits in got.items():
        n = len(logits)
        assert n >= 7
        for k, (a, b) in enumerate(zip(logits, ref[i][:n])):
            diff = mx.max(mx.abs(a - b)).item()
            assert diff <= 1e-4 * max(1.0, mx.max(mx.abs(b)).item()), f"sequence {i} step {k}: {diff}"
            top2 = mx.sort(b[0])[-2:].tolist()
            if top2[1] - top2[0] > 10 * diff:  # not a near-tie: the pick must not move
                assert mx.argmax(a).item() == mx.argmax(b).item(), f"sequence {i} step {k}"
    assert stages[0].sequences == 3


def test_decode_position_mismatch_is_refused(tiny: Path) -> None:
    st = Stage(tiny, 0, N_LAYERS)
    st.forward(SeqId(1), 0, mx.array([1, 2, 3], dtype=mx.int32), None, want_logits=False)
    with pytest.raises(StageError, match="position 5"):
        st.decode(0, [SeqId(1)], [5], mx.array([4], dtype=mx.int32), None)


def test_batched_prefill_equals_prefilling_each_alone(tiny: Path) -> None:
    """The first chunks of prompts of different lengths prefilled as one left-padded batch leave
    each sequence the cache (and the next stage the hidden states) it gets prefilled alone: the
    logits of every decode step after it agree to float rounding, and greedy picks do not move."""
    solo_stages = [Stage(tiny, 0, 2), Stage(tiny, 2, N_LAYERS)]
    batch_stages = [Stage(tiny, 0, 2), Stage(tiny, 2, N_LAYERS)]
    heads = [p[:-1] for p in PROMPTS if len(p) > 1]
    seqs = [SeqId(i) for i in range(len(heads))]
    for seq, head in zip(seqs, heads):
        h = None
        for st in solo_stages:
            h = st.forward(seq, 0, mx.array(head, dtype=mx.int32), h, want_logits=False)
    hs: list[mx.array] | None = None
    for k, st in enumerate(batch_stages):
        out = st.prefill_batch(seqs, [mx.array(x, dtype=mx.int32) for x in heads], hs)
        if k == 0:
            assert [o.shape for o in out] == [(len(x), st.hidden_size) for x in heads]
        hs = out
    assert batch_stages[0].sequences == len(seqs)
    assert batch_stages[0].kv_tokens() == sum(len(x) for x in heads)  # no padding left in caches

    def decode(stages: list[Stage], steps: int) -> list[mx.array]:
        toks = [p[-1] for p in PROMPTS if len(p) > 1]
        pos = [len(x) for x in heads]
        out = []
        for _ in range(steps):
            h = None
            for st in stages:
                h = st.decode(0, seqs, pos, mx.array(toks, dtype=mx.int32), h)
            out.append(h)
            toks = mx.argmax(h, axis=-1).tolist()
            pos = [p + 1 for p in pos]
        return out

    for k, (a, b) in enumerate(zip(decode(batch_stages, 6), decode(solo_stages, 6))):
        diff = mx.max(mx.abs(a - b)).item()
        assert diff <= 1e-4 * max(1.0, mx.max(mx.abs(b)).item()), f"step {k}: {diff}"
        assert mx.argmax(a, axis=-1).tolist() == mx.argmax(b, axis=-1).tolist(), f"step {k}"


def test_batched_prefill_continues_sequences_and_prefix_starts_as_each_alone(tiny: Path) -> None:
    """Chunks past position 0 batch beside a new sequence's first chunk: a prompt's later
    chunk (its own cache merged in, left-padded) and one seeded from a cached prefix. Each
    sequence is left the cache it gets prefilled alone: its decode logits agree to float
    rounding and its greedy picks do not move."""
    long, other, fresh = PROMPT + [9, 8, 7], [200, 100, 50, 25, 12, 6, 3, 1, 5, 4], [7, 7, 3, 11]
    solo = [Stage(tiny, 0, 2), Stage(tiny, 2, N_LAYERS)]
    batch = [Stage(tiny, 0, 2), Stage(tiny, 2, N_LAYERS)]

    def run(stages: list[Stage], seq: SeqId, start: int, ids: list[int]) -> None:
        h = None
        for st in stages:
            h = st.forward(seq, start, mx.array(ids, dtype=mx.int32), h, want_logits=False)

    # alone: each prompt but its last token, in the same cuts
    run(solo, SeqId(1), 0, long[:5])
    run(solo, SeqId(1), 5, long[5:-1])
    run(solo, SeqId(2), 0, other[:-1])
    run(solo, SeqId(3), 0, fresh[:-1])
    # batched: sequence 1's first 5 tokens, and a finished sequence 9 of `other`'s first 6 kept
    # as prefix 70, from which sequence 2 starts; then one batch of three chunks at 5, 6 and 0
    run(batch, SeqId(1), 0, long[:5])
    run(batch, SeqId(9), 0, other[:6])
    for st in batch:
        assert st.keep(SeqId(9), 70, 6)
        st.release([SeqId(9)])
        st.seed(SeqId(2), 70, 6)
    seqs, starts = [SeqId(1), SeqId(2), SeqId(3)], [5, 6, 0]
    chunks = [long[5:-1], other[6:-1], fresh[:-1]]
    hs: list[mx.array] | None = None
    for st in batch:
        hs = st.prefill_batch(seqs, [mx.array(c, dtype=mx.int32) for c in chunks], hs, starts)
    assert batch[0].kv_tokens() - batch[0].prefixes.tokens() == sum(len(p) - 1 for p in (long, other, fresh))

    def decode(stages: list[Stage]) -> list[mx.array]:
        toks, pos, out = [long[-1], other[-1], fresh[-1]], [len(long) - 1, len(other) - 1, len(fresh) - 1], []
        for _ in range(5):
            h = None
            for st in stages:
                h = st.decode(0, seqs, pos, mx.array(toks, dtype=mx.int32), h)
            out.append(h)
            toks, pos = mx.argmax(h, axis=-1).tolist(), [p + 1 for p in pos]
        return out

    for k, (a, b) in enumerate(zip(decode(batch), decode(solo))):
        diff = mx.max(mx.abs(a - b)).item()
        assert diff <= 1e-4 * max(1.0, mx.max(mx.abs(b)).item()), f"step {k}: {diff}"
        assert mx.argmax(a, axis=-1).tolist() == mx.argmax(b, axis=-1).tolist(), f"step {k}"


def test_batched_prefill_refuses_a_chunk_its_cache_does_not_end_at(tiny: Path) -> None:
    st = Stage(tiny, 0, N_LAYERS)
    st.forward(SeqId(1), 0, mx.array([1, 2, 3], dtype=mx.int32), None, want_logits=False)
    one = [mx.array([4], dtype=mx.int32)] * 2
    with pytest.raises(StageError, match="position 2, cache holds 3"):
        st.prefill_batch([SeqId(1), SeqId(2)], one, None, [2, 0])
    with pytest.raises(StageError, match="position 4, cache holds nothing"):
        st.prefill_batch([SeqId(1), SeqId(2)], one, None, [3, 4])
    assert st.seq_ids == (SeqId(1),) and st.kv_tokens() == 3  # nothing of a refused batch ran


def test_batched_prefill_refuses_a_sequence_it_already_holds(tiny: Path) -> None:
    st = Stage(tiny, 0, N_LAYERS)
    st.forward(SeqId(1), 0, mx.array([1, 2, 3], dtype=mx.int32), None, want_logits=False)
    with pytest.raises(StageError, match="already holds"):
        st.prefill_batch([SeqId(2), SeqId(1)], [mx.array([4], dtype=mx.int32)] * 2, None)
    with pytest.raises(StageError, match="twice"):
        st.prefill_batch([SeqId(3), SeqId(3)], [mx.array([4], dtype=mx.int32)] * 2, None)
    with pytest.raises(StageError, match="missing"):
        st.prefill_batch([SeqId(4), SeqId(5)], [mx.array([4], dtype=mx.int32)], None)
    assert st.seq_ids == (SeqId(1),)  # nothing of a refused batch was kept
