"""Speculation on the node (issue 23): a verify forward of drafted tokens, the rollback of the
rejected ones, and the last stage's judgement, against plain one-token decoding of the unsplit
mlx-lm model."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from tests.families import make_family_model
from tests.tiny import FAMILIES, make_tiny_model
from zmqinfer.node.drafts import judge
from zmqinfer.node.sampling import SeqSampler
from zmqinfer.node.stage import Stage, StageError
from zmqinfer.protocol.wire import SamplingParams, SeqId

N_LAYERS = 4
PROMPT = [3, 17, 250, 9, 41, 77, 5, 128, 64, 2, 199]
STEPS = 24


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(request.param), request.param, n_layers=N_LAYERS)


def plain_greedy(path: Path, prompt: list[int], steps: int) -> tuple[list[int], list[mx.array]]:
    """What one-token-at-a-time greedy decoding of the unsplit model gives (mlx-lm's way)."""
    model, _ = load_model(path)
    cache = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    y, tokens, logits = prompt[-1], [], []
    for _ in range(steps):
        out = model(mx.array([[y]]), cache=cache)[:, -1, :]
        logits.append(out[0])
        y = int(mx.argmax(out, axis=-1).item())
        tokens.append(y)
    return tokens, logits


def through(stages: list[Stage], seq: SeqId, start: int, trim: int, ids: list[int]) -> mx.array:
    h = None
    for st in stages:
        h = st.verify(seq, start, trim, mx.array(ids, dtype=mx.int32), h)
    assert h is not None
    return h


def prefill(stages: list[Stage], seq: SeqId, prompt: list[int]) -> None:
    h = None
    for st in stages:
        h = st.forward(seq, 0, mx.array(prompt[:-1], dtype=mx.int32), h, want_logits=False)


def close(a: mx.array, b: mx.array) -> bool:
    return mx.max(mx.abs(a - b)).item() <= 1e-4 * max(1.0, mx.max(mx.abs(b)).item())


def test_drafts_judged_and_rolled_back_give_plain_greedy(tiny: Path) -> None:
    """Drafts right, wrong and partly right, each verify dropping the last one's rejected
    positions: the tokens and every emitted position's logits are plain greedy decoding's."""
    ref, ref_logits = plain_greedy(tiny, PROMPT, STEPS + 8)  # a last verify may run past STEPS
    assert len(set(ref)) > 3, "degenerate reference: the test would prove little"
    stages = [Stage(tiny, 0, 2), Stage(tiny, 2, N_LAYERS)]
    assert all(st.rollback for st in stages)
    sampler = SeqSampler(SeqId(1), SamplingParams())
    prefill(stages, SeqId(1), PROMPT)
    out: list[int] = []
    pos, y, trim, step = len(PROMPT) - 1, PROMPT[-1], 0, 0
    accepted_some = rejected_some = False
    while len(out) < STEPS:
        k = 1 + step % 4
        drafts = list(ref[len(out): len(out) + k])
        if step % 3 == 1 and drafts:  # a wrong draft somewhere: everything after it is rejected
            drafts[step % len(drafts)] = (drafts[step % len(drafts)] + 1) % 256
        logits = through(stages, SeqId(1), pos, trim, [y, *drafts])
        got = judge(sampler, logits, drafts)
        for i, s in enumerate(got):
            assert close(logits[i], ref_logits[len(out) + i]), f"position {len(out) + i}"
        tokens = [s.token for s in got]
        accepted_some |= len(tokens) > 1
        rejected_some |= len(tokens) < len(drafts) + 1
        out += tokens
        trim = len(drafts) + 1 - len(tokens)
        pos, y, step = pos + len(tokens), tokens[-1], step + 1
    assert out == ref[:len(out)] and len(out) >= STEPS
    assert accepted_some and rejected_some
    assert stages[0]._caches[SeqId(1)].offset == pos + trim  # rejected positions wait for the next trim


def test_a_verify_leaves_its_group_and_a_plain_step_rejoins(tiny: Path) -> None:
    """A sequence decoding in a group speculates (taken out with its caches), its group-mate
    decodes on without it, and it rejoins on its next plain step: both decode as alone."""
    prompts = {1: PROMPT, 2: [12, 6, 3, 90, 44]}
    refs = {s: plain_greedy(tiny, p, 12)[0] for s, p in prompts.items()}
    stages = [Stage(tiny, 0, 2), Stage(tiny, 2, N_LAYERS)]
    sampler = SeqSampler(SeqId(1), SamplingParams())
    state = {}
    for s, p in prompts.items():
        prefill(stages, SeqId(s), p)
        state[s] = (p[-1], len(p) - 1)
    out: dict[int, list[int]] = {1: [], 2: []}

    def group_step(members: list[int]) -> None:
        h = None
        for st in stages:
            h = st.decode(0, [SeqId(s) for s in members], [state[s][1] for s in members],
                          mx.array([state[s][0] for s in members], dtype=mx.int32), h)
        assert h is not None
        for j, s in enumerate(members):
            t = int(mx.argmax(h[j]).item())
            out[s].append(t)
            state[s] = (t, state[s][1] + 1)

    group_step([1, 2])
    group_step([1, 2])
    drafts = [refs[1][2], refs[1][3], (refs[1][4] + 1) % 256]  # two right, one wrong
    y, pos = state[1]
    got = [s.token for s in judge(sampler, through(stages, SeqId(1), pos, 0, [y, *drafts]), drafts)]
    assert len(got) == 3
    out[1] += got
    state[1] = (got[-1], pos + 3)
    group_step([2])  # its group-mate goes on without it
    y, pos = state[1]  # its next step drops the rejected draft (a one-token verify)...
    got = [s.token for s in judge(sampler, through(stages, SeqId(1), pos, 1, [y]), [])]
    out[1] += got
    state[1] = (got[-1], pos + 1)
    group_step([1, 2])  # ...and the one after rejoins the group
    group_step([1, 2])
    assert len(out[1]) == 8 and len(out[2]) == 5
    assert out[1] == refs[1][:len(out[1])] and out[2] == refs[2][:len(out[2])]
    assert stages[1]._groups[0].order == [SeqId(1), SeqId(2)] and not stages[1]._caches


def test_a_plain_step_after_a_verify_must_trim_first(tiny: Path) -> None:
    stages = [Stage(tiny, 0, 2), Stage(tiny, 2, N_LAYERS)]
    prefill(stages, SeqId(1), PROMPT)
    pos = len(PROMPT) - 1
    through(stages, SeqId(1), pos, 0, [PROMPT[-1], 5, 6, 7])  # say one draft was accepted: 2 emitted
    with pytest.raises(StageError, match="cache holds"):
        stages[0].decode(0, [SeqId(1)], [pos + 2], mx.array([9], dtype=mx.int32), None)
    with pytest.raises(StageError, match="cache holds"):  # a trim that does not add up is caught
        stages[0].verify(SeqId(1), pos + 2, 1, mx.array([9], dtype=mx.int32), None)
    h = stages[0].verify(SeqId(1), pos + 2, 2, mx.array([9], dtype=mx.int32), None)
    assert h.shape == (1, stages[0].hidden_size) and stages[0]._caches[SeqId(1)].offset == pos + 3


@pytest.mark.parametrize("family", ["mamba", "gemma3_text"])
def test_caches_that_cannot_roll_back_take_no_drafts(family: str, tmp_path: Path) -> None:
    """An SSM state has no trim; a sliding window loses positions once it wraps."""
    path = make_family_model(tmp_path / family, family)
    st = Stage(path, 0, 1)
    assert not st.rollback
    with pytest.raises(StageError, match="cannot roll back"):
        st.verify(SeqId(1), 0, 0, mx.array([1, 2], dtype=mx.int32), None)


# ---- the last stage's judgement ---------------------------------------------------------------


def test_greedy_judgement_takes_the_agreeing_prefix_and_one_more() -> None:
    sampler = SeqSampler(SeqId(3), SamplingParams())
    picks = [4, 2, 7, 1]  # each row's argmax
    logits = mx.array([[5.0 if i == p else 0.0 for i in range(8)] for p in picks])
    assert [s.token for s in judge(sampler, logits, [4, 2, 7])] == [4, 2, 7, 1]  # all, and the bonus
    assert [s.token for s in judge(sampler, logits, [4, 3, 7])] == [4, 2]  # stops at the first miss
    assert [s.token for s in judge(sampler, logits, [0, 2, 7])] == [4]
    got = judge(sampler, logits[:1], [])
    assert [s.token for s in got] == [4] and got[0].seq == 3
    assert math.isclose(got[0].logprob, 5.0 - math.log(math.exp(5.0) + 7), rel_tol=1e-5)
    assert [s.token for s in judge(sampler, logits, [4, 2, 7], vocab=7)] == [4, 2, 0]  # never an id >= vocab


P0 = [0.5, 0.3, 0.15, 0.05]  # position 0's next-token distribution
P1 = [0.1, 0.2, 0.3, 0.4]  # after the draft
TRIALS = 4000


def chi_square_p(counts: Counter[int], probs: list[float], n: int) -> float:
    """Upper tail of Pearson's statistic with len(probs) - 1 = 3 degrees of freedom."""
    stat = sum((counts[i] - n * p) ** 2 / (n * p) for i, p in enumerate(probs))
    return math.erfc(math.sqrt(stat / 2)) + math.sqrt(2 * stat / math.pi) * math.exp(-stat / 2)


@pytest.mark.parametrize("draft", [0, 3])  # a likely draft and an unlikely one
def test_rejection_sampling_keeps_the_distribution(draft: int) -> None:
    """Sampled with a drafted token, the first emitted token follows p0 whatever the draft, and
    the token after an accepted draft follows p1: the distribution of plain sampling."""
    sampler = SeqSampler(SeqId(1), SamplingParams(temperature=1.0, seed=7))
    logits = mx.log(mx.array([P0, P1]))
    first: Counter[int] = Counter()
    second: Counter[int] = Counter()
    for _ in range(TRIALS):
        got = [s.token for s in judge(sampler, logits, [draft])]
        first[got[0]] += 1
        if got[0] == draft:
            assert len(got) == 2  # accepted: the bonus token follows
            second[got[1]] += 1
        else:
            assert len(got) == 1
    assert chi_square_p(first, P0, TRIALS) > 1e-3, first
    assert first[draft] / TRIALS == pytest.approx(P0[draft], abs=0.04)  # accepted with p0(d)
    assert chi_square_p(second, P1, sum(second.values())) > 1e-3, second


def test_rejection_sampling_respects_top_k() -> None:
    """A draft outside the request's top_k is always rejected; the draw stays inside it."""
    sampler = SeqSampler(SeqId(1), SamplingParams(temperature=1.0, top_k=2, seed=1))
    logits = mx.log(mx.array([P0, P1]))
    seen = Counter(judge(sampler, logits, [3])[0].token for _ in range(300))
    assert set(seen) <= {0, 1} and seen[0] > seen[1]
