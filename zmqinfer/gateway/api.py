"""The OpenAI HTTP API: routes, auth, and JSON/SSE shaping around a `Backend`.

Routes: POST /v1/chat/completions, POST /v1/completions (both stream and non-stream),
GET /v1/models, GET /v1/models/{id}, GET /health, GET /cluster/status, POST /cluster/ping,
GET /openapi.json (openapi.py: the ranges below, documented), GET /metrics (Prometheus,
metrics.py), and the status page and chat (pages.py).

Contract:
* `make_app(backend, api_keys=..., max_concurrent=...)` builds the app. Run it with
  `web.AppRunner(app, handler_cancellation=True)`: a client that disconnects then cancels its
  handler, and the handler's `finally` (an `aclosing` around `backend.generate`) stops the
  generation. Nothing here starts a task of its own.
* Validation and every 400 live in `validate.py`; token ids -> text in `textout.py`; response
  objects in `shapes.py`; body reads and SSE writes under deadlines in `httpio.py` (a body is
  read before the request takes an admission slot; a stalled body is a 408, a stream nobody
  reads is cut).
* Who may call it is auth.py's middleware (API keys, protected mode), around every route.
* Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: RequestError -> its
  status (400, 408), RingUnavailable -> 503, RingTimeout -> 504, too many requests -> 429, bodies
  over MAX_BODY_BYTES -> 413, anything else -> 500 with no details (the log has the traceback);
  file paths in ring errors become `<path>`. A ring error after an SSE stream started becomes a `data: {"error": ...}`
  event that ends the stream (no [DONE]).
* A streamed response only starts (headers sent) once the first token is back, so an
  unavailable ring is still a plain 503 rather than an error event.
* Every response carries `x-request-id`; the same id goes to `backend.generate` and every log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp import web
from mlx_lm.tokenizer_utils import TokenizerWrapper

from zmqinfer.clusterstatus import ClusterPing, ClusterStatus
from zmqinfer.gateway import auth, pages
from zmqinfer.gateway.auth import ApiGuard
from zmqinfer.gateway.fields import RequestError, parse_body
from zmqinfer.gateway.httpio import (
    BODY_READ_TIMEOUT_S,
    SSE_WRITE_TIMEOUT_S,
    SlowClient,
    read_body,
    send_event,
)
from zmqinfer.gateway.metrics import METRICS, Metrics, serve_metrics
from zmqinfer.gateway.openapi import openapi
from zmqinfer.gateway.prompt import Plan, plan
from zmqinfer.gateway.scheduler import (
    RETRY_AFTER_S,
    Overloaded,
    RingTimeout,
    RingUnavailable,
    StepNotSent,
)
from zmqinfer.gateway.shapes import ChatShape, CompletionShape
from zmqinfer.gateway.textout import (
    Delta,
    LogprobEntry,
    TextStream,
)
from zmqinfer.gateway.validate import (
    ChatRequest,
    CompletionRequest,
    Options,
    parse_chat,
    parse_completion,
)
from zmqinfer.wire import Sample, SamplingParams

# 4 MiB of JSON is ~1M tokens of text: far past any context length, small enough to buffer.
MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_CONCURRENT = 64  # requests generating at once; more get 429 rather than a queue


class Backend(Protocol):
    model_id: str  # what /v1/models lists and responses echo as "model"
    tokenizer: TokenizerWrapper
    context_length: int  # max prompt + completion tokens

    def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int,
                 request_id: str) -> AsyncGenerator[Sample, None]: ...

    def cluster_status(self) -> ClusterStatus: ...

    async def cluster_ping(self) -> ClusterPing: ...


@dataclass
class _Admission:
    """Requests in flight. Plain counter: handlers all run on the one event loop."""

    limit: int
    active: int = 0
    body_timeout: float = BODY_READ_TIMEOUT_S
    write_timeout: float = SSE_WRITE_TIMEOUT_S


BACKEND = web.AppKey[Backend]("backend")
ADMISSION = web.AppKey("admission", _Admission)
STARTED = web.AppKey("started", int)  # "created" of /v1/models
REQUEST_ID = web.RequestKey("request_id", str)
LOG: web.RequestKey[Any] = web.RequestKey("log")  # structlog bound logger

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}  # tells nginx-style proxies not to buffer the stream


def make_app(backend: Backend, *, api_keys: frozenset[str] = frozenset(),
             max_concurrent: int = DEFAULT_MAX_CONCURRENT, body_timeout: float = BODY_READ_TIMEOUT_S,
             write_timeout: float = SSE_WRITE_TIMEOUT_S, metrics: Metrics | None = None,
             guard: ApiGuard | None = None) -> web.Application:
    """The API over `backend`; serve it with `web.AppRunner(app, handler_cancellation=True)`.
    `metrics`: the series to record into (the gateway's own; by default a fresh set).
    `guard` (auth.py) decides who may call it; `api_keys` is shorthand for a guard of those keys."""
    guard = guard or ApiGuard.from_keys({f"key:{i}": k for i, k in enumerate(sorted(api_keys), 1)})
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[_frame, auth.middleware(guard, lambda st, msg, code: _error(st, msg, code=code))])
    app[BACKEND] = backend
    app[ADMISSION] = _Admission(max_concurrent, body_timeout=body_timeout, write_timeout=write_timeout)
    app[STARTED] = int(time.time())
    app[METRICS] = metrics or Metrics(backend.model_id, backend.cluster_status, backend.context_length)
    app.on_response_prepare.append(_add_request_id)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/cluster/status", cluster_status)
    app.router.add_post("/cluster/ping", cluster_ping)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/metrics", serve_metrics)
    pages.add_routes(app.router)
    return app


# ---- errors, auth, request ids ----------------------------------------------------------------


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error(status: int, message: str, **kw: Any) -> web.Response:
    return web.json_response(error_body(message, **kw), status=status)


# A file path in an error (a node's load failure, say) tells a client about our disks, not its request.
_PATH = re.compile(r"(?<![\w:/.])(?:~|\.{1,2})?/(?:[^\s/'\"]+/)*[^\s/'\",)]*")


def _ring_error(e: RingUnavailable | RingTimeout | StepNotSent) -> tuple[int, dict[str, Any]]:
    text = _PATH.sub("<path>", str(e))
    if isinstance(e, StepNotSent):
        return 500, error_body(f"this request could not be sent to the ring: {text}",
                               type="server_error", code="internal_error")
    if isinstance(e, RingTimeout):
        return 504, error_body(f"the inference ring timed out: {text}", type="server_error",
                               code="ring_timeout")
    return 503, error_body(f"the inference ring is unavailable: {text}", type="server_error",
                           code="ring_unavailable")


@web.middleware
async def _frame(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id and OpenAI-shaped errors for everything raised before a stream starts."""
    request_id = f"req-{secrets.token_hex(12)}"
    request[REQUEST_ID] = request_id
    request[LOG] = structlog.get_logger().bind(request_id=request_id)
    try:
        return await handler(request)
    except Overloaded as e:  # the admission queue is full: the client may retry, and when
        request[LOG].info("request refused", status=429, error=str(e))
        return web.json_response(error_body(str(e), type="rate_limit_error", code="rate_limit_exceeded"),
                                 status=429, headers={"Retry-After": str(e.retry_after)})
    except RequestError as e:
        request[LOG].info("request refused", status=e.status, error=e.message)
        response = _error(e.status, e.message, param=e.param, code=e.code)
        if e.status == 429:
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        if e.status == 408:
            response.force_close()  # the rest of that body may still come: not a request
        return response
    except (RingUnavailable, RingTimeout, StepNotSent) as e:
        status, body = _ring_error(e)
        request[LOG].warning("ring error", status=status, error=str(e))
        return web.json_response(body, status=status)
    except web.HTTPException as e:  # 404, 405, 413 from aiohttp itself: same shape as ours
        if e.status < 400:
            raise
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        message = (f"the request body is too large ({e.text})" if e.status == 413
                   else f"{request.method} {request.path}: {e.reason}")
        return web.json_response(error_body(message, code=e.reason.lower().replace(" ", "_")),
                                 status=e.status, headers=allow)
    except Exception:  # a bug must cost this request a 500 in OpenAI's shape, never a traceback
        request[LOG].exception("internal error")
        return _error(500, f"internal error (request {request_id}); the server log has the details",
                      type="server_error", code="internal_error")


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["x-request-id"] = request[REQUEST_ID]


@contextlib.contextmanager
def _admitted(request: web.Request) -> Iterator[None]:
    admission = request.app[ADMISSION]
    if admission.active >= admission.limit:
        raise RequestError(f"too many requests in flight (limit {admission.limit}); retry later",
                           code="rate_limit_exceeded", status=429)
    admission.active += 1
    try:
        yield
    finally:
        admission.active -= 1


# ---- completions ------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request, request.app[ADMISSION].body_timeout)  # before taking a slot
    with _admitted(request):
        req = parse_chat(parse_body(raw))
        shape = ChatShape(request[REQUEST_ID], request.app[BACKEND].model_id, req.options)
        return await _complete(request, req, shape)


async def completions(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request, request.app[ADMISSION].body_timeout)
    with _admitted(request):
        req = parse_completion(parse_body(raw))
        shape = CompletionShape(request[REQUEST_ID], request.app[BACKEND].model_id, req.options)
        return await _complete(request, req, shape)


async def _complete(request: web.Request, req: ChatRequest | CompletionRequest,
                    shape: ChatShape | CompletionShape) -> web.StreamResponse:
    backend, log = request.app[BACKEND], request[LOG]
    timer = request.app[METRICS].timer()  # from arrival, as vLLM times TTFT and e2e
    # Tokenizing (and chat templating) a long prompt takes milliseconds: keep it off the loop.
    p = await asyncio.to_thread(plan, req, backend.tokenizer, backend.context_length)
    opts = req.options
    text = TextStream(backend.tokenizer, stop=opts.stop, max_tokens=p.max_tokens,
                      logprobs=opts.logprobs is not None,
                      keep_leading_space=isinstance(req, CompletionRequest))
    log.info("generate", prompt_tokens=len(p.prompt), max_tokens=p.max_tokens, stream=opts.stream,
             api_key=request.get(auth.KEY_NAME))  # the key's name, never the key
    started = time.monotonic()
    generation = timer.stream(backend.generate(list(p.prompt), opts.sampling, p.max_tokens,
                                               request[REQUEST_ID]), len(p.prompt))
    aborted = False
    try:
        async with contextlib.aclosing(generation) as samples:
            if opts.stream:
                return await _stream(request, samples, text, shape, opts, p)
            return await _collect(samples, text, shape, p)
    except asyncio.CancelledError:
        aborted = True
        log.info("client disconnected", completion_tokens=text.completion_tokens)
        raise
    finally:
        timer.finish(text.finish_reason, aborted)
        log.info("done", finish_reason=text.finish_reason, completion_tokens=text.completion_tokens,
                 seconds=round(time.monotonic() - started, 3))


async def _run(samples: AsyncIterator[Sample], text: TextStream,
               emit: Callable[[Delta], Awaitable[None]]) -> None:
    """Feed samples through `text` until it reports a finish reason, emitting every delta."""
    async for sample in samples:
        delta = text.add(sample)
        await emit(delta)
        if delta.finish_reason is not None:
            return  # stop string, EOS or max_tokens: the caller's aclosing ends the generation
    await emit(text.finish())


async def _collect(samples: AsyncIterator[Sample], text: TextStream,
                   shape: ChatShape | CompletionShape, p: Plan) -> web.Response:
    pieces: list[str] = []
    entries: list[LogprobEntry] = []

    async def emit(delta: Delta) -> None:
        pieces.append(delta.text)
        entries.extend(delta.logprobs)

    await _run(samples, text, emit)
    return web.json_response(shape.body("".join(pieces), entries, text.finish_reason,
                                        _usage(p, text)))


async def _stream(request: web.Request, samples: AsyncIterator[Sample], text: TextStream,
                  shape: ChatShape | CompletionShape, opts: Options,
                  p: Plan) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)
    timeout = request.app[ADMISSION].write_timeout

    async def send(payload: dict[str, Any] | bytes) -> None:
        await send_event(request, response, payload, timeout)

    async def emit(delta: Delta) -> None:
        if not response.prepared:  # first token: only now is success certain enough to say 200
            await response.prepare(request)
            for chunk in shape.start():
                await send(chunk)
        for chunk in shape.chunks(delta):
            await send(chunk)

    try:
        await _run(samples, text, emit)
        if opts.include_usage:
            await send(shape.usage_chunk(_usage(p, text)))
        await send(b"data: [DONE]\n\n")
    except (RingUnavailable, RingTimeout, StepNotSent) as e:
        if not response.prepared:
            raise  # still time for a proper status code
        status, body = _ring_error(e)
        request[LOG].warning("ring error mid-stream", status=status, error=str(e))
        await send(body)
    except SlowClient as e:  # cut off: its slot and its sequence are freed now
        request[LOG].warning("client stopped reading the stream", error=str(e))
        return response
    except ConnectionResetError:  # client went away between two writes; nothing left to tell it
        request[LOG].info("client disconnected while writing")
        return response
    await response.write_eof()
    return response


def _usage(p: Plan, text: TextStream) -> dict[str, int]:
    return {"prompt_tokens": len(p.prompt), "completion_tokens": text.completion_tokens,
            "total_tokens": len(p.prompt) + text.completion_tokens}


# ---- models, health, cluster ------------------------------------------------------------------


def _model_card(app: web.Application) -> dict[str, Any]:
    return {"id": app[BACKEND].model_id, "object": "model", "created": app[STARTED],
            "owned_by": "zmqinfer"}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app)]})


async def model(request: web.Request) -> web.Response:
    wanted = request.match_info["model_id"]
    if wanted != request.app[BACKEND].model_id:
        return _error(404, f"model {wanted!r} not found; this server serves"
                      f" {request.app[BACKEND].model_id!r}", param="model", code="model_not_found")
    return web.json_response(_model_card(request.app))


async def health(request: web.Request) -> web.Response:
    status = request.app[BACKEND].cluster_status()
    if status.get("ready"):
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unavailable",
                              "reason": str(status.get("reason") or "the ring is not ready")},
                             status=503)


async def cluster_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[BACKEND].cluster_status())


async def cluster_ping(request: web.Request) -> web.Response:
    return web.json_response(await request.app[BACKEND].cluster_ping())
