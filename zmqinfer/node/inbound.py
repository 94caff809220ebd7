"""What a Forward must mean for *this* node's model, checked before mlx sees any of it.

wirecheck.py already knows the shapes agree with the chunks; only the node knows its model:
token ids must index its vocabulary (mlx does not bounds-check gathers: an id past the embedding
or the logits segfaults the process), hidden states must have its width and dtype, and no stage
but the first embeds (so only it may receive a Forward without hidden states).
"""

from __future__ import annotations

import numpy as np

from zmqinfer.node.worker import Slice
from zmqinfer.protocol.wire import Forward


def problem(fwd: Forward, stage: Slice) -> str | None:
    """Why this stage must not run `fwd`, or None. Costs one pass over the token ids."""
    n = fwd.tokens.shape[0]
    if n:
        ids = np.frombuffer(fwd.tokens.data, dtype=np.int32)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= stage.vocab_size:
            return f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {stage.vocab_size})"
    for c in fwd.chunks:
        bias = c.params.logit_bias if c.params is not None else ()
        if any(t >= stage.vocab_size for t, _ in bias):
            return f"sequence {c.seq}: a logit_bias token id is outside the vocabulary [0, {stage.vocab_size})"
    h = fwd.hidden
    if stage.is_first:
        return None if h is None else "the first stage embeds token ids: hidden states must not come"
    if n and h is None:
        return "a stage after the first needs hidden states"
    if h is not None and n and (h.shape[1] != stage.hidden_size or h.dtype != stage.hidden_dtype):
        return (f"hidden states are {h.dtype} x {h.shape[1]}, this model's are "
                f"{stage.hidden_dtype} x {stage.hidden_size}")
    return None
