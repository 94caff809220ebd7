"""Real clusters on 127.0.0.1: `zmqinfer up` as a subprocess, the embedded model, real sockets.

`cluster` is one 3-node ring shared by the whole session (starting one costs seconds); tests
that break a ring start their own with `local.start`. `reference` is single-process mlx-lm
greedy generation of the same model: what the ring must reproduce token for token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from zmqinfer import local
from zmqinfer.local import LocalCluster


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from zmqinfer.model.resolve import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = local.start(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        local.stop(c)


class Reference:
    """Single-process mlx-lm greedy generation: the ground truth for token-exactness."""

    def __init__(self, model_dir: Path) -> None:
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_dir))

    def chat_ids(self, content: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                 add_generation_prompt=True)
        return list(ids)

    def greedy(self, prompt: list[int], max_tokens: int, prefill_step_size: int = 2048) -> list[int]:
        return self.greedy_with_margins(prompt, max_tokens, prefill_step_size)[0]

    def greedy_with_margins(self, prompt: list[int], max_tokens: int,
                            prefill_step_size: int = 2048) -> tuple[list[int], list[float]]:
        """Greedy tokens, and at each step the logprob gap between the best and second-best
        token: a near-zero gap is a near-tie that float rounding could flip."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        out, gaps = [], []
        for tok, logprobs in generate_step(mx.array(prompt), self.model, max_tokens=max_tokens,
                                           prefill_step_size=prefill_step_size):
            out.append(int(tok))
            top2 = mx.sort(logprobs)[-2:].tolist()
            gaps.append(top2[1] - top2[0])
            if out[-1] in self.tokenizer.eos_token_ids:
                break
        return out, gaps

    def text(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.tokenizer.eos_token_ids]
        return self.tokenizer.decode(ids)


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)
