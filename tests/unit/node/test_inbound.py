"""Node boundaries: what a Forward must mean for the model this node loaded, checked before mlx
(which does not bounds-check gathers) sees it; and the last stage never samples a padding id."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.tiny import make_tiny_model
from zmqinfer.node import inbound
from zmqinfer.node.sampling import SeqSampler, sample_batch, tokenizer_size
from zmqinfer.node.stage import Stage, StageError
from zmqinfer.protocol.codec import tokens_to_wire
from zmqinfer.protocol.wire import Chunk, Epoch, Forward, SamplingParams, SeqId, Tensor

VOCAB, HIDDEN = 256, 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", n_layers=2, hidden=HIDDEN, vocab=VOCAB)


@pytest.fixture(scope="module")
def first(tiny: Path) -> Stage:
    return Stage(tiny, 0, 1)


@pytest.fixture(scope="module")
def last(tiny: Path) -> Stage:
    return Stage(tiny, 1, 2)


def fwd(ids: list[int], hidden: Tensor | None = None, params: SamplingParams | None = None) -> Forward:
    return Forward(Epoch(1), 1, (Chunk(SeqId(1), 0, len(ids), False, params),), -1, tokens_to_wire(ids), hidden)


def rows(n: int, width: int = HIDDEN, dtype: str = "float32") -> Tensor:
    return Tensor(dtype, (n, width), np.zeros((n, width), np.float32).astype(
        np.uint16 if dtype == "bfloat16" else dtype).tobytes())


def test_the_stage_knows_its_model(first: Stage) -> None:
    assert (first.vocab_size, first.hidden_size, first.hidden_dtype) == (VOCAB, HIDDEN, "float32")


@pytest.mark.parametrize("ids", [[1, VOCAB], [1, -1], [(1 << 31) - 1]])
def test_token_ids_outside_the_vocabulary_never_reach_mlx(first: Stage, last: Stage, ids: list[int]) -> None:
    assert "outside the vocabulary" in (inbound.problem(fwd(ids), first) or "")
    assert "outside the vocabulary" in (inbound.problem(fwd(ids, rows(len(ids))), last) or "")


def test_logit_bias_ids_must_index_the_logits(last: Stage) -> None:
    params = SamplingParams(logit_bias=((VOCAB, 1.0),))
    assert "logit_bias" in (inbound.problem(fwd([1], rows(1), params), last) or "")


@pytest.mark.parametrize("hidden,fragment", [
    (None, "needs hidden states"),
    (rows(2, HIDDEN + 1), "x 65"),
    (rows(2, HIDDEN, "float16"), "float16"),
    (rows(2, HIDDEN, "bfloat16"), "bfloat16"),
])
def test_hidden_states_must_be_this_models(last: Stage, hidden: Tensor | None, fragment: str) -> None:
    assert fragment in (inbound.problem(fwd([1, 2], hidden), last) or "")


def test_the_first_stage_takes_no_hidden_states(first: Stage) -> None:
    assert "embeds" in (inbound.problem(fwd([1, 2], rows(2)), first) or "")


def test_good_forwards_pass(first: Stage, last: Stage) -> None:
    assert inbound.problem(fwd([0, VOCAB - 1]), first) is None
    assert inbound.problem(fwd([0, VOCAB - 1], rows(2)), last) is None
    assert inbound.problem(Forward(Epoch(1), 1, (), -1, tokens_to_wire([])), last) is None  # probe


def test_mlx_really_crashes_on_an_unchecked_id(tiny: Path) -> None:
    """Why inbound.py exists: the same out-of-range id straight into the stage kills the process."""
    code = (f"import mlx.core as mx; from zmqinfer.node.stage import Stage; s = Stage({str(tiny)!r}, 0, 1);"
            f" mx.eval(s.forward(1, 0, mx.array([{10 ** 6}], dtype=mx.int32), None, False))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode != 0


def test_a_model_wider_than_the_ring_is_refused(tiny: Path) -> None:
    with pytest.raises(StageError, match="exceeds the ring's limit"):
        Stage(tiny, 0, 1, max_hidden_size=HIDDEN - 1)


# ---- sampling never picks a padding id -----------------------------------------------------


PADDED = 200  # a tokenizer smaller than the embedding (as Qwen3's is)


def padded_logits(b: int) -> mx.array:
    logits = mx.zeros((b, VOCAB))
    return mx.where(mx.arange(VOCAB) == VOCAB - 3, mx.array(30.0), logits)  # a padding id wins


@pytest.mark.parametrize("params", [
    SamplingParams(),  # plain greedy (batched path)
    SamplingParams(top_logprobs=3),
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=1e-7, seed=1),  # below GREEDY_TEMPERATURE: greedy, no inf/NaN
    SamplingParams(temperature=0.5, seed=2, logit_bias=((VOCAB - 1, 100.0),)),
])
def test_padding_ids_are_never_sampled(params: SamplingParams) -> None:
    samplers = [SeqSampler(SeqId(i), params) for i in range(4)]
    for s in samplers:
        s.observe(mx.array([1, 2, 3]))
    for _ in range(5):
        for sample in sample_batch(samplers, padded_logits(4), PADDED):
            assert 0 <= sample.token < PADDED and np.isfinite(sample.logprob)
            assert all(t.token < PADDED for t in sample.top)
    # Without the mask the padding id is what greedy picks: the test above can fail.
    assert sample_batch(samplers[:1], padded_logits(1))[0].token in (VOCAB - 3, VOCAB - 1)


def test_tokenizer_size_of_the_embedded_model() -> None:
    from zmqinfer.model.resolve import resolve_model

    assert tokenizer_size(resolve_model(None)) == 49152
