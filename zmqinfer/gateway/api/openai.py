"""The OpenAI dialect: /v1/chat/completions, /v1/completions (streamed or whole) and /v1/models,
and OpenAI's response objects (chat.completion(.chunk), text_completion).

A request goes: body (read under its deadline, before it takes a slot) -> validate.py's frozen
request -> prompt.py's token ids and budget -> `backend.generate` -> textout.py's deltas -> the
shapes below, whole or as SSE. A streamed response only starts (headers sent) once the first
token is back, so an unavailable ring is still a plain 503 rather than an error event; a ring
error after the stream started becomes a `data: {"error": ...}` event that ends the stream (no
[DONE]). The handler's `aclosing` around the generation stops it when the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from zmqinfer.gateway.api import auth
from zmqinfer.gateway.api.fields import parse_body
from zmqinfer.gateway.api.http import (
    ADMISSION,
    BACKEND,
    LOG,
    REQUEST_ID,
    SSE_HEADERS,
    STARTED,
    SlowClient,
    admitted,
    error,
    read_body,
    ring_error,
    send_event,
)
from zmqinfer.gateway.api.validate import (
    ChatRequest,
    CompletionRequest,
    Options,
    parse_chat,
    parse_completion,
)
from zmqinfer.gateway.errors import RingTimeout, RingUnavailable, StepNotSent
from zmqinfer.gateway.metrics import METRICS
from zmqinfer.gateway.prompt import Plan, plan
from zmqinfer.gateway.textout import (
    Delta,
    LogprobEntry,
    TextStream,
    chat_logprobs,
    completion_logprobs,
)
from zmqinfer.protocol.wire import Sample


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_post("/v1/completions", completions)
    router.add_get("/v1/models", models)
    router.add_get("/v1/models/{model_id}", model)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request, request.app[ADMISSION].body_timeout)  # before taking a slot
    with admitted(request):
        req = parse_chat(parse_body(raw))
        shape = ChatShape(request[REQUEST_ID], request.app[BACKEND].model_id, req.options)
        return await _complete(request, req, shape)


async def completions(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request, request.app[ADMISSION].body_timeout)
    with admitted(request):
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
    response = web.StreamResponse(headers=SSE_HEADERS)
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
        status, body = ring_error(e)
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
        return error(404, f"model {wanted!r} not found; this server serves"
                      f" {request.app[BACKEND].model_id!r}", param="model", code="model_not_found")
    return web.json_response(_model_card(request.app))


# ---- OpenAI's response objects ---------------------------------------------------------------


class ChatShape:
    """chat.completion and chat.completion.chunk objects."""

    def __init__(self, request_id: str, model_id: str, opts: Options) -> None:
        self._head = {"id": "chatcmpl-" + request_id.removeprefix("req-"),
                      "created": int(time.time()), "model": model_id}
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


class CompletionShape:
    """text_completion objects (streamed chunks have the same object name)."""

    def __init__(self, request_id: str, model_id: str, opts: Options) -> None:
        self._head = {"id": "cmpl-" + request_id.removeprefix("req-"),
                      "object": "text_completion", "created": int(time.time()), "model": model_id}
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
