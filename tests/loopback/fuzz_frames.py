"""Seeded generators of hostile ZeroMQ messages for tests/loopback/test_fuzz.py: random bytes,
truncated, oversized, wrong version / kind / type, and well-formed messages that mean nothing
(huge dims, out-of-vocabulary ids, wrong hidden width or dtype, negative ports, NaN...)."""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import msgpack
import numpy as np

from zmqinfer.protocol import limits
from zmqinfer.protocol.codec import encode, tokens_to_wire
from zmqinfer.protocol.wire import (
    PROTOCOL_VERSION,
    Bye,
    Chunk,
    Epoch,
    Forward,
    Heartbeat,
    Loaded,
    Message,
    NodeId,
    Ping,
    Release,
    Sample,
    Sampled,
    SamplingParams,
    SeqId,
    StepFailed,
    Tensor,
    TokenLogprob,
)

Frames = list[bytes]
VOCAB, HIDDEN = 49152, 576  # the embedded SmolLM2-135M


def _b(frames: list[Any]) -> Frames:
    return [bytes(f) for f in frames]


def _head(**fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _rows(n: int, width: int, dtype: str = "float32") -> Tensor:
    return Tensor(dtype, (n, width), np.zeros((n, width), dtype=np.float32).astype(
        np.uint16 if dtype == "bfloat16" else dtype).tobytes())


class Fuzz:
    """Messages for one target kind ("first", "later" node data ports; "control", "results")."""

    def __init__(self, seed: int, epoch: int) -> None:
        self.r = random.Random(seed)
        self.epoch = Epoch(epoch)

    def _seq(self) -> SeqId:
        return SeqId(self.r.randrange(1 << 40, 1 << 41))  # never a real request's id

    def junk(self) -> Frames:
        r = self.r
        return [r.randbytes(r.randrange(0, 300)) for _ in range(r.randrange(1, 6))]

    def truncated(self, msg: Any) -> Frames:
        frames = _b(encode(msg))
        i = self.r.randrange(len(frames))
        frames[i] = frames[i][: self.r.randrange(len(frames[i]) + 1)]
        return frames[: self.r.randrange(1, len(frames) + 1)] if self.r.random() < 0.3 else frames

    def wrong_version(self, msg: Any) -> Frames:
        return [self.r.choice([b"zmqinfer/0", b"zmqinfer/2", b"", b"\xff" * 40]), *_b(encode(msg))[1:]]

    def wrong_kind(self) -> Frames:
        kind = self.r.choice(["exec", "", "FORWARD", "pickle", "x" * 5000])
        return [PROTOCOL_VERSION, _head(kind=kind, epoch=int(self.epoch))]

    def wrong_type(self) -> Frames:
        r = self.r
        value = r.choice(["1", 1.5, None, [1], {"a": 1}, True, -(1 << 63), (1 << 64) - 1, "\udc80".encode(
            "utf-8", "surrogatepass").decode("latin-1")])
        kind, fields = r.choice([
            ("forward", {"epoch": self.epoch, "step": 1, "chunks": [], "group": 0, "tokens": ["int32", [0]]}),
            ("release", {"epoch": self.epoch, "seqs": [1]}),
            ("heartbeat", {"node": "x", "data_port": 1, "mem_total": 1, "mem_free": 1, "device": "d",
                           "pid": 1, "epoch": 0, "loaded": False, "rss_bytes": 1, "busy_seconds": 0.0,
                           "sequences": 0}),
            ("sampled", {"epoch": self.epoch, "step": 1, "samples": []}),
        ])
        fields[r.choice(list(fields))] = value
        frames = [PROTOCOL_VERSION, _head(kind=kind, **fields)]
        return frames + ([b"\0" * 0] if kind == "forward" else [])

    def huge_dims(self) -> Frames:
        dims = [(1 << 64) - 1] * self.r.choice([2, 5, 300, 16384])
        return [PROTOCOL_VERSION, _head(kind="forward", epoch=int(self.epoch), step=1, chunks=[], group=0,
                                        tokens=["int32", dims]), b"\0" * 4]

    def many_frames(self) -> Frames:
        return [PROTOCOL_VERSION, _head(kind="ping", nonce=1)] + [b""] * self.r.randrange(3, 2000)

    # ---- well-formed, current epoch, meaningless ---------------------------------------------

    def forward(self, later: bool) -> Forward:
        """A Forward this ring's nodes must refuse for what it means."""
        r, seq = self.r, self._seq()
        n = r.randrange(1, 5)
        good_ids = [r.randrange(VOCAB) for _ in range(n)]
        bad_ids = list(good_ids)
        bad_ids[r.randrange(n)] = r.choice([VOCAB, VOCAB + 1, 10 ** 6, limits.MAX_TOKEN_ID, -1, -(1 << 31)])
        hidden = _rows(n, HIDDEN) if later else None
        chunk = Chunk(seq, 0, n, False)
        choices: list[Callable[[], Forward]] = [
            lambda: Forward(self.epoch, 1, (chunk,), -1, tokens_to_wire(bad_ids), hidden),
            lambda: Forward(self.epoch, 1, (Chunk(seq, 0, n, False, SamplingParams(
                logit_bias=((VOCAB + r.randrange(1000), 5.0),))),), -1, tokens_to_wire(good_ids), hidden),
        ]
        if later:
            choices += [
                lambda: Forward(self.epoch, 1, (chunk,), -1, tokens_to_wire(good_ids), _rows(n, HIDDEN + r.choice([-1, 1, 64]))),
                lambda: Forward(self.epoch, 1, (chunk,), -1, tokens_to_wire(good_ids), _rows(n, HIDDEN, r.choice(["float16", "bfloat16"]))),
                lambda: Forward(self.epoch, 1, (chunk,), -1, tokens_to_wire(good_ids), None),
            ]
        else:
            choices.append(lambda: Forward(self.epoch, 1, (chunk,), -1, tokens_to_wire(good_ids), _rows(n, HIDDEN)))
        return r.choice(choices)()

    def shape_lies(self) -> Frames:
        """Tokens or hidden whose shape disagrees with the chunks (wirecheck's refusals)."""
        r, seq = self.r, self._seq()
        lies: list[Message] = [
            Forward(self.epoch, 1, (Chunk(seq, 0, 3, False),), -1, tokens_to_wire([1, 2])),
            Forward(self.epoch, 1, (Chunk(seq, 0, 2, False),), -1, Tensor("float32", (2,), b"\0" * 8)),
            Forward(self.epoch, 1, (Chunk(seq, 0, 0, False),), -1, tokens_to_wire([])),
            Forward(self.epoch, 1, (Chunk(seq, -5, 1, False),), -1, tokens_to_wire([1])),
            Forward(self.epoch, 1, (Chunk(seq, 0, 1, False, SamplingParams(temperature=math.nan)),), -1,
                    tokens_to_wire([1])),
            Release(self.epoch, ()),
        ]
        return _b(encode(r.choice(lies)))

    def control_message(self) -> Message:
        """Well-typed control messages that mean nothing (or come from nobody the ring knows)."""
        r, nan = self.r, math.nan
        options: list[Message] = [
            Heartbeat(NodeId("fuzz"), r.choice([0, 65536, 1 << 40]), 1, 1, "cpu", 1, Epoch(0), False, 1, 0.0, 0),
            Heartbeat(NodeId("fuzz"), 8000, -1, 1, "cpu", 1, Epoch(0), False, 1, 0.0, 0),
            Heartbeat(NodeId("fuzz"), 8000, 1, 1, "cpu", 1, Epoch(0), False, 1, nan, 0),
            Heartbeat(NodeId("fuzz"), 8000, 1 << 40, 1 << 40, "cpu", 1, self.epoch, True, 1, 0.0, 0),
            Loaded(self.epoch, NodeId("node0"), True, "", "f", -1, 1, 0.1),
            StepFailed(self.epoch, 1, NodeId("node0"), (self._seq(),), "fuzz"),
            Bye(NodeId("node0"), "fuzz", True),  # from a routing id that is not node0's: ignored
            Ping(r.randrange(1 << 32)),
        ]
        return r.choice(options)

    def sampled(self) -> Sampled:
        r, seq = self.r, self._seq()
        return r.choice([
            Sampled(self.epoch, r.randrange(1 << 62), (Sample(seq, VOCAB + r.randrange(10 ** 6), -0.1),)),
            Sampled(self.epoch, r.randrange(1 << 62), (Sample(seq, 5, math.nan),)),
            Sampled(self.epoch, r.randrange(1 << 62), (Sample(seq, -1, -0.1),)),
            Sampled(self.epoch, r.randrange(1 << 62), (Sample(seq, 5, -0.1, (TokenLogprob(1, 0.5),) * 25),)),
            Sampled(self.epoch, r.randrange(1 << 62), (Sample(seq, 5, -0.1),)),  # an unknown step and seq
        ])

    # ---- one message for a target ------------------------------------------------------------

    def message(self, target: str) -> Frames:
        r = self.r
        generic: list[Callable[[], Frames]] = [
            self.junk, self.wrong_kind, self.wrong_type, self.huge_dims, self.many_frames,
            lambda: self.truncated(self.forward(target == "later") if target in ("first", "later")
                                   else self.control_message()),
            lambda: self.wrong_version(Ping(1)),
        ]
        if target in ("first", "later"):
            specific: list[Callable[[], Frames]] = [
                lambda: _b(encode(self.forward(target == "later"))), self.shape_lies,
                lambda: _b(encode(self.control_message())),  # a control message on a data port
            ]
        elif target == "control":
            specific = [lambda: _b(encode(self.control_message())), lambda: _b(encode(self.sampled()))]
        else:
            specific = [lambda: _b(encode(self.sampled())), lambda: _b(encode(self.control_message()))]
        # Half are well-formed and mean nothing: those reach the deepest checks.
        return r.choice(specific)() if r.random() < 0.5 else r.choice(generic)()

    def oversized(self, target: str) -> Frames:
        size = {"first": limits.MAX_DATA_FRAME_BYTES, "later": limits.MAX_DATA_FRAME_BYTES,
                "control": limits.MAX_CONTROL_FRAME_BYTES, "results": limits.MAX_RESULT_FRAME_BYTES}[target]
        return [PROTOCOL_VERSION, b"\0" * (size + 1)]
