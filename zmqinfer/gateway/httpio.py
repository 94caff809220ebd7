"""Reading request bodies and writing SSE events under deadlines (DESIGN §5).

A client that sends its headers and then trickles (or never sends) its body, or that opens a
stream and stops reading, must cost its own connection only: the body is read before the
request takes an admission slot and within BODY_READ_TIMEOUT_S; each event is written within
SSE_WRITE_TIMEOUT_S, after which the connection is cut and the slot freed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from zmqinfer.gateway.fields import RequestError

# A 4 MiB body (the API's limit) takes ~3.5 s at 10 Mbit/s; 10 s leaves room for a slow link
# and still frees a stuck connection long before anyone notices.
BODY_READ_TIMEOUT_S = 10.0
# A stream whose client takes nothing for 10 s (socket buffers full: hundreds of KiB unread) is
# a client that is gone or hostile; a person watching tokens never stalls that long.
SSE_WRITE_TIMEOUT_S = 10.0


class SlowClient(Exception):
    """The client stopped reading the stream: the connection has been cut."""


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The whole body within `timeout` seconds, or a 408 (and the connection closes after it)."""
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} s",
                           code="request_timeout", status=408) from None


async def send_event(request: web.Request, response: web.StreamResponse, payload: dict[str, Any] | bytes,
                     timeout: float) -> None:
    """One SSE event (a JSON payload, or raw bytes) within `timeout`, else SlowClient."""
    data = payload if isinstance(payload, bytes) else (
        b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
    try:
        async with asyncio.timeout(timeout):
            await response.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # unread bytes would keep the write (and the slot) waiting
        raise SlowClient(f"the client read nothing for {timeout:g} s") from None
