"""The protocol: exact bytes on the wire, round trips, and refusal of everything malformed."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from zmqinfer.tensors import tokens_to_wire
from zmqinfer.wire import (
    PROTOCOL_VERSION,
    Assign,
    Bye,
    Chunk,
    Epoch,
    Forward,
    Heartbeat,
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
    decode,
    encode,
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
GOLDEN_FORWARD = [
    "7a6d71696e6665722f32",
    "87a46b696e64a7666f7277617264a565706f636803a47374657007a66368756e6b739285a373657101a5737461727400"
    "a66c656e67746802a673616d706c65c2a6706172616d738bab74656d7065726174757265cb3fe0000000000000a5746f"
    "705f70cb3ff0000000000000a5746f705f6b00a56d696e5f70cb0000000000000000a4736565642ab272657065746974"
    "696f6e5f70656e616c7479c0b070726573656e63655f70656e616c7479c0b16672657175656e63795f70656e616c7479"
    "c0af70656e616c74795f636f6e7465787414aa6c6f6769745f6269617390ac746f705f6c6f6770726f62730285a37365"
    "7101a5737461727402a66c656e67746801a673616d706c65c3a6706172616d73c0a567726f757005a6746f6b656e7392"
    "a5696e7433329103a668696464656e92a7666c6f61743136920302",
    "0a000000140000001e000000",
    "0000003c0040004200440045",
]
GOLDEN_SAMPLED = [
    "7a6d71696e6665722f32",
    "84a46b696e64a773616d706c6564a565706f636803a47374657007a773616d706c65739184a373657101a5746f6b65"
    "6e2aa76c6f6770726f62cbbfd0000000000000a3746f709282a5746f6b656e2aa76c6f6770726f62cbbfd000000000"
    "000082a5746f6b656e07a76c6f6770726f62cbbff8000000000000",
]


def hexframes(frames: list) -> list[str]:
    return [bytes(f).hex() for f in frames]


def test_golden_bytes() -> None:
    assert hexframes(encode(FORWARD)) == GOLDEN_FORWARD
    assert hexframes(encode(SAMPLED)) == GOLDEN_SAMPLED
    back = decode([bytes.fromhex(h) for h in GOLDEN_FORWARD])
    assert back == FORWARD
    assert bytes(back.tokens.data) == bytes(FORWARD.tokens.data)
    assert bytes(back.hidden.data) == bytes(FORWARD.hidden.data)


ALL = [
    FORWARD, SAMPLED,
    Forward(Epoch(1), 2, (), -1, tokens_to_wire([])),
    Release(Epoch(1), (SeqId(4), SeqId(5))),
    StepFailed(Epoch(1), 9, NodeId("n1"), (SeqId(4),), "position mismatch"),
    Heartbeat(NodeId("n1"), 8110, 16 << 30, 8 << 30, "cpu", 123, Epoch(2), True, 1 << 20, 1.5, 3),
    Assign(Epoch(2), "smollm2-135m", 0, 10, 30, "tcp://10.0.0.2:8111", 8102),
    Assign(Epoch(2), "smollm2-135m", 20, 30, 30, None, 8102),
    Loaded(Epoch(2), NodeId("n1"), True, "", "abc", 1000, 2000, 0.5),
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


@pytest.mark.parametrize("frames,match", [
    ([b"zmqinfer/0", header(kind="ping", nonce=1)], "protocol version"),
    ([PROTOCOL_VERSION], "at least 2 frames"),
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
     "frame has 0 bytes"),
    ([PROTOCOL_VERSION, header(kind="ping", nonce=1), b"extra"], "more than the header declares"),
    ([PROTOCOL_VERSION, msgpack.packb({"kind": "ping", "nonce": msgpack.ExtType(1, b"x")})], "bad msgpack"),
])
def test_malformed_messages_are_refused(frames, match) -> None:
    with pytest.raises(WireError, match=match):
        decode(frames)


def test_oversized_header_is_refused_before_parsing() -> None:
    with pytest.raises(WireError, match="exceeds"):
        decode([PROTOCOL_VERSION, b"\x80" * ((1 << 20) + 1)])
