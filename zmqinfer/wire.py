"""THE protocol between the gateway and the nodes.

Every message is a list of ZeroMQ frames (zguide's "Cheap or Nasty" framing):

    frame 0   PROTOCOL_VERSION, compared byte for byte (a mismatch is refused, never guessed at)
    frame 1   msgpack map: {"kind": <message kind>, <field>: <value>, ...}
    frame 2.. raw tensor bytes, one frame per `Tensor` field that is not None, in field order;
              the header holds each one's dtype and shape, so the bytes are never copied or parsed

Messages are frozen dataclasses; `encode(msg) -> frames` and `decode(frames) -> msg` are the only
way in or out. `decode` trusts nothing: msgpack runs with size limits (never pickle, never ext
types), every field is type-checked against the dataclass annotation, unknown kinds and missing
or extra fields are refused, and every tensor frame must have exactly the byte length its header
declares; ranks and dimensions are bounded before anything multiplies them. What the fields
*mean* (ranges, lengths that must agree) is wirecheck.py's, and receive loops go through
inbox.py, which does both. A `WireError` says what was wrong; the message is dropped.

Data plane (PUSH/PULL along the ring, DEALER -> ROUTER back to the gateway):
    Forward   tokens (+ hidden states after stage 0) for one micro-batch of sequence chunks
    Release   free these sequences' KV caches (travels the ring in order behind their last Forward)
    Sampled   the last stage's sampled tokens and logprobs, one per sampled chunk
    StepFailed  a stage could not run a Forward (sent on the control plane so it never queues)
Control plane (node DEALER, routing id = node id  <->  gateway ROUTER):
    Heartbeat (doubles as READY), Assign, Loaded, Ping, Pong, Bye
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NewType, Union

import msgpack

from zmqinfer.limits import MAX_DATA_FRAMES as MAX_FRAMES
from zmqinfer.limits import (
    MAX_ENTRIES,
    MAX_HEADER_BYTES,
    MAX_TENSOR_BYTES,
    MAX_TENSOR_RANK,
)

# What the version covers: frame layout, every message kind and its fields (a field added or
# removed is a new version), tensor dtypes, and what the gateway expects of a node (which key
# it must hold for its role). Not covered: the model (that is the fingerprint's job).
# 2: Assign names the previous and next stage (CurveZMQ: whose key to accept and trust);
# Heartbeat gained `addresses` (issue 14), the usage fields (steps ... stale_drops) and
# `refused`. A 1 peer would refuse the new fields (decode refuses unknown fields), and a 2
# gateway cannot confirm a 1 node's address: they refuse each other by version.
PROTOCOL_VERSION = b"zmqinfer/2"

SeqId = NewType("SeqId", int)
NodeId = NewType("NodeId", str)
Epoch = NewType("Epoch", int)

DTYPE_SIZES: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4,
    "int64": 8, "float16": 2, "bfloat16": 2, "float32": 4,
}


class WireError(ValueError):
    """A message that does not follow this protocol. Drop it; never act on part of it."""


@dataclass(frozen=True)
class Tensor:
    """A dense row-major array as raw bytes; `tensors.py` converts to and from mx.array."""

    dtype: str
    shape: tuple[int, ...]
    data: Any = dataclasses.field(repr=False, compare=False)  # bytes-like: bytes, memoryview, zmq.Frame

    @property
    def nbytes(self) -> int:
        # Only ever called on shapes `decode` has bounded (rank and every dim), or our own.
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


# ---- data plane ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """Everything the last stage needs to turn logits into a token, fixed per request."""

    temperature: float = 0.0  # 0 = greedy (argmax), exactly as mlx-lm
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalty_context: int = 20  # tokens the penalties look back over (mlx-lm's default)
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0  # alternatives to report per token (OpenAI's top_logprobs)


@dataclass(frozen=True)
class Chunk:
    """`length` consecutive tokens of one sequence, starting at position `start`.

    A node checks `start` against its KV cache, so a lost or reordered chunk is detected instead
    of silently corrupting the sequence. `params` rides on a sequence's first chunk only (the
    last stage keeps it). `sample=False` is a prefill chunk (any length, on the sequence's own
    cache); `sample=True` is a decode step (length 1) of the Forward's micro-batch group, run
    batched with the group's other sequences, after which the last stage samples a token.
    """

    seq: SeqId
    start: int
    length: int
    sample: bool
    params: SamplingParams | None = None


NO_GROUP = -1  # Forward.group of a message with no decode chunks (a prefill chunk, a probe)


@dataclass(frozen=True)
class Forward:
    KIND: ClassVar[str] = "forward"
    epoch: Epoch
    step: int  # gateway's id for this micro-batch, echoed in Sampled
    chunks: tuple[Chunk, ...]
    group: int  # the micro-batch group its decode chunks belong to, or NO_GROUP
    tokens: Tensor  # int32 [sum(lengths)]: every stage passes them on (penalties need them last)
    hidden: Tensor | None = None  # [sum(lengths), hidden_size] after stage 0


@dataclass(frozen=True)
class Release:
    KIND: ClassVar[str] = "release"
    epoch: Epoch
    seqs: tuple[SeqId, ...]


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float


@dataclass(frozen=True)
class Sample:
    seq: SeqId
    token: int
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Sampled:
    KIND: ClassVar[str] = "sampled"
    epoch: Epoch
    step: int
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class StepFailed:
    KIND: ClassVar[str] = "step_failed"
    epoch: Epoch
    step: int
    node: NodeId
    seqs: tuple[SeqId, ...]
    reason: str


# ---- control plane ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Heartbeat:
    """A node's periodic beat. It doubles as READY: it carries everything the gateway needs to
    admit the node, so a gateway that restarts learns the whole ring from the next beats."""

    KIND: ClassVar[str] = "heartbeat"
    node: NodeId
    data_port: int
    mem_total: int
    mem_free: int
    device: str
    pid: int
    epoch: Epoch  # the epoch it serves, 0 when unassigned
    loaded: bool  # its stage for `epoch` is loaded and serving
    rss_bytes: int
    busy_seconds: float  # time spent computing since start: busy fraction = d(busy)/d(wall)
    sequences: int  # live KV caches
    # The IPv4 addresses its data port listens on, as the node itself sees them: the gateway
    # wires the ring only to an address found here, never to what mDNS alone claims.
    addresses: tuple[str, ...] = ()
    # Usage for /metrics (node/usage.py). Counters are totals since the process started; the
    # gateway turns them into rates between beats. None: the platform does not expose it.
    steps: int = 0  # Forwards computed
    tokens: int = 0  # token rows computed (prefill and decode)
    kv_bytes: int = 0  # bytes held by its KV caches (allocated, mlx-lm grows them in steps)
    layers: int = 0  # transformer layers it holds loaded
    accel_memory_bytes: int | None = None  # accelerator memory in use, device-wide
    gpu_utilization: float | None = None  # 0..1, device-wide
    stale_drops: int = 0  # data messages of another epoch dropped unread
    refused: int = 0  # CURVE handshakes and data messages it refused (wrong or untrusted key)


@dataclass(frozen=True)
class Assign:
    """The gateway's plan for one node. `next_hop` is a tcp:// endpoint, or None for the last
    stage, which sends its samples to the gateway's result port instead."""

    KIND: ClassVar[str] = "assign"
    epoch: Epoch
    model: str
    start: int
    end: int
    n_layers: int
    next_hop: str | None
    result_port: int
    # Whose key to connect to (the next hop's) and whose data to accept (the previous stage's;
    # None: the gateway's, for the first stage). Identity is the key, never an address.
    next_node: NodeId | None = None
    prev_node: NodeId | None = None


@dataclass(frozen=True)
class Loaded:
    KIND: ClassVar[str] = "loaded"
    epoch: Epoch
    node: NodeId
    ok: bool
    detail: str  # the error when not ok
    fingerprint: str  # of the model files it loaded: every stage must load the same model
    shard_bytes: int
    rss_bytes: int
    load_seconds: float


@dataclass(frozen=True)
class Ping:
    KIND: ClassVar[str] = "ping"
    nonce: int


@dataclass(frozen=True)
class Pong:
    KIND: ClassVar[str] = "pong"
    nonce: int
    node: NodeId


@dataclass(frozen=True)
class Bye:
    """A node leaving on purpose. `draining`: it keeps serving until the gateway has re-planned
    without it (the gateway's beats then carry an epoch it is not part of)."""

    KIND: ClassVar[str] = "bye"
    node: NodeId
    reason: str
    draining: bool = False


@dataclass(frozen=True)
class GatewayBeat:
    """The gateway's beat to each node: proof of life, and the epoch the ring runs now."""

    KIND: ClassVar[str] = "gateway_beat"
    epoch: Epoch


Message = Union[Forward, Release, Sampled, StepFailed, Heartbeat, Assign, Loaded, Ping, Pong, Bye,
                GatewayBeat]
MESSAGES: dict[str, type] = {cls.KIND: cls for cls in typing.get_args(Message)}


# ---- encoding --------------------------------------------------------------------------------


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

