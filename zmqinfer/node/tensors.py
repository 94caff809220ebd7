"""mx.array <-> wire.Tensor: dtype, shape and a buffer, without copying on the way out.

numpy has no bfloat16, so bf16 travels as its uint16 bit pattern and is viewed back on arrival;
no value is ever converted, which keeps the ring's arithmetic identical to a single process.
Only the mlx thread may call these (mlx streams belong to the thread that made them).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from zmqinfer.protocol.wire import Tensor

_VIEW_AS_UINT16 = {"bfloat16"}  # dtypes numpy cannot hold: ship their bits


def to_wire(a: mx.array) -> Tensor:
    """A Tensor whose data is a view of `a`'s memory (evaluates `a`)."""
    name = str(a.dtype).removeprefix("mlx.core.")
    bits = a.view(mx.uint16) if name in _VIEW_AS_UINT16 else a
    if a.size == 0:  # a probe's empty batch: memoryview cannot flatten a zero-sized shape
        return Tensor(name, tuple(a.shape), b"")
    mx.eval(bits)
    view = memoryview(bits)  # type: ignore[arg-type]  # mx.array has the buffer protocol; its stub does not say so
    if not view.c_contiguous:  # a transposed or sliced view: frames must be one flat buffer
        bits = mx.contiguous(bits)
        mx.eval(bits)
        view = memoryview(bits)  # type: ignore[arg-type]
    return Tensor(name, tuple(a.shape), view.cast("B"))


def from_wire(t: Tensor) -> mx.array:
    """An mx.array holding `t`'s values (one copy: mlx owns its memory)."""
    if t.dtype in _VIEW_AS_UINT16:
        raw = np.frombuffer(t.data, dtype=np.uint16).reshape(t.shape)
        return mx.array(raw).view(getattr(mx, t.dtype))
    return mx.array(np.frombuffer(t.data, dtype=np.dtype(t.dtype)).reshape(t.shape))
