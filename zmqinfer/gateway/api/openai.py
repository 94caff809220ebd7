"""The OpenAI dialect: /v1/chat/completions, /v1/completions (streamed or whole) and /v1/models,
and OpenAI's response objects (chat.completion(.chunk), text_completion).

A request goes: body (read under its deadline, before it takes a slot) -> validate.py's frozen
request -> prompt.py's token ids and budget -> `backend.generate` -> textout.py's deltas -> a
shape (shape.py: the ones below, or another dialect's), whole or streamed. `complete` is that
path, shared by every dialect (anthropic.py, responses.py and ollama.py translate into it). A
streamed response only starts (headers sent) once the first token is back, so an unavailable
ring is still a plain 503 rather than an error event; a ring error after the stream started
becomes the shape's error event (here `data: {"error": ...}`) that ends the stream (no
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
    API,
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
from zmqinfer.gateway.api.shape import Outcome, Shape, is_served, listed_names, sse
from zmqinfer.gateway.api.validate import (
    ChatRequest,
    CompletionRequest,
    Options,
    parse_chat,
    parse_completion,
)
from zmqinfer.gateway.errors import RingTimeout, RingUnavailable, StepNotSent
from zmqinfer.gateway import prefixes
from zmqinfer.gateway.markup import ChatText, chat_text
from zmqinfer.gateway.metrics import METRICS
from zmqinfer.gateway.prompt import plan
from zmqinfer.gateway.textout import (
    Delta,
    LogprobEntry,
    TextStream,
    ToolCallDelta,
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
        return await complete(request, req, shape)


async def completions(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request, request.app[ADMISSION].body_timeout)
    with admitted(request):
        req = parse_completion(parse_body(raw))
        shape = CompletionShape(request[REQUEST_ID], request.app[BACKEND].model_id, req.options)
        return await complete(request, req, shape)


async def complete(request: web.Request, req: ChatRequest | CompletionRequest,
                   shape: Shape) -> web.StreamResponse:
    """Run `req` on the ring and answer in `shape`'s dialect (shape.py), whole or streamed.
    Every dialect's generating route ends here: one path for limits, metrics, logs, errors."""
    backend, log = request.app[BACKEND], request[LOG]
    api = request.get(API, "openai")  # which dialect: a label of the metrics, a field of the logs
    timer = request.app[METRICS].timer(api)  # from arrival, as vLLM times TTFT and e2e
    # Tokenizing (and chat templating) a long prompt takes milliseconds: keep it off the loop.
    p = await asyncio.to_thread(plan, req, backend.tokenizer, backend.context_length)
    opts = req.options
    plain = TextStream(backend.tokenizer, stop=opts.stop, logprobs=opts.logprobs is not None,
                       keep_leading_space=isinstance(req, CompletionRequest))
    # A chat's reasoning and tool calls are split out of its text (markup.py).
    text = chat_text(req, backend.tokenizer, p.prompt, plain) if isinstance(req, ChatRequest) else plain
    log.info("generate", prompt_tokens=len(p.prompt), max_tokens=p.max_tokens, stream=opts.stream,
             api=api, api_key=request.get(auth.KEY_NAME))  # the key's name, never the key
    started = time.monotonic()
    # Whose cached prefixes it may use (its key's, never another's), and how many it did.
    cache = prefixes.enter(request.get(auth.KEY_NAME))
    generation = timer.stream(backend.generate(list(p.prompt), p.sampling, p.max_tokens,
                                               request[REQUEST_ID]), len(p.prompt))
    outcome = Outcome(prompt_tokens=len(p.prompt), cache=cache)
    aborted = False
    try:
        async with contextlib.aclosing(generation) as samples:
            if opts.stream:
                return await _stream(request, samples, text, shape, outcome)
            await _run(samples, text, outcome, None)
            return web.json_response(shape.body(outcome))
    except asyncio.CancelledError:
        aborted = True
        log.info("client disconnected", completion_tokens=text.completion_tokens)
        raise
    finally:
        timer.finish(text.finish_reason, aborted)
        log.info("done", finish_reason=text.finish_reason, completion_tokens=text.completion_tokens,
                 seconds=round(time.monotonic() - started, 3))


async def _run(samples: AsyncIterator[Sample], text: TextStream | ChatText, outcome: Outcome,
               emit: Callable[[Delta], Awaitable[None]] | None) -> None:
    """Feed samples through `text` until it reports a finish reason, gathering every delta into
    `outcome` and emitting it (streams)."""

    async def step(delta: Delta) -> None:
        outcome.add(delta)
        outcome.completion_tokens = text.completion_tokens
        outcome.stop_sequence = text.stop_string
        if emit is not None:
            await emit(delta)

    async for sample in samples:
        delta = text.add(sample)
        await step(delta)
        if delta.finish_reason is not None:
            return  # a stop string or EOS: the caller's aclosing ends the generation
    await step(text.finish())


async def _stream(request: web.Request, samples: AsyncIterator[Sample], text: TextStream | ChatText,
                  shape: Shape, outcome: Outcome) -> web.StreamResponse:
    response = web.StreamResponse(headers=shape.headers)
    timeout = request.app[ADMISSION].write_timeout

    async def send(frames: list[bytes]) -> None:
        for frame in frames:
            await send_event(request, response, frame, timeout)

    async def emit(delta: Delta) -> None:
        if not response.prepared:  # first token: only now is success certain enough to say 200
            await response.prepare(request)
            await send(shape.start(outcome))
        await send(shape.chunks(delta))

    try:
        await _run(samples, text, outcome, emit)
        await send(shape.finish(outcome))
    except (RingUnavailable, RingTimeout, StepNotSent) as e:
        if not response.prepared:
            raise  # still time for a proper status code
        status, body = ring_error(e)
        request[LOG].warning("ring error mid-stream", status=status, error=str(e))
        await send([shape.error(status, body)])
    except SlowClient as e:  # cut off: its slot and its sequence are freed now
        request[LOG].warning("client stopped reading the stream", error=str(e))
        return response
    except ConnectionResetError:  # client went away between two writes; nothing left to tell it
        request[LOG].info("client disconnected while writing")
        return response
    await response.write_eof()
    return response


# ---- models, health, cluster ------------------------------------------------------------------


def _model_card(app: web.Application) -> dict[str, Any]:
    """OpenAI's model object, and what the served model is (family, quantization, context
    length, parameters) as extra fields, which OpenAI's clients keep and otherwise ignore."""
    info = app[BACKEND].model_info
    return {"id": app[BACKEND].model_id, "object": "model", "created": app[STARTED],
            "owned_by": "zmqinfer", **(info or {})}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        _model_card(request.app) | {"id": name} for name in listed_names(request.app)]})


async def model(request: web.Request) -> web.Response:
    wanted = request.match_info["model_id"]
    if not is_served(request.app, wanted):  # the served model's id, or an alias of it
        return error(404, f"model {wanted!r} not found; this server serves"
                      f" {request.app[BACKEND].model_id!r}", param="model", code="model_not_found")
    return web.json_response(_model_card(request.app) | {"id": wanted})


# ---- OpenAI's response objects ---------------------------------------------------------------


class ChatShape:
    """chat.completion and chat.completion.chunk objects."""

    headers = SSE_HEADERS

    def __init__(self, request_id: str, model_id: str, opts: Options) -> None:
        self._head = {"id": "chatcmpl-" + request_id.removeprefix("req-"),
                      "created": int(time.time()), "model": model_id}
        self._logprobs = opts.logprobs is not None
        self._include_usage = opts.include_usage

    def body(self, outcome: Outcome) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": outcome.text}
        if outcome.reasoning:
            message["reasoning_content"] = outcome.reasoning
        if outcome.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in outcome.tool_calls]
            message["content"] = outcome.text or None  # OpenAI's: null when the turn is only calls
        choice = {"index": 0, "message": message,
                  "logprobs": chat_logprobs(outcome.entries) if self._logprobs else None,
                  "finish_reason": outcome.finish_reason}
        return self._head | {"object": "chat.completion", "choices": [choice],
                             "usage": outcome.usage()}

    def start(self, outcome: Outcome) -> list[bytes]:
        return [sse(self._chunk({"role": "assistant", "content": ""}, (), None))]

    def chunks(self, delta: Delta) -> list[bytes]:
        out = []
        if delta.reasoning:
            out.append(sse(self._chunk({"reasoning_content": delta.reasoning}, (), None)))
        if delta.text or delta.logprobs:
            out.append(sse(self._chunk({"content": delta.text}, delta.logprobs, None)))
        if delta.tool_calls:
            out.append(sse(self._chunk({"tool_calls": [_call_piece(c) for c in delta.tool_calls]},
                                       (), None)))
        if delta.finish_reason is not None:
            out.append(sse(self._chunk({}, (), delta.finish_reason)))
        return out

    def finish(self, outcome: Outcome) -> list[bytes]:
        return _finish(self._head | {"object": "chat.completion.chunk", "choices": [],
                                     "usage": outcome.usage()}, self._include_usage)

    def error(self, status: int, body: dict[str, Any]) -> bytes:
        return sse(body)  # no [DONE] after it: the stream ended badly

    def _chunk(self, delta: dict[str, Any], entries: tuple[LogprobEntry, ...],
               finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta,
                  "logprobs": chat_logprobs(entries) if self._logprobs and entries else None,
                  "finish_reason": finish}
        return self._head | {"object": "chat.completion.chunk", "choices": [choice]}


def _call_piece(c: ToolCallDelta) -> dict[str, Any]:
    """One streamed piece, as OpenAI sends it: id, type and name only on a call's first."""
    if c.id is None:
        return {"index": c.index, "function": {"arguments": c.arguments}}
    return {"index": c.index, "id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": c.arguments}}


class CompletionShape:
    """text_completion objects (streamed chunks have the same object name)."""

    headers = SSE_HEADERS

    def __init__(self, request_id: str, model_id: str, opts: Options) -> None:
        self._head = {"id": "cmpl-" + request_id.removeprefix("req-"),
                      "object": "text_completion", "created": int(time.time()), "model": model_id}
        self._logprobs = opts.logprobs is not None
        self._include_usage = opts.include_usage

    def body(self, outcome: Outcome) -> dict[str, Any]:
        return self._head | {"choices": [self._choice(outcome.text, outcome.entries,
                                                      outcome.finish_reason)],
                             "usage": outcome.usage()}

    def start(self, outcome: Outcome) -> list[bytes]:
        return []  # legacy completions have no role chunk

    def chunks(self, delta: Delta) -> list[bytes]:
        if not (delta.text or delta.logprobs or delta.finish_reason):
            return []
        return [sse(self._head | {"choices": [self._choice(delta.text, delta.logprobs,
                                                           delta.finish_reason)]})]

    def finish(self, outcome: Outcome) -> list[bytes]:
        return _finish(self._head | {"choices": [], "usage": outcome.usage()}, self._include_usage)

    def error(self, status: int, body: dict[str, Any]) -> bytes:
        return sse(body)

    def _choice(self, text: str, entries: tuple[LogprobEntry, ...] | list[LogprobEntry],
                finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text,
                "logprobs": completion_logprobs(entries) if self._logprobs else None,
                "finish_reason": finish}


def _finish(usage_chunk: dict[str, Any], include_usage: bool) -> list[bytes]:
    return ([sse(usage_chunk)] if include_usage else []) + [b"data: [DONE]\n\n"]
