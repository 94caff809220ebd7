"""The OpenAI HTTP API: routes, auth, and JSON/SSE shaping around a `Backend`.

Routes: POST /v1/chat/completions, POST /v1/completions (both stream and non-stream),
GET /v1/models, GET /v1/models/{id}, GET /health, GET /cluster/status, POST /cluster/ping.

Contract:
* `make_app(backend, api_keys=..., max_concurrent=...)` builds the app. Run it with
  `web.AppRunner(app, handler_cancellation=True)`: a client that disconnects then cancels its
  handler, and the handler's `finally` (an `aclosing` around `backend.generate`) stops the
  generation. Nothing here starts a task of its own.
* Validation and every 400 live in `validate.py`; token ids -> text in `textout.py`.
* With api_keys, every route except /health needs `Authorization: Bearer <key>` (401).
* Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: RequestError -> its
  status (400), RingUnavailable -> 503, RingTimeout -> 504, too many requests -> 429, bodies over
  MAX_BODY_BYTES -> 413. A ring error after an SSE stream started becomes a `data: {"error": ...}`
  event that ends the stream (no [DONE]).
* A streamed response only starts (headers sent) once the first token is back, so an
  unavailable ring is still a plain 503 rather than an error event.
* Every response carries `x-request-id`; the same id goes to `backend.generate` and every log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp import web
from mlx_lm.tokenizer_utils import TokenizerWrapper

from zmqinfer.clusterstatus import ClusterPing, ClusterStatus
from zmqinfer.gateway.prompt import Plan, plan
from zmqinfer.gateway.scheduler import RETRY_AFTER_S, Overloaded, RingTimeout, RingUnavailable
from zmqinfer.gateway.textout import (
    Delta,
    LogprobEntry,
    TextStream,
    chat_logprobs,
    completion_logprobs,
)
from zmqinfer.gateway.validate import (
    ChatRequest,
    CompletionRequest,
    Options,
    RequestError,
    parse_body,
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


BACKEND = web.AppKey[Backend]("backend")
API_KEYS = web.AppKey("api_keys", frozenset)
ADMISSION = web.AppKey("admission", _Admission)
STARTED = web.AppKey("started", int)  # "created" of /v1/models
REQUEST_ID = web.RequestKey("request_id", str)
LOG: web.RequestKey[Any] = web.RequestKey("log")  # structlog bound logger

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}  # tells nginx-style proxies not to buffer the stream


def make_app(backend: Backend, *, api_keys: frozenset[str] = frozenset(),
             max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> web.Application:
    """The API over `backend`; serve it with `web.AppRunner(app, handler_cancellation=True)`."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_frame])
    app[BACKEND] = backend
    app[API_KEYS] = api_keys
    app[ADMISSION] = _Admission(max_concurrent)
    app[STARTED] = int(time.time())
    app.on_response_prepare.append(_add_request_id)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/cluster/status", cluster_status)
    app.router.add_post("/cluster/ping", cluster_ping)
    return app


# ---- errors, auth, request ids ----------------------------------------------------------------


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error(status: int, message: str, **kw: Any) -> web.Response:
    return web.json_response(error_body(message, **kw), status=status)


def _ring_error(e: RingUnavailable | RingTimeout) -> tuple[int, dict[str, Any]]:
    if isinstance(e, RingTimeout):
        return 504, error_body(f"the inference ring timed out: {e}", type="server_error",
                               code="ring_timeout")
    return 503, error_body(f"the inference ring is unavailable: {e}", type="server_error",
                           code="ring_unavailable")


@web.middleware
async def _frame(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, auth, and OpenAI-shaped errors for everything raised before a stream starts."""
    request_id = f"req-{secrets.token_hex(12)}"
    request[REQUEST_ID] = request_id
    request[LOG] = structlog.get_logger().bind(request_id=request_id)
    keys = request.app[API_KEYS]
    if keys and request.path != "/health" and not _authorised(request, keys):
        return _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                      code="invalid_api_key")
    try:
        return await handler(request)
    except Overloaded as e:  # the admission queue is full: the client may retry, and when
        request[LOG].info("request refused", status=429, error=str(e))
        return web.json_response(error_body(str(e), type="rate_limit_error", code="rate_limit_exceeded"),
                                 status=429, headers={"Retry-After": str(e.retry_after)})
    except RequestError as e:
        request[LOG].info("request refused", status=e.status, error=e.message)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
        return web.json_response(error_body(e.message, param=e.param, code=e.code), status=e.status,
                                 headers=headers)
    except (RingUnavailable, RingTimeout) as e:
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


def _authorised(request: web.Request, keys: frozenset[str]) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    # compare_digest against every key: timing reveals neither the key nor which one matched.
    return sum(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys) > 0


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
    with _admitted(request):
        req = parse_chat(parse_body(await request.read()))
        return await _complete(request, req, _ChatShape(request, req.options))


async def completions(request: web.Request) -> web.StreamResponse:
    with _admitted(request):
        req = parse_completion(parse_body(await request.read()))
        return await _complete(request, req, _CompletionShape(request, req.options))


async def _complete(request: web.Request, req: ChatRequest | CompletionRequest,
                    shape: _ChatShape | _CompletionShape) -> web.StreamResponse:
    backend, log = request.app[BACKEND], request[LOG]
    # Tokenizing (and chat templating) a long prompt takes milliseconds: keep it off the loop.
    p = await asyncio.to_thread(plan, req, backend.tokenizer, backend.context_length)
    opts = req.options
    text = TextStream(backend.tokenizer, stop=opts.stop, max_tokens=p.max_tokens,
                      logprobs=opts.logprobs is not None,
                      keep_leading_space=isinstance(req, CompletionRequest))
    log.info("generate", prompt_tokens=len(p.prompt), max_tokens=p.max_tokens, stream=opts.stream)
    started = time.monotonic()
    generation = backend.generate(list(p.prompt), opts.sampling, p.max_tokens, request[REQUEST_ID])
    try:
        async with contextlib.aclosing(generation) as samples:
            if opts.stream:
                return await _stream(request, samples, text, shape, opts, p)
            return await _collect(samples, text, shape, p)
    except asyncio.CancelledError:
        log.info("client disconnected", completion_tokens=text.completion_tokens)
        raise
    finally:
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
                   shape: _ChatShape | _CompletionShape, p: Plan) -> web.Response:
    pieces: list[str] = []
    entries: list[LogprobEntry] = []

    async def emit(delta: Delta) -> None:
        pieces.append(delta.text)
        entries.extend(delta.logprobs)

    await _run(samples, text, emit)
    return web.json_response(shape.body("".join(pieces), entries, text.finish_reason,
                                        _usage(p, text)))


async def _stream(request: web.Request, samples: AsyncIterator[Sample], text: TextStream,
                  shape: _ChatShape | _CompletionShape, opts: Options,
                  p: Plan) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)

    async def emit(delta: Delta) -> None:
        if not response.prepared:  # first token: only now is success certain enough to say 200
            await response.prepare(request)
            for chunk in shape.start():
                await _send(response, chunk)
        for chunk in shape.chunks(delta):
            await _send(response, chunk)

    try:
        await _run(samples, text, emit)
        if opts.include_usage:
            await _send(response, shape.usage_chunk(_usage(p, text)))
        await response.write(b"data: [DONE]\n\n")
    except (RingUnavailable, RingTimeout) as e:
        if not response.prepared:
            raise  # still time for a proper status code
        status, body = _ring_error(e)
        request[LOG].warning("ring error mid-stream", status=status, error=str(e))
        await _send(response, body)
    except ConnectionResetError:  # client went away between two writes; nothing left to tell it
        request[LOG].info("client disconnected while writing")
        return response
    await response.write_eof()
    return response


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _usage(p: Plan, text: TextStream) -> dict[str, int]:
    return {"prompt_tokens": len(p.prompt), "completion_tokens": text.completion_tokens,
            "total_tokens": len(p.prompt) + text.completion_tokens}


class _ChatShape:
    """chat.completion and chat.completion.chunk objects."""

    def __init__(self, request: web.Request, opts: Options) -> None:
        self._head = {"id": "chatcmpl-" + request[REQUEST_ID].removeprefix("req-"),
                      "created": int(time.time()), "model": request.app[BACKEND].model_id}
        self._logprobs = opts.logprobs is not None

    def body(self, text: str, entries: list[LogprobEntry], finish: str | None,
             usage: dict[str, int]) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": chat_logprobs(entries) if self._logprobs else None,
                  "finish_reason": finish}
        return self._head | {"object": "chat.completion", "choices": [choice], "usage": usage}

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""}, (), None)]

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        out = []
        if delta.text or delta.logprobs:
            out.append(self._chunk({"content": delta.text}, delta.logprobs, None))
        if delta.finish_reason is not None:
            out.append(self._chunk({}, (), delta.finish_reason))
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._head | {"object": "chat.completion.chunk", "choices": [], "usage": usage}

    def _chunk(self, delta: dict[str, Any], entries: tuple[LogprobEntry, ...],
               finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta,
                  "logprobs": chat_logprobs(entries) if self._logprobs and entries else None,
                  "finish_reason": finish}
        return self._head | {"object": "chat.completion.chunk", "choices": [choice]}


class _CompletionShape:
    """text_completion objects (streamed chunks have the same object name)."""

    def __init__(self, request: web.Request, opts: Options) -> None:
        self._head = {"id": "cmpl-" + request[REQUEST_ID].removeprefix("req-"),
                      "object": "text_completion", "created": int(time.time()),
                      "model": request.app[BACKEND].model_id}
        self._logprobs = opts.logprobs is not None

    def body(self, text: str, entries: list[LogprobEntry], finish: str | None,
             usage: dict[str, int]) -> dict[str, Any]:
        return self._head | {"choices": [self._choice(text, entries, finish)], "usage": usage}

    def start(self) -> list[dict[str, Any]]:
        return []  # legacy completions have no role chunk

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        if not (delta.text or delta.logprobs or delta.finish_reason):
            return []
        return [self._head | {"choices": [self._choice(delta.text, delta.logprobs,
                                                       delta.finish_reason)]}]

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._head | {"choices": [], "usage": usage}

    def _choice(self, text: str, entries: tuple[LogprobEntry, ...] | list[LogprobEntry],
                finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text,
                "logprobs": completion_logprobs(entries) if self._logprobs else None,
                "finish_reason": finish}


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
