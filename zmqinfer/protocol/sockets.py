"""One factory per socket role. Every option is here with the failure it prevents.

    gateway: control ROUTER (bind)   results ROUTER (bind)   data PUSH -> node 0
    node:    control DEALER -> gateway (routing id = node id)
             data PULL (bind)  ->  data PUSH -> next node   |   results DEALER -> gateway (last)

`curve`: this process's key pair (CurveZMQ, keys.py); binding sockets are CURVE servers, connecting
ones need `keys.toward(peer)`. None: plaintext (no cluster directory configured).

Endpoints handed to these are always tcp://<ip>:<port>: an mDNS `.local` name must never reach
ZeroMQ (it would go to the system resolver, which cannot resolve it, and block).
"""

from __future__ import annotations

import asyncio
from typing import Any

import zmq
import zmq.asyncio

from zmqinfer.protocol.limits import (
    MAX_CONTROL_FRAME_BYTES,
    MAX_CONTROL_FRAMES,
    MAX_DATA_FRAME_BYTES,
    MAX_DATA_FRAMES,
    MAX_RESULT_FRAME_BYTES,
)

# Data-plane high-water marks are a safety net only: the gateway's credits keep about two
# messages per stage in flight (a decode group and a prefill chunk), plus small Releases. 64
# covers a 16-stage ring, and bounds what one peer can queue on one pipe to 64 maximal
# messages (64 x ~17 MiB) instead of 1000 (17 GB).
DATA_HWM = 64
# Control messages are a few hundred bytes, sent every beat: 100 is seconds of backlog.
CONTROL_HWM = 100
# Frames a receive loop keeps per message, by role (a ROUTER's routing id frame on top).
DATA_FRAMES = MAX_DATA_FRAMES
CONTROL_FRAMES = MAX_CONTROL_FRAMES
ROUTER_CONTROL_FRAMES = 1 + MAX_CONTROL_FRAMES
ROUTER_RESULT_FRAMES = 1 + MAX_CONTROL_FRAMES  # Sampled is a header only
# Draining a hostile message's extra frames costs ~4 us each: give the loop a turn every 10,000
# (40 ms), so even a million-frame message never silences the heartbeats.
DRAIN_YIELD_EVERY = 10_000
from zmqinfer.protocol.keys import CurveKeys, apply

# Reconnect quickly after a node restarts, but back off to 2 s so a dead peer costs nothing.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000
# ZMTP heartbeats let TCP-level failures surface on connections that are otherwise quiet; our
# own liveness lives in control-plane messages (liveness.py), these only clean up dead pipes.
ZMTP_HEARTBEAT_IVL_MS = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS = 3000
# A data hop that cannot take a message for this long is down, and the step fails loudly instead
# of waiting forever behind a dead peer. The gateway gives node 0 less: it also learns of a dead
# node from heartbeats (2 s), and a request should not wait past that; a node's next hop may be
# busy with a long prefill chunk that fills its queue, so a node waits longer before it gives up.
FIRST_HOP_SEND_TIMEOUT_S = 5.0
NEXT_HOP_SEND_TIMEOUT_S = 10.0


async def send(sock: zmq.asyncio.Socket, frames: list, timeout: float) -> bool:
    """Send under a deadline (TimeoutError). False when another task closed the socket while we
    waited: a re-plan replaced it, and this message belonged to the old ring. (pyzmq cancels a
    closed socket's pending futures; without this the sender would be cancelled with it.)"""
    try:
        # asyncio.timeout, never wait_for: on Python 3.11 wait_for swallows the caller's cancel
        # when the send completes in the same loop iteration (the gateway then never shut down).
        async with asyncio.timeout(timeout):
            await sock.send_multipart(frames, copy=False)
        return True
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if sock.closed and task is not None and not task.cancelling():
            return False
        raise
    except zmq.ZMQError:
        if sock.closed:
            return False
        raise


async def recv(sock: zmq.asyncio.Socket, max_frames: int) -> list[zmq.Frame]:
    """One message, keeping at most `max_frames` + 1 of its frames: the rest are read and let go
    at once, so a peer's million-frame message never becomes a million-item list (and the
    decoder then refuses the message for its frame count)."""
    # One yield per message: a flood of messages that are all ready must not starve the beats
    # (an awaited recv that is already complete never gives the loop a turn).
    await asyncio.sleep(0)
    frames = [await _first_frame(sock)]
    if sock.get(zmq.RCVMORE):
        # The rest of a message arrives with its first frame: plain non-blocking calls on the same
        # socket, not one awaited future per frame (2,000 frames would cost the loop 0.1 s).
        raw: zmq.Socket[Any] = zmq.Socket.shadow(sock.underlying)
        extra = 0
        while raw.get(zmq.RCVMORE):
            frame = raw.recv(zmq.NOBLOCK, copy=False)
            if len(frames) <= max_frames:
                frames.append(frame)
            extra += 1
            if extra % DRAIN_YIELD_EVERY == 0:
                await asyncio.sleep(0)  # the only reader of this socket: safe to give a turn
    return frames


async def _first_frame(sock: zmq.asyncio.Socket) -> zmq.Frame:
    """With CURVE, libzmq (4.3.5, measured) wakes a socket once per connection about one ZMTP
    heartbeat after it connects with nothing to read: pyzmq then raises Again from a recv it was
    told would succeed. That wake-up is not a message, so wait for the next one."""
    while True:
        try:
            frame: zmq.Frame = await sock.recv(copy=False)
            return frame
        except zmq.Again:
            continue


def context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context()


def _common(s: zmq.asyncio.Socket, max_frame_bytes: int) -> zmq.asyncio.Socket:
    s.setsockopt(zmq.LINGER, 0)  # never block process exit on undeliverable messages
    # libzmq drops the connection of a peer whose frame is larger (per frame, not per message).
    s.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    s.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    s.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS)
    return s


def control_router(ctx: zmq.asyncio.Context, endpoint: str,
                   curve: CurveKeys | None = None) -> zmq.asyncio.Socket:
    s = _common(ctx.socket(zmq.ROUTER), MAX_CONTROL_FRAME_BYTES)
    apply(s, curve, server=True)
    s.setsockopt(zmq.RCVHWM, CONTROL_HWM)
    # A send to a node that is gone raises EHOSTUNREACH instead of vanishing silently.
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A restarted node reuses its routing id; without handover it would be ignored forever.
    s.setsockopt(zmq.ROUTER_HANDOVER, 1)
    s.bind(endpoint)
    return s


def control_dealer(ctx: zmq.asyncio.Context, node_id: str, endpoint: str,
                   curve: CurveKeys | None = None) -> zmq.asyncio.Socket:
    s = _common(ctx.socket(zmq.DEALER), MAX_CONTROL_FRAME_BYTES)
    apply(s, curve, server=False)
    s.setsockopt(zmq.ROUTING_ID, node_id.encode())
    s.setsockopt(zmq.RCVHWM, CONTROL_HWM)
    # Control messages are only meaningful fresh: don't queue Ready/heartbeats for a gateway that
    # is not connected yet; the loops resend on their own schedule.
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.setsockopt(zmq.SNDHWM, CONTROL_HWM)
    s.connect(endpoint)
    return s


def results_router(ctx: zmq.asyncio.Context, endpoint: str,
                   curve: CurveKeys | None = None) -> zmq.asyncio.Socket:
    s = _common(ctx.socket(zmq.ROUTER), MAX_RESULT_FRAME_BYTES)
    apply(s, curve, server=True)
    s.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a re-assigned last stage reconnects with its id
    s.setsockopt(zmq.RCVHWM, DATA_HWM)
    s.bind(endpoint)
    return s


def results_dealer(ctx: zmq.asyncio.Context, node_id: str, endpoint: str,
                   curve: CurveKeys | None = None) -> zmq.asyncio.Socket:
    s = _common(ctx.socket(zmq.DEALER), MAX_RESULT_FRAME_BYTES)
    apply(s, curve, server=False)
    s.setsockopt(zmq.ROUTING_ID, node_id.encode())
    s.setsockopt(zmq.SNDHWM, DATA_HWM)
    s.connect(endpoint)
    return s


def data_pull(ctx: zmq.asyncio.Context, endpoint: str,
              curve: CurveKeys | None = None) -> zmq.asyncio.Socket:
    s = _common(ctx.socket(zmq.PULL), MAX_DATA_FRAME_BYTES)
    apply(s, curve, server=True)
    s.setsockopt(zmq.RCVHWM, DATA_HWM)
    s.bind(endpoint)
    return s


def data_push(ctx: zmq.asyncio.Context, endpoint: str,
              curve: CurveKeys | None = None) -> zmq.asyncio.Socket:
    s = _common(ctx.socket(zmq.PUSH), MAX_DATA_FRAME_BYTES)
    apply(s, curve, server=False)
    s.setsockopt(zmq.SNDHWM, DATA_HWM)
    # Queue only on a completed connection: a send to a hop that is down then waits (under the
    # caller's deadline) instead of piling hidden states into a pipe nobody will read.
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.connect(endpoint)
    return s
