"""The protocol: exact bytes on the wire, round trips, and refusal of everything malformed."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from zmqinfer.protocol.codec import decode, encode, tokens_to_wire
from zmqinfer.protocol.wire import (
    PROTOCOL_VERSION,
    Assign,
    Bye,
    Chunk,
    Epoch,
    Forward,
    Heartbeat,
    KVProfile,
    Loaded,
    NodeId,
    Ping,
    Pong,
    Release,
    Sample,
    Sampled,
    SamplingParams,
    SeqId,
    StepFailed,
    Tensor,
    TokenLogprob,
    WireError,
)

FORWARD = Forward(
    Epoch(3), 7,
    (Chunk(SeqId(1), 0, 2, False, SamplingParams(temperature=0.5, seed=42, top_logprobs=2)),
     Chunk(SeqId(1), 2, 1, True)),
    5,
    tokens_to_wire([10, 20, 30]),
    Tensor("float16", (3, 2), np.arange(6, dtype=np.float16).tobytes()),
)
SAMPLED = Sampled(Epoch(3), 7, (Sample(SeqId(1), 42, -0.25, (TokenLogprob(42, -0.25), TokenLogprob(7, -1.5))),))

# Golden bytes: a change here is a protocol change. Bump PROTOCOL_VERSION with it.
# zmqinfer/2: the Heartbeat's usage fields (steps .. stale_drops, after `sequences`).
# zmqinfer/3: Chunk's `prefix` (issue 22, the prefix cache); Release's `keep` and `drop`.
# zmqinfer/4: SamplingParams' grammar, grammar_start, grammar_after, grammar_opener (after
# top_logprobs; issue 20, merged beside issue 22's 3).
# zmqinfer/5: Chunk's `trim` (issue 23, speculation; after `prefix`); Loaded's `kv` and `rollback`.
GOLDEN_FORWARD = [
    "7a6d71696e6665722f35",  # "zmqinfer/5"
    "87a46b696e64a7666f7277617264a565706f636803a47374657007a66368756e6b739287a373657101a5737461727400"
    "a66c656e67746802a673616d706c65c2a6706172616d738fab74656d7065726174757265cb3fe0000000000000a5746f"
    "705f70cb3ff0000000000000a5746f705f6b00a56d696e5f70cb0000000000000000a4736565642ab272657065746974"
    "696f6e5f70656e616c7479c0b070726573656e63655f70656e616c7479c0b16672657175656e63795f70656e616c7479"
    "c0af70656e616c74795f636f6e7465787414aa6c6f6769745f6269617390ac746f705f6c6f6770726f627302a7677261"
    "6d6d6172c0ad6772616d6d61725f737461727400ad6772616d6d61725f616674657290ae6772616d6d61725f6f70656e"
    "6572c0a6707265666978c0a47472696d0087a373657101a5737461727402a66c656e67746801a673616d706c65c3a670"
    "6172616d73c0a6707265666978c0a47472696d00a567726f757005a6746f6b656e7392a5696e7433329103a668696464"
    "656e92a7666c6f61743136920302",
    "0a000000140000001e000000",
    "0000003c0040004200440045",
]
GOLDEN_SAMPLED = [
    "7a6d71696e6665722f35",  # "zmqinfer/5"
    "84a46b696e64a773616d706c6564a565706f636803a47374657007a773616d706c65739184a373657101a5746f6b656e"
    "2aa76c6f6770726f62cbbfd0000000000000a3746f709282a5746f6b656e2aa76c6f6770726f62cbbfd0000000000000"
    "82a5746f6b656e07a76c6f6770726f62cbbff8000000000000",
]

# Protocol 2 added to Heartbeat, as its last fields: `addresses` (the node's own IPv4 addresses,
# issue 14), the usage fields steps ... stale_drops (/metrics) and `refused` (CurveZMQ).
# Regenerated on purpose when the three came together.
HEARTBEAT = Heartbeat(NodeId("n1"), 8110, 16 << 30, 8 << 30, "cpu", 123, Epoch(2), True, 1 << 20, 1.5, 3,
                      addresses=("10.0.0.2", "127.0.0.1"), steps=40, tokens=300, kv_bytes=1 << 21, layers=10,
                      accel_memory_bytes=None, gpu_utilization=0.25, stale_drops=2)
GOLDEN_HEARTBEAT = [
    "7a6d71696e6665722f35",
    "de0015a46b696e64a9686561727462656174a46e6f6465a26e31a9646174615f706f7274cd1faea96d656d5f746f7461"
    "6ccf0000000400000000a86d656d5f66726565cf0000000200000000a6646576696365a3637075a37069647ba565706f"
    "636802a66c6f61646564c3a97273735f6279746573ce00100000ac627573795f7365636f6e6473cb3ff8000000000000"
    "a973657175656e63657303a961646472657373657392a831302e302e302e32a93132372e302e302e31a5737465707328"
    "a6746f6b656e73cd012ca86b765f6279746573ce00200000a66c61796572730ab2616363656c5f6d656d6f72795f6279"
    "746573c0af6770755f7574696c697a6174696f6ecb3fd0000000000000ab7374616c655f64726f707302a77265667573"
    "656400",
]


def hexframes(frames: list) -> list[str]:
    return [bytes(f).hex() for f in frames]


def test_golden_bytes() -> None:
    assert hexframes(encode(FORWARD)) == GOLDEN_FORWARD
    assert hexframes(encode(SAMPLED)) == GOLDEN_SAMPLED
    assert hexframes(encode(HEARTBEAT)) == ["".join(GOLDEN_HEARTBEAT[:1]), "".join(GOLDEN_HEARTBEAT[1:])]
    assert decode([bytes.fromhex(h) for h in hexframes(encode(HEARTBEAT))]) == HEARTBEAT
    back = decode([bytes.fromhex(h) for h in GOLDEN_FORWARD])
    assert back == FORWARD
    assert bytes(back.tokens.data) == bytes(FORWARD.tokens.data)
    assert bytes(back.hidden.data) == bytes(FORWARD.hidden.data)
    assert hexframes(encode(HEARTBEAT)) == GOLDEN_HEARTBEAT
    assert decode([bytes.fromhex(h) for h in GOLDEN_HEARTBEAT]) == HEARTBEAT


def test_heartbeat_usage_fields_default_to_absent() -> None:
    """A beat without the usage fields (the fields a node cannot fill) decodes to "absent"
    for the accelerator numbers, not to a made-up 0% / 0 bytes."""
    plain = {k: v for k, v in msgpack.unpackb(bytes.fromhex(GOLDEN_HEARTBEAT[1])).items()
             if k not in ("steps", "tokens", "kv_bytes", "layers", "accel_memory_bytes",
                          "gpu_utilization", "stale_drops")}
    beat = decode([PROTOCOL_VERSION, msgpack.packb(plain)])
    assert isinstance(beat, Heartbeat)
    assert (beat.gpu_utilization, beat.accel_memory_bytes, beat.steps, beat.kv_bytes) == (None, None, 0, 0)
    with pytest.raises(WireError, match="expected a number"):
        decode([PROTOCOL_VERSION, msgpack.packb(plain | {"gpu_utilization": "high"})])


ALL = [
    FORWARD, SAMPLED,
    Forward(Epoch(1), 2, (), -1, tokens_to_wire([])),
    Release(Epoch(1), (SeqId(4), SeqId(5))),
    StepFailed(Epoch(1), 9, NodeId("n1"), (SeqId(4),), "position mismatch"),
    Heartbeat(NodeId("n1"), 8110, 16 << 30, 8 << 30, "cpu", 123, Epoch(2), True, 1 << 20, 1.5, 3),
    HEARTBEAT,
    Assign(Epoch(2), "smollm2-135m", 0, 10, 30, "tcp://10.0.0.2:8111", 8102),
    Assign(Epoch(2), "smollm2-135m", 20, 30, 30, None, 8102),
    Loaded(Epoch(2), NodeId("n1"), True, "", "abc", 1000, 2000, 0.5),
    Loaded(Epoch(2), NodeId("n1"), True, "", "abc", 1000, 2000, 0.5, KVProfile(4096, ((1024, 512),), 8192)),
    Ping(1), Pong(1, NodeId("n1")), Bye(NodeId("n1"), "shutdown"),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: m.KIND)
def test_round_trip(msg) -> None:
    assert decode(encode(msg)) == msg


def test_tensor_payload_is_not_copied_on_encode() -> None:
    buf = memoryview(np.arange(4, dtype=np.int32))
    frames = encode(Forward(Epoch(1), 1, (), 0, Tensor("int32", (4,), buf)))
    assert frames[2] is buf


def header(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


_BEAT = {k: v for k, v in msgpack.unpackb(encode(HEARTBEAT)[1]).items() if k != "kind"}


@pytest.mark.parametrize("frames,match", [
    ([b"zmqinfer/0", header(kind="ping", nonce=1)], "protocol version"),
    ([b"zmqinfer/1", header(kind="ping", nonce=1)], "protocol version"),  # before Heartbeat.addresses
    ([PROTOCOL_VERSION], "expected 2 to 4 frames"),
    ([PROTOCOL_VERSION, b"\xc1"], "bad msgpack"),
    ([PROTOCOL_VERSION, msgpack.packb([1, 2])], "not a map"),
    ([PROTOCOL_VERSION, header(kind="exec", cmd="rm")], "unknown message kind"),
    ([PROTOCOL_VERSION, header(kind="ping")], "missing field 'nonce'"),
    ([PROTOCOL_VERSION, header(kind="ping", nonce="1")], "expected int"),
    ([PROTOCOL_VERSION, header(kind="ping", nonce=True)], "expected int"),
    ([PROTOCOL_VERSION, header(kind="ping", nonce=1, extra=2)], "unknown field"),
    ([PROTOCOL_VERSION, header(kind="release", epoch=1, seqs=5)], "expected an array"),
    ([PROTOCOL_VERSION, header(kind="forward", epoch=1, step=1, chunks=[], group=0, tokens=["int32", [2]])],
     "tensor frame missing"),
    ([PROTOCOL_VERSION, header(kind="forward", epoch=1, step=1, chunks=[], group=0, tokens=["int32", [2]]), b"\0" * 7],
     "frame has 7 bytes"),
    ([PROTOCOL_VERSION, header(kind="forward", epoch=1, step=1, chunks=[], group=0, tokens=["object", [1]]), b"\0"],
     "unsupported dtype"),
    ([PROTOCOL_VERSION, header(kind="forward", epoch=1, step=1, chunks=[], group=0, tokens=["int32", [1 << 40]]), b""],
     "every dimension must be an integer in"),
    ([PROTOCOL_VERSION, header(kind="ping", nonce=1), b"extra"], "more than the header declares"),
    ([PROTOCOL_VERSION, header(kind="heartbeat", **{**_BEAT, "addresses": [10]})], r"addresses\[0\]: expected str"),
    ([PROTOCOL_VERSION, header(kind="heartbeat", **{**_BEAT, "addresses": "10.0.0.2"})], "expected an array"),
    ([PROTOCOL_VERSION, msgpack.packb({"kind": "ping", "nonce": msgpack.ExtType(1, b"x")})], "bad msgpack"),
])
def test_malformed_messages_are_refused(frames, match) -> None:
    with pytest.raises(WireError, match=match):
        decode(frames)


def test_oversized_header_is_refused_before_parsing() -> None:
    with pytest.raises(WireError, match="exceeds"):
        decode([PROTOCOL_VERSION, b"\x80" * ((1 << 20) + 1)])
