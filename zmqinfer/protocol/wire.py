"""THE protocol between the gateway and the nodes.

Every message is a list of ZeroMQ frames (zguide's "Cheap or Nasty" framing):

    frame 0   PROTOCOL_VERSION, compared byte for byte (a mismatch is refused, never guessed at)
    frame 1   msgpack map: {"kind": <message kind>, <field>: <value>, ...}
    frame 2.. raw tensor bytes, one frame per `Tensor` field that is not None, in field order;
              the header holds each one's dtype and shape, so the bytes are never copied or parsed

Messages are frozen dataclasses; codec.py's `encode(msg) -> frames` and `decode(frames) -> msg`
are the only way in or out. `decode` trusts nothing: msgpack runs with size limits (never pickle, never ext
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
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, NewType, Union

# What the version covers: frame layout, every message kind and its fields (a field added or
# removed is a new version), tensor dtypes, and what the gateway expects of a node (which key
# it must hold for its role). Not covered: the model (that is the fingerprint's job).
# 2: Assign names the previous and next stage (CurveZMQ: whose key to accept and trust);
# Heartbeat gained `addresses` (issue 14), the usage fields (steps ... stale_drops) and
# `refused`. A 1 peer would refuse the new fields (decode refuses unknown fields), and a 2
# gateway cannot confirm a 1 node's address: they refuse each other by version.
# 3: the prefix cache (issue 22): Chunk gained `prefix`, Release gained `keep` and `drop`.
# 4: SamplingParams gained `grammar`, `grammar_start`, `grammar_after` and `grammar_opener`
# (issue 20: enforced structured output); a 3 node would accept a grammar-constrained
# request and ignore the grammar. (Issue 20 was written as a 3 beside issue 22's; merged, 4.)
# 5: both unreleased when merged, one version: Loaded gained `kv` (issue 19: what one
# sequence's caches cost on the stage, by cache type, for the gateway's admission) and
# `rollback`; a decode Chunk may carry drafted tokens (`length` > 1) and `trim`, the
# rejected positions to drop first (issue 23: speculative decoding). A 4 peer would refuse
# the fields, or take a drafted decode chunk and never roll back: they refuse each other.
PROTOCOL_VERSION = b"zmqinfer/5"

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

    # 0 = greedy (argmax), exactly as mlx-lm. Not the API's default (OpenAI's 1.0, which every
    # request the gateway sends carries explicitly): this one serves probes and tests.
    temperature: float = 0.0
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
    # An llguidance grammar (its JSON form) the sampled tokens must follow, or None; the gateway
    # has compiled it before sending. It applies from position `grammar_start` on (the prompt's
    # length): the matcher is rebuilt from the tokens a sequence carries, so a replay keeps it.
    grammar: str | None = None
    grammar_start: int = 0
    # Token ids that, once generated, start the grammar (a thinking model's end-of-reasoning
    # marker); empty: it starts at grammar_start. With `grammar_opener` (the think-start token)
    # the wait begins only if the first generated token is that opener; without it, at once
    # (the prompt opened the reasoning block).
    grammar_after: tuple[int, ...] = ()
    grammar_opener: int | None = None


@dataclass(frozen=True)
class Chunk:
    """`length` consecutive tokens of one sequence, starting at position `start`.

    A node checks `start` against its KV cache, so a lost or reordered chunk is detected instead
    of silently corrupting the sequence. `params` rides on a sequence's first chunk only (the
    last stage keeps it). `sample=False` is a prefill chunk (any length, on the sequence's own
    cache); `sample=True` is a decode step (length 1) of the Forward's micro-batch group, run
    batched with the group's other sequences, after which the last stage samples a token.

    Speculation (issue 23): a decode chunk of length 1 + k carries the sequence's next token and
    k drafted ones; every stage runs it on the sequence's own cache, and the last stage answers
    with the drafts it accepts plus one token of its own (1 to k + 1 Samples, in order). The
    positions it rejected stay in every stage's cache until the sequence's next chunk, whose
    `trim` says how many to drop first (the cache must then hold `start + trim`).
    """

    seq: SeqId
    start: int
    length: int
    sample: bool
    params: SamplingParams | None = None
    # A sequence's first chunk may start past 0 from a cached prefix (node/prefixes.py): every
    # stage seeds its cache with that prefix's first `start` positions. None: from its own cache.
    prefix: int | None = None
    trim: int = 0  # positions of rejected drafts to drop from the end of its caches first


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
class Keep:
    """Before `seq`'s caches are freed: keep its first `length` positions as prefix `prefix`."""

    seq: SeqId
    prefix: int
    length: int


@dataclass(frozen=True)
class Release:
    """Free `seqs` (after keeping what `keep` names) and drop the cached prefixes `drop`. It
    travels the ring in order, so a prefix is held on every stage before any Forward names it."""

    KIND: ClassVar[str] = "release"
    epoch: Epoch
    seqs: tuple[SeqId, ...]
    keep: tuple[Keep, ...] = ()
    drop: tuple[int, ...] = ()


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
class KVProfile:
    """What one sequence's caches cost on a stage, by cache type, as the stage measured them on
    mlx-lm's own caches (node/stage.py; model/size.py's `sequence_bytes` prices a length):
    caches that grow with every position (full attention), rotating ones that stop at their
    window (sliding-window attention), and states of a constant size (an SSM's, a conv's)."""

    token_bytes: int = 0  # per position, over the stage's growing caches
    windows: tuple[tuple[int, int], ...] = ()  # (bytes per position, window) per rotating cache
    state_bytes: int = 0  # per sequence, whatever its length

    @property
    def position_bytes(self) -> int:
        """Bytes one position costs before any window stops it."""
        return self.token_bytes + sum(b for b, _ in self.windows)


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
    kv: KVProfile | None = None  # one sequence's caches on this stage, as measured; None: not measured
    # Its caches can drop positions from their end (mlx-lm `trim`) at any length: speculation
    # may run through it. False for SSM states and sliding windows (node/stage.py).
    rollback: bool = False


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
