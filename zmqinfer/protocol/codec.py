"""Messages <-> ZeroMQ frames: the only way in or out of wire.py's protocol.

`encode(msg)` writes the version frame, the msgpack header and the tensor payloads (not copied);
`decode(frames)` trusts nothing: msgpack with size limits (never pickle, never ext types), every
field type-checked against its dataclass annotation, unknown kinds and missing or extra fields
refused, every tensor frame exactly the length its header declares, ranks and dimensions
bounded before anything multiplies them. A `WireError` says what was wrong.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

import msgpack
import numpy as np

from zmqinfer.protocol.limits import MAX_DATA_FRAMES as MAX_FRAMES
from zmqinfer.protocol.limits import (
    MAX_ENTRIES,
    MAX_HEADER_BYTES,
    MAX_TENSOR_BYTES,
    MAX_TENSOR_RANK,
)
from zmqinfer.protocol.wire import (
    DTYPE_SIZES,
    MESSAGES,
    PROTOCOL_VERSION,
    Message,
    Tensor,
    WireError,
)

# ---- encoding --------------------------------------------------------------------------------


def tokens_to_wire(ids: list[int]) -> Tensor:
    """Token ids as int32, the one integer type every stage agrees on."""
    arr = np.asarray(ids, dtype=np.int32)
    return Tensor("int32", (len(ids),), arr.data)


def encode(msg: Message) -> list[bytes | Any]:
    """Frames for `msg`: version, header, then the tensor payloads (not copied)."""
    payloads: list[Any] = []
    header = {"kind": msg.KIND}
    header.update(_to_plain(msg, payloads))
    return [PROTOCOL_VERSION, msgpack.packb(header, use_bin_type=True), *payloads]


def _to_plain(obj: Any, payloads: list[Any]) -> Any:
    if isinstance(obj, Tensor):
        payloads.append(obj.data)
        return [obj.dtype, list(obj.shape)]
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name), payloads) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v, payloads) for v in obj]
    return obj


# ---- decoding --------------------------------------------------------------------------------


def decode(frames: list[Any]) -> Message:
    """The message in `frames` (bytes or zmq.Frame), or WireError saying what is wrong."""
    if not 2 <= len(frames) <= MAX_FRAMES:
        raise WireError(f"expected 2 to {MAX_FRAMES} frames, got {len(frames)}")
    version = bytes(frames[0])
    if version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version[:32]!r}, expected {PROTOCOL_VERSION!r}")
    raw = memoryview(frames[1])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {raw.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_HEADER_BYTES, max_bin_len=0, max_ext_len=0,
            max_array_len=MAX_ENTRIES * 8, max_map_len=64,
        )
    except (ValueError, msgpack.UnpackException) as e:
        raise WireError(f"bad msgpack header: {e}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    kind = header.pop("kind", None)
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"unknown message kind {_short(kind)}")
    payloads = [memoryview(f) if not isinstance(f, memoryview) else f for f in frames[2:]]
    reader = _TensorReader(payloads)
    msg = _from_plain(cls, header, reader, kind)
    if reader.left:
        raise WireError(f"{kind}: {reader.left} tensor frame(s) more than the header declares")
    return msg


def _short(value: Any) -> str:
    """A peer's value for an error message: never long, never a huge int's digits (Python
    refuses to format ints of over 4,300 digits, and a log line is no place for a megabyte)."""
    if isinstance(value, int) and not -(1 << 64) < value < 1 << 64:
        return "<an integer out of range>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _TensorReader:
    def __init__(self, payloads: list[memoryview]) -> None:
        self._payloads = payloads
        self._next = 0

    @property
    def left(self) -> int:
        return len(self._payloads) - self._next

    def take(self, spec: Any, where: str) -> Tensor:
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
                and isinstance(spec[1], list)):
            raise WireError(f"{where}: tensor spec must be [dtype, [dims...]]")
        dtype, dims = spec
        # Rank and every dim are bounded before anything multiplies them: a product of 300 dims
        # of 2**64 takes a second to compute and cannot even be formatted.
        if len(dims) > MAX_TENSOR_RANK:
            raise WireError(f"{where}: rank {len(dims)} exceeds {MAX_TENSOR_RANK}")
        if not all(type(d) is int and 0 <= d <= MAX_TENSOR_BYTES for d in dims):
            raise WireError(f"{where}: every dimension must be an integer in [0, {MAX_TENSOR_BYTES}]")
        if dtype not in DTYPE_SIZES:
            raise WireError(f"{where}: unsupported dtype {_short(dtype)}")
        shape = tuple(dims)
        if self._next >= len(self._payloads):
            raise WireError(f"{where}: tensor frame missing")
        data = self._payloads[self._next]
        self._next += 1
        t = Tensor(dtype, shape, data)
        if t.nbytes > MAX_TENSOR_BYTES or data.nbytes != t.nbytes:  # bounded: safe to format
            raise WireError(f"{where}: frame has {data.nbytes} bytes, header says {dtype}{list(shape)}"
                            f" = {t.nbytes} (limit {MAX_TENSOR_BYTES})")
        return t


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _from_plain(tp: Any, value: Any, reader: _TensorReader, where: str) -> Any:
    """Check `value` against the annotation `tp` and build it. Type-driven so that a new message
    needs no decoding code of its own."""
    tp = getattr(tp, "__supertype__", tp)  # NewType -> its base
    origin = typing.get_origin(tp)
    if tp is Tensor:
        return reader.take(value, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected a map for {tp.__name__}")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = set(value) - set(fields)
        if unknown:
            raise WireError(f"{where}: unknown field(s) {_short(sorted(map(repr, unknown)))}")
        hints = _hints(tp)
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _from_plain(hints[name], value[name], reader, f"{where}.{name}")
            elif f.default is dataclasses.MISSING:
                raise WireError(f"{where}: missing field {name!r}")
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise WireError(f"{where}: must not be null")
        inner = [a for a in args if a is not type(None)]
        return _from_plain(inner[0], value, reader, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise WireError(f"{where}: expected an array")
        if len(args) == 2 and args[1] is Ellipsis:
            if len(value) > MAX_ENTRIES:
                raise WireError(f"{where}: {len(value)} items exceed {MAX_ENTRIES}")
            return tuple(_from_plain(args[0], v, reader, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise WireError(f"{where}: expected {len(args)} items")
        return tuple(_from_plain(a, v, reader, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise WireError(f"{where}: {_short(value)} not one of {typing.get_args(tp)}")
        return value
    if tp is float:
        if type(value) not in (float, int):
            raise WireError(f"{where}: expected a number")
        return float(value)
    if tp in (int, str, bool):
        if type(value) is not tp:  # bool is an int subclass: insist on the exact type
            raise WireError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise WireError(f"{where}: cannot decode type {tp}")  # a protocol bug, not a peer's

