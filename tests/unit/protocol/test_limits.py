"""Wire boundaries: every limit on what a peer sends is crossed here, and nothing it sends raises
anything but a counted drop (issue 10's second reproduction first)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from zmqinfer.gateway.api.http import DEFAULT_MAX_CONCURRENT
from zmqinfer.gateway.sequences import PREFILL_CHUNK
from zmqinfer.protocol import limits, sockets
from zmqinfer.protocol.checks import check
from zmqinfer.protocol.codec import decode, encode, tokens_to_wire
from zmqinfer.protocol.inbox import Inbox
from zmqinfer.protocol.wire import (
    PROTOCOL_VERSION,
    Assign,
    Chunk,
    Epoch,
    Forward,
    Heartbeat,
    KVProfile,
    Loaded,
    Message,
    NodeId,
    Ping,
    Release,
    Sample,
    Sampled,
    SamplingParams,
    SeqId,
    Tensor,
    TokenLogprob,
    WireError,
)


class Lines:
    """A structlog-shaped logger that keeps what it was told (to count log lines)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))


def forward_with_dims(dims: list[int]) -> list[bytes]:
    head = {"kind": "forward", "epoch": 1, "step": 1, "chunks": [], "group": 0, "tokens": ["int32", dims]}
    return [PROTOCOL_VERSION, msgpack.packb(head), b"\0" * 4]


def test_huge_dims_are_a_wire_error_not_a_crash() -> None:
    """Issue 10: 300 dims of 2**64-1 made the error message overflow int-to-str (ValueError)."""
    frames = forward_with_dims([(1 << 64) - 1] * 300)
    assert sum(map(len, frames)) < 4096  # one ~3 KB message
    with pytest.raises(WireError, match="rank 300 exceeds"):
        decode(frames)
    inbox = Inbox("data", Lines())
    assert inbox.read(frames) is None and inbox.dropped == 1


def test_many_dims_cost_no_time() -> None:
    """16k dims used to take over a second of the event loop to multiply out."""
    frames = forward_with_dims([(1 << 64) - 1] * 16384)
    t0 = time.perf_counter()
    with pytest.raises(WireError):
        decode(frames)
    assert time.perf_counter() - t0 < 0.05


@pytest.mark.parametrize("dims", [[(1 << 64) - 1], [limits.MAX_TENSOR_BYTES + 1], [-1], [1.5]])
def test_each_dim_is_bounded_before_multiplying(dims: list[Any]) -> None:
    with pytest.raises(WireError, match="every dimension"):
        decode(forward_with_dims(dims))


def test_a_tensor_one_byte_over_the_limit_is_refused() -> None:
    rows = limits.MAX_TENSOR_BYTES // 4 + 1
    with pytest.raises(WireError, match="limit"):
        decode(forward_with_dims([rows]))


def test_keys_of_mixed_types_are_a_wire_error() -> None:
    """sorted() over str and bytes keys raised TypeError, which no receive loop caught."""
    head = msgpack.packb({"kind": "ping", "nonce": 1, b"": 0, "x": 1}, use_bin_type=True)
    with pytest.raises(WireError, match="unknown field"):
        decode([PROTOCOL_VERSION, head])


def test_error_messages_stay_short() -> None:
    head = msgpack.packb({"kind": "x" * 100_000})
    with pytest.raises(WireError) as e:
        decode([PROTOCOL_VERSION, head])
    assert len(str(e.value)) < 200


def test_too_many_frames_are_refused() -> None:
    frames = encode(Ping(1)) + [b""] * (limits.MAX_DATA_FRAMES - 1)
    with pytest.raises(WireError, match="frames"):
        decode(frames)


def test_any_exception_while_decoding_is_a_counted_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    import zmqinfer.protocol.inbox as inbox_mod

    def broken(frames: list[Any]) -> Any:
        raise OverflowError("a decoder bug")

    monkeypatch.setattr(inbox_mod, "decode", broken)
    inbox = Inbox("data", Lines())
    assert inbox.read(encode(Ping(1))) is None
    assert inbox.dropped == 1 and inbox.reasons["OverflowError while decoding"] == 1


def test_drops_are_logged_at_a_rate_limit() -> None:
    """2,000 junk frames used to write 2,000 warning lines."""
    now = [0.0]
    lines = Lines()
    inbox = Inbox("data", lines, clock=lambda: now[0], every_s=5.0)
    for i in range(2000):
        now[0] = i * 0.001  # two seconds of junk
        assert inbox.read([PROTOCOL_VERSION, b"\xc1"]) is None
    assert inbox.dropped == 2000 and len(lines.lines) == 1
    now[0] = 5.5
    inbox.read([b"junk"])
    assert len(lines.lines) == 2 and lines.lines[1][1]["count"] == 1999 + 1


# ---- meaning ---------------------------------------------------------------------------------


def fwd(chunks: tuple[Chunk, ...], tokens: Tensor, hidden: Tensor | None = None) -> Forward:
    return Forward(Epoch(1), 1, chunks, 0, tokens, hidden)


C2 = (Chunk(SeqId(1), 0, 2, False),)
TOK2 = tokens_to_wire([1, 2])


def hidden(rows: int, width: int, dtype: str = "float32") -> Tensor:
    return Tensor(dtype, (rows, width), np.zeros((rows, width), np.float32).astype(
        np.uint16 if dtype == "bfloat16" else dtype).tobytes())


NAN = math.nan
MEANINGLESS: dict[str, Message] = {
    "tokens shorter than the chunks": fwd(C2, tokens_to_wire([1])),
    "tokens not int32": fwd(C2, Tensor("float32", (2,), b"\0" * 8)),
    "tokens 2-D": fwd(C2, Tensor("int32", (1, 2), b"\0" * 8)),
    "a zero-length chunk": fwd((Chunk(SeqId(1), 0, 0, False),), tokens_to_wire([])),
    "a negative start": fwd((Chunk(SeqId(1), -1, 1, False),), tokens_to_wire([1])),
    "a negative seq": fwd((Chunk(SeqId(-1), 0, 1, False),), tokens_to_wire([1])),
    "one seq decoding twice": fwd((Chunk(SeqId(1), 3, 1, True), Chunk(SeqId(1), 3, 1, True)),
                                  tokens_to_wire([1, 1])),
    "too many tokens": fwd((Chunk(SeqId(1), 0, limits.MAX_FORWARD_TOKENS + 1, False),),
                           tokens_to_wire([1] * (limits.MAX_FORWARD_TOKENS + 1))),
    "more drafts than the limit": fwd((Chunk(SeqId(1), 3, limits.MAX_DRAFT_TOKENS + 2, True),),
                                      tokens_to_wire([1] * (limits.MAX_DRAFT_TOKENS + 2))),
    "trim past the limit": fwd((Chunk(SeqId(1), 3, 1, True, trim=limits.MAX_DRAFT_TOKENS + 1),),
                               tokens_to_wire([1])),
    "a negative trim": fwd((Chunk(SeqId(1), 3, 1, True, trim=-1),), tokens_to_wire([1])),
    "trim on a prefill chunk": fwd((Chunk(SeqId(1), 3, 1, False, trim=1),), tokens_to_wire([1])),
    "hidden rows differ": fwd(C2, TOK2, hidden(3, 8)),
    "hidden rank 1": fwd(C2, TOK2, Tensor("float32", (16,), b"\0" * 64)),
    "hidden int32": fwd(C2, TOK2, Tensor("int32", (2, 8), b"\0" * 64)),
    "hidden too wide": fwd(C2, TOK2, Tensor("float16", (2, limits.MAX_HIDDEN_SIZE + 1), b"")),
    "NaN temperature": fwd((Chunk(SeqId(1), 0, 2, False, SamplingParams(temperature=NAN)),), TOK2),
    "seed past uint64": fwd((Chunk(SeqId(1), 0, 2, False, SamplingParams(seed=-1)),), TOK2),
    "top_k past int32": fwd((Chunk(SeqId(1), 0, 2, False, SamplingParams(top_k=1 << 40)),), TOK2),
    "top_p zero": fwd((Chunk(SeqId(1), 0, 2, False, SamplingParams(top_p=0.0)),), TOK2),
    "inf penalty": fwd((Chunk(SeqId(1), 0, 2, False, SamplingParams(presence_penalty=math.inf)),), TOK2),
    "bias past 100": fwd((Chunk(SeqId(1), 0, 2, False, SamplingParams(logit_bias=((1, 101.0),))),), TOK2),
    "negative bias id": fwd((Chunk(SeqId(1), 0, 2, False, SamplingParams(logit_bias=((-1, 1.0),))),), TOK2),
    "empty release": Release(Epoch(1), ()),
    "negative epoch": Release(Epoch(-1), (SeqId(1),)),
    "NaN logprob": Sampled(Epoch(1), 1, (Sample(SeqId(1), 5, NAN),)),
    "negative token": Sampled(Epoch(1), 1, (Sample(SeqId(1), -5, -0.1),)),
    "too many alternatives": Sampled(Epoch(1), 1, (Sample(SeqId(1), 5, -0.1, (TokenLogprob(1, -1.0),) * 21),)),
    "port 0": Heartbeat(NodeId("n"), 0, 1, 1, "cpu", 1, Epoch(0), False, 1, 0.0, 0),
    "port 65536": Heartbeat(NodeId("n"), 65536, 1, 1, "cpu", 1, Epoch(0), False, 1, 0.0, 0),
    "negative memory": Heartbeat(NodeId("n"), 8000, -1, 1, "cpu", 1, Epoch(0), False, 1, 0.0, 0),
    "NaN busy": Heartbeat(NodeId("n"), 8000, 1, 1, "cpu", 1, Epoch(0), False, 1, NAN, 0),
    "empty layer range": Assign(Epoch(1), "m", 5, 5, 30, None, 8000),
    "layers past the model": Assign(Epoch(1), "m", 0, 31, 30, None, 8000),
    "a next hop that is not tcp": Assign(Epoch(1), "m", 0, 5, 30, "ipc:///tmp/x", 8000),
    "negative shard bytes": Loaded(Epoch(1), NodeId("n"), True, "", "f", -1, 1, 0.1),
    "negative kv bytes": Loaded(Epoch(1), NodeId("n"), True, "", "f", 1, 1, 0.1, KVProfile(1, ((-4, 512),), 0)),
}


@pytest.mark.parametrize("name", MEANINGLESS)
def test_messages_that_mean_nothing_are_refused(name: str) -> None:
    msg = MEANINGLESS[name]
    with pytest.raises(WireError):
        check(msg)
    inbox = Inbox("any", Lines())
    assert inbox.read(encode(msg)) is None and inbox.dropped == 1  # through the real decoder


@pytest.mark.parametrize("msg", [
    fwd(C2, TOK2, hidden(2, 8, "bfloat16")),
    fwd((), tokens_to_wire([])),  # the ring probe
    fwd((Chunk(SeqId(1), 0, limits.MAX_FORWARD_TOKENS, False, SamplingParams(
        temperature=0.7, seed=(1 << 64) - 1, logit_bias=((0, -100.0), (5, 100.0)))),),
        tokens_to_wire([1] * limits.MAX_FORWARD_TOKENS)),
    Heartbeat(NodeId("n"), 65535, 0, 0, "cpu", 1, Epoch(0), False, 1, 0.0, 0),
    Sampled(Epoch(1), 1, ()),
    fwd((Chunk(SeqId(1), 3, 1 + limits.MAX_DRAFT_TOKENS, True, trim=limits.MAX_DRAFT_TOKENS),),
        tokens_to_wire([1] * (1 + limits.MAX_DRAFT_TOKENS))),
], ids=["bf16 hidden", "probe", "a full chunk", "port 65535", "empty sampled", "most drafts and trim"])
def test_messages_at_the_limits_are_accepted(msg: Any) -> None:
    check(msg)
    assert Inbox("any", Lines()).read(encode(msg)) == msg


def test_the_limits_hold_what_the_scheduler_and_api_send() -> None:
    assert PREFILL_CHUNK <= limits.MAX_FORWARD_TOKENS
    assert DEFAULT_MAX_CONCURRENT <= limits.MAX_FORWARD_TOKENS  # a decode group's rows
    assert limits.MAX_DATA_FRAME_BYTES >= PREFILL_CHUNK * limits.MAX_HIDDEN_SIZE * 4


# ---- sockets: frame count and per-role frame sizes -------------------------------------------


async def test_a_message_of_a_million_frames_keeps_only_a_few() -> None:
    ctx = zmq.asyncio.Context()
    pull = sockets.data_pull(ctx, "tcp://127.0.0.1:0")
    push = ctx.socket(zmq.PUSH)
    push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
    try:
        await push.send_multipart([b""] * 100_000 + [b"x"])
        async with asyncio.timeout(10):
            frames = await sockets.recv(pull, sockets.DATA_FRAMES)
        assert len(frames) == sockets.DATA_FRAMES + 1
        assert Inbox("data", Lines()).read(frames) is None
        await push.send_multipart(encode(Ping(7)))  # the next message arrives whole
        async with asyncio.timeout(5):
            assert decode(await sockets.recv(pull, sockets.DATA_FRAMES)) == Ping(7)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


async def test_a_control_frame_over_its_limit_drops_the_connection_not_the_socket() -> None:
    ctx = zmq.asyncio.Context()
    router = sockets.control_router(ctx, "tcp://127.0.0.1:0")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    big, small = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        big.connect(endpoint)
        await big.send_multipart([PROTOCOL_VERSION, b"\0" * (limits.MAX_CONTROL_FRAME_BYTES + 1)])
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await router.recv_multipart()
        small.connect(endpoint)
        await small.send_multipart([PROTOCOL_VERSION, b"\0" * limits.MAX_CONTROL_FRAME_BYTES])
        async with asyncio.timeout(5):
            frames = await sockets.recv(router, sockets.ROUTER_CONTROL_FRAMES)
        assert len(frames[2]) == limits.MAX_CONTROL_FRAME_BYTES
    finally:
        for s in (big, small, router):
            s.close(0)
        ctx.term()


def test_each_role_has_its_own_frame_limit_and_hwm() -> None:
    ctx = zmq.asyncio.Context()
    made = {
        "control": sockets.control_router(ctx, "tcp://127.0.0.1:0"),
        "results": sockets.results_router(ctx, "tcp://127.0.0.1:0"),
        "data": sockets.data_pull(ctx, "tcp://127.0.0.1:0"),
    }
    try:
        assert made["control"].getsockopt(zmq.MAXMSGSIZE) == limits.MAX_CONTROL_FRAME_BYTES
        assert made["results"].getsockopt(zmq.MAXMSGSIZE) == limits.MAX_RESULT_FRAME_BYTES
        assert made["data"].getsockopt(zmq.MAXMSGSIZE) == limits.MAX_DATA_FRAME_BYTES < 64 << 20
        assert made["control"].getsockopt(zmq.RCVHWM) == sockets.CONTROL_HWM
        assert made["data"].getsockopt(zmq.RCVHWM) == sockets.DATA_HWM
        # Queued bytes per pipe stay bounded: HWM x (max frames x max frame bytes).
        assert sockets.DATA_HWM * limits.MAX_DATA_FRAME_BYTES * 2 <= 4 << 30
    finally:
        for s in made.values():
            s.close(0)
        ctx.term()
