"""What every route of the HTTP API shares: the `Backend` it serves, the app's keys, admission by
concurrency, error bodies, and reading bodies and writing SSE events under deadlines (DESIGN §5).

A client that sends its headers and then trickles (or never sends) its body, or that opens a
stream and stops reading, must cost its own connection only: the body is read before the
request takes an admission slot and within BODY_READ_TIMEOUT_S; each event is written within
SSE_WRITE_TIMEOUT_S, after which the connection is cut and the slot freed.

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`, the shape our clients
parse: RingUnavailable -> 503, RingTimeout -> 504, StepNotSent -> 500; file paths in ring errors
become `<path>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from mlx_lm.tokenizer_utils import TokenizerWrapper

from zmqinfer.clusterstatus import ClusterPing, ClusterStatus, ModelInfo
from zmqinfer.gateway.api.fields import RequestError
from zmqinfer.gateway.errors import RingTimeout, RingUnavailable, StepNotSent
from zmqinfer.protocol.wire import Sample, SamplingParams

# 4 MiB of JSON is ~1M tokens of text: far past any context length, small enough to buffer.
MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_CONCURRENT = 64  # requests generating at once; more get 429 rather than a queue
# A 4 MiB body (the API's limit) takes ~3.5 s at 10 Mbit/s; 10 s leaves room for a slow link
# and still frees a stuck connection long before anyone notices.
BODY_READ_TIMEOUT_S = 10.0
# A stream whose client takes nothing for 10 s (socket buffers full: hundreds of KiB unread) is
# a client that is gone or hostile; a person watching tokens never stalls that long.
SSE_WRITE_TIMEOUT_S = 10.0


class Backend(Protocol):
    model_id: str  # what /v1/models lists and responses echo as "model"
    tokenizer: TokenizerWrapper
    context_length: int  # max prompt + completion tokens
    model_info: ModelInfo | None  # family, quantization, parameters (model/facts.py); None: unknown

    def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int,
                 request_id: str) -> AsyncGenerator[Sample, None]: ...

    def cluster_status(self) -> ClusterStatus: ...

    def cluster_ping(self) -> Awaitable[ClusterPing]: ...


@dataclass
class RingBackend:
    """A Backend assembled from the gateway's parts: the scheduler generates, the cluster view
    reports (gateway/process.py wires it; nothing passes a call through)."""

    model_id: str
    tokenizer: TokenizerWrapper
    context_length: int
    model_info: ModelInfo | None
    generate: Callable[[list[int], SamplingParams, int, str], AsyncGenerator[Sample, None]]
    cluster_status: Callable[[], ClusterStatus]
    cluster_ping: Callable[[], Awaitable[ClusterPing]]


@dataclass
class Admission:
    """Requests in flight. Plain counter: handlers all run on the one event loop."""

    limit: int
    active: int = 0
    body_timeout: float = BODY_READ_TIMEOUT_S
    write_timeout: float = SSE_WRITE_TIMEOUT_S


BACKEND = web.AppKey[Backend]("backend")
ADMISSION = web.AppKey("admission", Admission)
STARTED = web.AppKey("started", int)  # "created" of /v1/models
REQUEST_ID = web.RequestKey("request_id", str)
LOG: web.RequestKey[Any] = web.RequestKey("log")  # structlog bound logger
API = web.RequestKey("api", str)  # the dialect a request speaks (metrics' `api` label); default openai

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}  # tells nginx-style proxies not to buffer the stream


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error(status: int, message: str, **kw: Any) -> web.Response:
    return web.json_response(error_body(message, **kw), status=status)


# A file path in an error (a node's load failure, say) tells a client about our disks, not its request.
_PATH = re.compile(r"(?<![\w:/.])(?:~|\.{1,2})?/(?:[^\s/'\"]+/)*[^\s/'\",)]*")


def ring_error(e: RingUnavailable | RingTimeout | StepNotSent) -> tuple[int, dict[str, Any]]:
    text = _PATH.sub("<path>", str(e))
    if isinstance(e, StepNotSent):
        return 500, error_body(f"this request could not be sent to the ring: {text}",
                               type="server_error", code="internal_error")
    if isinstance(e, RingTimeout):
        return 504, error_body(f"the inference ring timed out: {text}", type="server_error",
                               code="ring_timeout")
    return 503, error_body(f"the inference ring is unavailable: {text}", type="server_error",
                           code="ring_unavailable")


@contextlib.contextmanager
def admitted(request: web.Request) -> Iterator[None]:
    admission = request.app[ADMISSION]
    if admission.active >= admission.limit:
        raise RequestError(f"too many requests in flight (limit {admission.limit}); retry later",
                           code="rate_limit_exceeded", status=429)
    admission.active += 1
    try:
        yield
    finally:
        admission.active -= 1


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
