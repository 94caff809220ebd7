"""The HTTP API as one aiohttp app: the dialects' routes (openai.py, anthropic.py, responses.py,
ollama.py and ollama_models.py) beside the gateway's own (/health, /cluster/status,
/cluster/ping, /openapi.json, /metrics, the status page and chat).

Contract:
* `make_app(backend, api_keys=..., max_concurrent=...)` builds the app. Run it with
  `web.AppRunner(app, handler_cancellation=True)`: a client that disconnects then cancels its
  handler, and the handler's `finally` (an `aclosing` around `backend.generate`) stops the
  generation. Nothing here starts a task of its own.
* Validation and every 400 live in `validate.py`; shared keys, body reads and SSE writes under
  deadlines in `http.py` (a stalled body is a 408, a stream nobody reads is cut).
* Who may call it is auth.py's middleware (API keys, protected mode), around every route.
* Errors raised before a stream starts are shaped here (`_frame`): RequestError -> its status
  (400, 408, 429), the ring's errors -> 503/504/500 (http.ring_error), Overloaded -> 429 with
  Retry-After, bodies over MAX_BODY_BYTES -> 413, anything else -> 500 with no details (the log
  has the traceback); each in the error body of the request's dialect (refusal.py).
* The other dialects' generating routes are given `openai.complete` (shape.py says why).
* Every response carries `x-request-id`; the same id goes to `backend.generate` and every log line.
"""

from __future__ import annotations

import secrets
import time

import structlog
from aiohttp import web

from zmqinfer.gateway.api import (
    anthropic,
    auth,
    cors,
    ollama,
    ollama_models,
    openai,
    pages,
    responses,
)
from zmqinfer.gateway.api.auth import ApiGuard
from zmqinfer.gateway.api.fields import RequestError
from zmqinfer.gateway.api.http import (
    ADMISSION,
    BACKEND,
    BODY_READ_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENT,
    LOG,
    MAX_BODY_BYTES,
    REQUEST_ID,
    SSE_WRITE_TIMEOUT_S,
    STARTED,
    Admission,
    Backend,
    Handler,
    ring_error,
)
from zmqinfer.gateway.api.openapi import openapi
from zmqinfer.gateway.api.refusal import refuse
from zmqinfer.gateway.api.shape import ALIASES
from zmqinfer.gateway.errors import (
    RETRY_AFTER_S,
    Overloaded,
    RingTimeout,
    RingUnavailable,
    StepNotSent,
)
from zmqinfer.gateway.metrics import METRICS, Metrics, serve_metrics


def make_app(backend: Backend, *, api_keys: frozenset[str] = frozenset(),
             max_concurrent: int = DEFAULT_MAX_CONCURRENT, body_timeout: float = BODY_READ_TIMEOUT_S,
             write_timeout: float = SSE_WRITE_TIMEOUT_S, metrics: Metrics | None = None,
             guard: ApiGuard | None = None, aliases: tuple[str, ...] = ()) -> web.Application:
    """The API over `backend`; serve it with `web.AppRunner(app, handler_cancellation=True)`.
    `metrics`: the series to record into (the gateway's own; by default a fresh set).
    `guard` (auth.py) decides who may call it; `api_keys` is shorthand for a guard of those keys.
    `aliases`: model names (globs) the served model answers to ([gateway] aliases)."""
    guard = guard or ApiGuard.from_keys({f"key:{i}": k for i, k in enumerate(sorted(api_keys), 1)})
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[cors.middleware(guard.cors_origins), _frame, auth.middleware(
                              guard, lambda rq, st, msg, code: refuse(rq, st, msg, code=code))])
    app[BACKEND] = backend
    app[ADMISSION] = Admission(max_concurrent, body_timeout=body_timeout, write_timeout=write_timeout)
    app[STARTED] = int(time.time())
    app[METRICS] = metrics or Metrics(backend.model_id, backend.cluster_status, backend.context_length)
    app.on_response_prepare.append(_add_request_id)
    app[ALIASES] = aliases
    app.on_response_prepare.append(cors.add_headers)
    openai.add_routes(app.router)
    # The other dialects translate into the chat path and end in openai.complete (shape.py).
    anthropic.add_routes(app.router, openai.complete)
    responses.add_routes(app.router, openai.complete)
    ollama.add_routes(app.router, openai.complete)
    ollama_models.add_routes(app.router)
    app.router.add_get("/health", health)
    app.router.add_get("/cluster/status", cluster_status)
    app.router.add_post("/cluster/ping", cluster_ping)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/metrics", serve_metrics)
    pages.add_routes(app.router)
    return app


@web.middleware
async def _frame(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id and errors in the request's dialect (refusal.py) for everything raised
    before a stream starts."""
    request_id = f"req-{secrets.token_hex(12)}"
    request[REQUEST_ID] = request_id
    request[LOG] = structlog.get_logger().bind(request_id=request_id)
    try:
        return await handler(request)
    except Overloaded as e:  # the admission queue is full: the client may retry, and when
        request[LOG].info("request refused", status=429, error=str(e))
        return refuse(request, 429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                      headers={"Retry-After": str(e.retry_after)})
    except RequestError as e:
        request[LOG].info("request refused", status=e.status, error=e.message)
        response = refuse(request, e.status, e.message, param=e.param, code=e.code)
        if e.status == 429:
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        if e.status == 408:
            response.force_close()  # the rest of that body may still come: not a request
        return response
    except (RingUnavailable, RingTimeout, StepNotSent) as e:
        status, body = ring_error(e)
        request[LOG].warning("ring error", status=status, error=str(e))
        # A 503 is a ring that will be back (a node rejoining, a failover): say when to retry.
        return refuse(request, status, body["error"]["message"], type=body["error"]["type"],
                      code=body["error"]["code"],
                      headers={"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None)
    except web.HTTPException as e:  # 404, 405, 413 from aiohttp itself: same shape as ours
        if e.status < 400:
            raise
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        message = (f"the request body is too large ({e.text})" if e.status == 413
                   else f"{request.method} {request.path}: {e.reason}")
        if e.status == 404:
            message += _did_you_mean(request)
        return refuse(request, e.status, message, code=e.reason.lower().replace(" ", "_"),
                      headers=allow)
    except Exception:  # a bug must cost this request a 500 in its dialect, never a traceback
        request[LOG].exception("internal error")
        return refuse(request, 500, f"internal error (request {request_id}); the server log has"
                      " the details", type="server_error", code="internal_error")


def _did_you_mean(request: web.Request) -> str:
    """A client configured without /v1 (or with it twice) is told the path it meant."""
    path = request.path.rstrip("/")
    routes = {r.canonical for r in request.app.router.resources() if r.canonical.startswith("/v1/")}
    near = [r for r in routes if "{" not in r and path.endswith(r.removeprefix("/v1"))]
    if near:
        return f"; did you mean {max(near, key=len)}? (the OpenAI API is under /v1)"
    return "; the OpenAI API is under /v1 (POST /v1/chat/completions, GET /v1/models)"


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["x-request-id"] = request[REQUEST_ID]


async def health(request: web.Request) -> web.Response:
    status = request.app[BACKEND].cluster_status()
    if status.get("ready"):
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unavailable",
                              "reason": str(status.get("reason") or "the ring is not ready")},
                             status=503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def cluster_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[BACKEND].cluster_status())


async def cluster_ping(request: web.Request) -> web.Response:
    return web.json_response(await request.app[BACKEND].cluster_ping())
