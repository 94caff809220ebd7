"""Ollama's generating API: POST /api/chat and /api/generate (NDJSON stream by default, one JSON
object with `stream: false`). The model listing routes are ollama_models.py's.

A request is translated into an OpenAI chat body and validated by the chat route's `parse_chat`
(its limits, tools, grammars and reasoning are the chat route's); `/api/generate` with
`raw: true` becomes a legacy completion (no template). `NdjsonShape` writes Ollama's objects:
fragments with `done: false`, then one with `done: true`, done_reason, token counts and
durations in nanoseconds. Tool calls are sent whole (Ollama sends parsed arguments, never a
fragment) in the last fragment before the done object. Errors are `{"error": "..."}`.

Options: num_predict -> max_tokens (-1 and -2, "no limit" and "fill the context", -> the
default budget), temperature, top_k, top_p, min_p, seed, stop, repeat_penalty,
presence_penalty, frequency_penalty; num_ctx larger than the ring's context is a 400 (it cannot
be honoured); the runtime knobs of a local llama.cpp (num_gpu, num_thread, ...) are accepted and
mean nothing here; any other option is refused by name. `format`: "json" -> json_object, a
schema -> json_schema; `think` -> the template's enable_thinking.
"""

from __future__ import annotations

import functools
import json
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from zmqinfer.gateway.api.fields import RequestError, parse_body
from zmqinfer.gateway.api.http import ADMISSION, API, BACKEND, admitted, read_body
from zmqinfer.gateway.api.shape import (
    NDJSON_HEADERS,
    Complete,
    Outcome,
    model_name,
    ndjson,
    only,
    renaming,
    require,
    tool_input,
)
from zmqinfer.gateway.api.validate import parse_chat, parse_completion
from zmqinfer.gateway.textout import Delta

_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k",
            "top_p": "top_p", "min_p": "min_p", "seed": "seed", "stop": "stop",
            "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty"}
# llama.cpp's runtime knobs: how a local process loads and runs its model. The ring decides
# those itself; a client that sends Ollama's defaults must not be refused for it.
_RUNTIME = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep",
                      "use_mmap", "use_mlock", "numa", "low_vram", "vocab_only", "f16_kv",
                      "logits_all", "repeat_last_n"})
# chat field -> ours, in the messages of 400s
RENAMES = {ours: f"options.{theirs}" for theirs, ours in _OPTIONS.items()} | {"response_format": "format"}
_COMMON = frozenset({"model", "format", "options", "stream", "keep_alive", "think"})
_CHAT_FIELDS = _COMMON | {"messages", "tools"}
_GENERATE_FIELDS = _COMMON | {"prompt", "system", "raw", "suffix", "template", "context", "images"}


def add_routes(router: web.UrlDispatcher, complete: Complete) -> None:
    router.add_post("/api/chat", functools.partial(chat, complete=complete))
    router.add_post("/api/generate", functools.partial(generate, complete=complete))


async def chat(request: web.Request, complete: Complete) -> web.StreamResponse:
    return await _serve(request, complete, "message")


async def generate(request: web.Request, complete: Complete) -> web.StreamResponse:
    return await _serve(request, complete, "response")


async def _serve(request: web.Request, complete: Complete, key: str) -> web.StreamResponse:
    request[API] = "ollama"
    raw = await read_body(request, request.app[ADMISSION].body_timeout)  # before taking a slot
    with admitted(request), renaming(RENAMES):
        body = parse_body(raw)
        shape = NdjsonShape(model_name(request.app, body.get("model")), key)
        context = request.app[BACKEND].context_length
        if key == "message":
            translated = chat_body(body, context)
            if not translated["messages"]:  # Ollama's "load the model" call: it is loaded
                return web.json_response(shape.done(shape.piece("", "", None), "load"))
            return await complete(request, parse_chat(translated), shape)
        if body.get("raw") is not None:
            require(body, "raw", bool)
        if body.get("raw"):  # the prompt as is, no template: a legacy completion
            return await complete(request, parse_completion(generate_body(body, context, raw=True)),
                                  shape)
        translated = generate_body(body, context)
        if not translated["messages"]:
            return web.json_response(shape.done(shape.piece("", "", None), "load"))
        return await complete(request, parse_chat(translated), shape)


# ---- request: Ollama -> OpenAI body -----------------------------------------------------------


def chat_body(body: dict[str, Any], context_length: int) -> dict[str, Any]:
    """An /api/chat request as the OpenAI chat body it means, or RequestError."""
    only(body, _CHAT_FIELDS)
    require(body, "model", str)
    out = _common(body, context_length)
    messages = body.get("messages")
    out["messages"] = _messages(require(body, "messages", list)) if messages != [] else []
    if body.get("tools"):
        tools = require(body, "tools", list)
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type", "function") != "function":
                raise RequestError(f"tools[{i}] must be a function tool", param=f"tools[{i}]")
        out["tools"] = [{"type": "function", "function": t.get("function")} for t in tools]
    return out


def generate_body(body: dict[str, Any], context_length: int, raw: bool = False) -> dict[str, Any]:
    """An /api/generate request as an OpenAI chat body (or, raw, a completion body)."""
    only(body, _GENERATE_FIELDS)
    require(body, "model", str)
    for name in ("suffix", "template", "context", "images"):
        if body.get(name):
            raise RequestError(f"{name} is not supported", param=name, code="unsupported_parameter")
    out = _common(body, context_length)
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string", param="prompt", code="invalid_type")
    if raw:
        return out | {"prompt": prompt}
    system = body.get("system")
    out["messages"] = ([{"role": "system", "content": require(body, "system", str)}] if system else []) + (
        [{"role": "user", "content": prompt}] if prompt else [])
    return out


def _common(body: dict[str, Any], context_length: int) -> dict[str, Any]:
    out: dict[str, Any] = {"stream": body.get("stream", True)}  # Ollama streams unless told not to
    options = body.get("options")
    if options is not None:
        only(require(body, "options", dict), set(_OPTIONS) | _RUNTIME, "options.")
        num_ctx = options.get("num_ctx")
        if num_ctx is not None and (type(num_ctx) is not int or num_ctx > context_length):
            raise RequestError(f"options.num_ctx must be an integer of at most {context_length},"
                               f" the ring's context length; got {str(num_ctx)[:20]}",
                               param="options.num_ctx")
        for theirs, ours in _OPTIONS.items():
            if options.get(theirs) is not None:
                out[ours] = options[theirs]
        if out.get("max_tokens") in (-1, -2):  # Ollama's "no limit" and "fill the context"
            del out["max_tokens"]
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format",
                                                                         "schema": fmt}}
    elif fmt not in (None, ""):
        raise RequestError('format must be "json" or a JSON schema', param="format")
    think = body.get("think")
    if think is not None:
        if think not in (True, False, "low", "medium", "high"):
            raise RequestError("think must be true, false, low, medium or high", param="think")
        out["chat_template_kwargs"] = {"enable_thinking": think is not False}
    return out


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's. Ollama's tool calls carry no ids and its tool results name
    the tool instead: each call gets an id here, and each result the id of the earliest
    unanswered call of that tool."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, tool name) of calls not yet answered
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with role and content", param=where)
        only(m, {"role", "content", "images", "tool_calls", "thinking", "tool_name"}, where + ".")
        if m.get("images"):
            raise RequestError(f"{where}.images: image input is not supported (text only)",
                               param=where + ".images", code="unsupported_parameter")
        role, content = m.get("role"), m.get("content") or ""
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string", param=where + ".content",
                               code="invalid_type")
        if role == "tool":
            name = m.get("tool_name")
            at = next((k for k, (_, n) in enumerate(pending) if name is None or n == name), None)
            if at is None:
                raise RequestError(f"{where} is a tool result that answers no earlier tool call",
                                   param=where)
            out.append({"role": "tool", "tool_call_id": pending.pop(at)[0], "content": content})
            continue
        message: dict[str, Any] = {"role": role, "content": content}
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise RequestError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls",
                               code="invalid_type")
        if calls:
            message["tool_calls"] = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"{where}.tool_calls[{j}] must have a function with a name",
                                       param=f"{where}.tool_calls[{j}]")
                call_id = f"call_{i}_{j}"
                pending.append((call_id, fn["name"]))
                arguments = fn.get("arguments") or {}
                message["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": fn["name"], "arguments": arguments if isinstance(arguments, str)
                    else json.dumps(arguments)}})
        out.append(message)
    return out


# ---- response: NDJSON objects -----------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class NdjsonShape:
    """Ollama's chat (`key` "message") or generate (`key` "response") objects."""

    headers = NDJSON_HEADERS

    def __init__(self, model: str, key: str) -> None:
        self._model, self._key = model, key
        self._started = time.monotonic_ns()
        self._first: int | None = None  # when the first token came (prompt evaluated)

    def body(self, outcome: Outcome) -> dict[str, Any]:
        return self.done(self.piece(outcome.text, outcome.reasoning, outcome), _reason(outcome),
                         outcome)

    def start(self, outcome: Outcome) -> list[bytes]:
        self._first = time.monotonic_ns()
        return []

    def chunks(self, delta: Delta) -> list[bytes]:
        if not (delta.text or delta.reasoning):
            return []  # tool calls go out whole, at the end
        return [ndjson(self._head() | self.piece(delta.text, delta.reasoning, None)
                       | {"done": False})]

    def finish(self, outcome: Outcome) -> list[bytes]:
        out = []
        if outcome.tool_calls:
            out.append(ndjson(self._head() | self.piece("", "", outcome) | {"done": False}))
        return out + [ndjson(self.done(self.piece("", "", None), _reason(outcome), outcome))]

    def error(self, status: int, body: dict[str, Any]) -> bytes:
        return ndjson({"error": body["error"]["message"]})

    def done(self, piece: dict[str, Any], reason: str, outcome: Outcome | None = None) -> dict[str, Any]:
        """The last object: the reason and what it cost, in Ollama's counts and nanoseconds."""
        end = time.monotonic_ns()
        first = self._first or end
        stats = {} if outcome is None else {
            "total_duration": end - self._started, "load_duration": 0,
            "prompt_eval_count": outcome.prompt_tokens, "prompt_eval_duration": first - self._started,
            "eval_count": outcome.completion_tokens, "eval_duration": end - first}
        return self._head() | piece | {"done": True, "done_reason": reason} | stats

    def _head(self) -> dict[str, Any]:
        return {"model": self._model, "created_at": now_iso()}

    def piece(self, text: str, reasoning: str, calls: Outcome | None) -> dict[str, Any]:
        if self._key == "response":
            return {"response": text} | ({"thinking": reasoning} if reasoning else {})
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning:
            message["thinking"] = reasoning
        if calls is not None and calls.tool_calls:
            message["tool_calls"] = [{"function": {"name": c.name, "arguments": tool_input(c.arguments)}}
                                     for c in calls.tool_calls]
        return {"message": message}


def _reason(outcome: Outcome) -> str:
    return "length" if outcome.finish_reason == "length" else "stop"  # Ollama's two reasons
