"""Anthropic's Messages API: POST /v1/messages (whole or streamed) and /v1/messages/count_tokens.

A Messages request is translated into an OpenAI chat body (`to_chat`) and validated by the chat
route's own `parse_chat`, so limits, tools, grammars and reasoning are the chat route's; the
answer is written by `MessageShape` as a `message` object or as Anthropic's event stream:
message_start, ping, per content block content_block_start / _delta / _stop (thinking, text,
tool_use), message_delta (stop_reason, usage), message_stop. Errors are Anthropic's shape
(refusal.py); the key may come as `x-api-key` (auth.py); `anthropic-version` and
`anthropic-beta` headers are accepted and not needed.

Translation: `system` (a string or text blocks) -> a system message; text blocks -> content;
an assistant's `tool_use` blocks -> its `tool_calls`; a user's `tool_result` blocks -> `tool`
messages (before the rest of that turn's text); earlier `thinking` blocks are dropped (chat
templates drop past reasoning too); `stop_sequences` -> stop; `tools` -> function tools;
`tool_choice` auto/any/tool/none -> auto/required/{function}/none; `thinking` enabled/adaptive/
disabled -> the template's `enable_thinking`; `output_config.format` (json_schema) ->
response_format; `metadata.user_id` -> user.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from aiohttp import web

from zmqinfer.gateway.api.fields import RequestError, parse_body
from zmqinfer.gateway.api.http import ADMISSION, API, BACKEND, admitted, read_body
from zmqinfer.gateway.api.refusal import anthropic_body
from zmqinfer.gateway.api.shape import (
    Complete,
    Outcome,
    dumps,
    model_name,
    new_id,
    only,
    present,
    renaming,
    require,
    serve_chat,
    sse,
    tool_input,
)
from zmqinfer.gateway.api.validate import ChatRequest, parse_chat
from zmqinfer.gateway.prompt import plan
from zmqinfer.gateway.textout import Delta

_FIELDS = frozenset({"model", "messages", "max_tokens", "system", "stop_sequences", "temperature",
                     "top_p", "top_k", "stream", "tools", "tool_choice", "metadata", "thinking",
                     "output_config", "service_tier", "cache_control", "inference_geo", "speed"})
# Hints about Anthropic's own serving (prompt caching, region, tier, speed): accepted, and they
# change nothing about the answer here. Fields that ask for server-side features (containers,
# MCP servers, context editing) are refused by name as unknown.
_HINTS = {"service_tier": str, "cache_control": dict, "inference_geo": str, "speed": str}
_THINKING = {"enabled": True, "adaptive": True, "disabled": False}
_COUNT_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking",
                           "output_config", "cache_control"})
_BLOCK_FIELDS = {"text": {"type", "text", "cache_control", "citations"},
                 "tool_use": {"type", "id", "name", "input", "cache_control"},
                 "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control"},
                 "thinking": {"type", "thinking", "signature"},
                 "redacted_thinking": {"type", "data"}}
RENAMES = {"stop": "stop_sequences"}  # chat field -> ours, in the messages of 400s
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}  # "stop": end_turn or stop_sequence
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                  "X-Accel-Buffering": "no"}


def add_routes(router: web.UrlDispatcher, complete: Complete) -> None:
    router.add_post("/v1/messages", functools.partial(messages, complete=complete))
    router.add_post("/v1/messages/count_tokens", count_tokens)


async def messages(request: web.Request, complete: Complete) -> web.StreamResponse:
    def shape(body: dict[str, Any], req: ChatRequest) -> MessageShape:
        return MessageShape(model_name(request.app, body.get("model")))

    return await serve_chat(request, "anthropic", complete, lambda b: parse_chat(to_chat(b)), shape,
                            RENAMES)


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's token count, as the messages route would build it (no generation)."""
    request[API] = "anthropic"
    raw = await read_body(request, request.app[ADMISSION].body_timeout)
    with admitted(request), renaming(RENAMES):  # templating a long prompt is work: it counts
        body = parse_body(raw)
        only(body, _COUNT_FIELDS)
        req = parse_chat(to_chat(body | {"max_tokens": 1}, count_only=True))
        backend = request.app[BACKEND]
        p = await asyncio.to_thread(plan, req, backend.tokenizer, backend.context_length)
        return web.json_response({"input_tokens": len(p.prompt)})


# ---- request: Messages -> OpenAI chat body ----------------------------------------------------


def to_chat(body: dict[str, Any], count_only: bool = False) -> dict[str, Any]:
    """An Anthropic Messages request as the OpenAI chat body it means, or RequestError."""
    if not count_only:
        only(body, _FIELDS)
    require(body, "model", str)
    if not count_only:
        require(body, "max_tokens", int)
    chat: dict[str, Any] = {"messages": _system(body.get("system"))
                            + _messages(require(body, "messages", list))}
    for ours, theirs in (("max_tokens", "max_tokens"), ("stop", "stop_sequences"),
                         ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("stream", "stream")):
        if body.get(theirs) is not None:
            chat[ours] = body[theirs]
    if isinstance(chat.get("stop"), list) and not chat["stop"]:
        del chat["stop"]  # Anthropic allows an empty list; OpenAI's stop wants none
    if body.get("tools"):
        chat["tools"] = [_tool(t, i) for i, t in enumerate(require(body, "tools", list))]
    if body.get("tool_choice") is not None:
        chat.update(_tool_choice(require(body, "tool_choice", dict)))
    if body.get("thinking") is not None:
        kind = require(body, "thinking", dict).get("type")
        if kind not in _THINKING:
            raise RequestError("thinking.type must be enabled, adaptive or disabled",
                               param="thinking.type")
        chat["chat_template_kwargs"] = {"enable_thinking": _THINKING[kind]}
    if body.get("output_config") is not None:
        chat.update(_output_config(require(body, "output_config", dict)))
    for name, kind in _HINTS.items():
        if body.get(name) is not None:
            require(body, name, kind)
    metadata = body.get("metadata")
    if metadata is not None:
        only(require(body, "metadata", dict), {"user_id"}, "metadata.")
        if metadata.get("user_id") is not None:
            chat["user"] = require(metadata, "user_id", str, "metadata.")
    return chat


def _output_config(config: dict[str, Any]) -> dict[str, Any]:
    """`output_config.format` (a JSON schema the answer must follow) -> response_format;
    `effort` is accepted (a local model has no effort dial beyond thinking on or off)."""
    only(config, {"effort", "format"}, "output_config.")
    if config.get("effort") is not None:
        require(config, "effort", str, "output_config.")
    fmt = config.get("format")
    if fmt is None:
        return {}
    only(require(config, "format", dict, "output_config."), {"type", "schema"}, "output_config.format.")
    if fmt.get("type") != "json_schema":
        raise RequestError("output_config.format.type must be json_schema",
                           param="output_config.format.type")
    schema = require(fmt, "schema", dict, "output_config.format.")
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "output",
                                                                       "schema": schema}}}


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    if not isinstance(system, list):
        raise RequestError("system must be a string or a list of text blocks", param="system",
                           code="invalid_type")
    text = "\n".join(_text_block(b, f"system[{i}]") for i, b in enumerate(system))
    return [{"role": "system", "content": text}] if text else []


def _text_block(block: Any, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise RequestError(f"{where} must be a text block", param=where)
    only(block, _BLOCK_FIELDS["text"], where + ".")
    return str(require(block, "text", str, where + "."))


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with role and content", param=where)
        only(m, {"role", "content"}, where + ".")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise RequestError(f"{where}.role must be user or assistant, got {str(role)[:20]!r}",
                               param=where + ".role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of content blocks",
                               param=where + ".content", code="invalid_type")
        out += _blocks(role, content, where + ".content")
    return out


def _blocks(role: str, blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """One turn's content blocks as OpenAI messages: tool results first (they answer the calls
    of the turn before), then the text with this turn's tool calls."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, b in enumerate(blocks):
        at = f"{where}[{i}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind not in _BLOCK_FIELDS:
            raise RequestError(f"{at} is a {str(kind)[:30]} block: only text, tool_use, tool_result"
                               " and thinking blocks are supported (no images or documents)",
                               param=at, code="unsupported_parameter")
        assert isinstance(b, dict)
        b = present(b)
        only(b, _BLOCK_FIELDS[kind], at + ".")
        if kind == "text":
            texts.append(require(b, "text", str, at + "."))
        elif kind == "tool_use":
            if role != "assistant":
                raise RequestError(f"{at}: tool_use blocks belong to assistant turns", param=at)
            calls.append({"id": require(b, "id", str, at + "."), "type": "function", "function": {
                "name": require(b, "name", str, at + "."),
                "arguments": json.dumps(require(b, "input", dict, at + "."))}})
        elif kind == "tool_result":
            if role != "user":
                raise RequestError(f"{at}: tool_result blocks belong to user turns", param=at)
            content = b.get("content", "")
            text = content if isinstance(content, str) else "\n".join(
                _text_block(c, f"{at}.content[{j}]") for j, c in enumerate(
                    content if isinstance(content, list) else [content]))
            results.append({"role": "tool", "tool_call_id": require(b, "tool_use_id", str, at + "."),
                            "content": ("Error: " + text) if b.get("is_error") else text})
        # thinking / redacted_thinking: past reasoning is not fed back (templates drop it too)
    message: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return results + ([message] if texts or calls or not results else [])


def _tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise RequestError(f"{where} is a {str(kind)[:40]} tool: only custom tools (name,"
                           " description, input_schema) are supported", param=where,
                           code="unsupported_parameter")
    only(tool, {"type", "name", "description", "input_schema", "cache_control"}, where + ".")
    function = {"name": require(tool, "name", str, where + "."),
                "parameters": require(tool, "input_schema", dict, where + ".")}
    if tool.get("description") is not None:
        function["description"] = require(tool, "description", str, where + ".")
    return {"type": "function", "function": function}


def _tool_choice(choice: dict[str, Any]) -> dict[str, Any]:
    only(choice, {"type", "name", "disable_parallel_tool_use"}, "tool_choice.")
    kind = choice.get("type")
    out: dict[str, Any] = {}
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function",
                              "function": {"name": require(choice, "name", str, "tool_choice.")}}
    else:
        raise RequestError("tool_choice.type must be auto, any, tool or none",
                           param="tool_choice.type")
    if choice.get("disable_parallel_tool_use") is not None:
        out["parallel_tool_calls"] = not require(choice, "disable_parallel_tool_use", bool,
                                                 "tool_choice.")
    return out


# ---- response: message object and event stream ------------------------------------------------


def usage(outcome: Outcome, output_tokens: int) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` are the prompt tokens computed for this request, those
    a cached prefix supplied are `cache_read_input_tokens` (the three add up to the prompt).
    Nothing is ever "written" at a cost here (every answered prompt is kept, docs/prefix-cache.md),
    so cache creation is 0."""
    cached = outcome.cache.cached_tokens
    return {"input_tokens": outcome.prompt_tokens - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": output_tokens}


def stop_reason(outcome: Outcome) -> str | None:
    if outcome.finish_reason == "stop":
        return "stop_sequence" if outcome.stop_sequence else "end_turn"
    return STOP_REASONS.get(outcome.finish_reason or "")


class MessageShape:
    """A `message` object, or Anthropic's event stream of one."""

    headers = STREAM_HEADERS

    def __init__(self, model: str) -> None:
        self._id = new_id("msg_")
        self._model = model
        self._open: str | None = None  # the kind of the content block now open ("text", ...)
        self._index = -1  # its index

    def body(self, outcome: Outcome) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if outcome.reasoning:
            content.append({"type": "thinking", "thinking": outcome.reasoning, "signature": ""})
        if outcome.text or not (outcome.reasoning or outcome.tool_calls):
            content.append({"type": "text", "text": outcome.text})
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(c.arguments)}
                    for c in outcome.tool_calls]
        return self._message(content, stop_reason(outcome), outcome.stop_sequence,
                             usage(outcome, outcome.completion_tokens))

    def start(self, outcome: Outcome) -> list[bytes]:
        return [sse({"type": "message_start",
                     "message": self._message([], None, None, usage(outcome, 0))},
                    "message_start"),
                sse({"type": "ping"}, "ping")]

    def chunks(self, delta: Delta) -> list[bytes]:
        out: list[bytes] = []
        if delta.reasoning:
            out += self._switch("thinking", {"type": "thinking", "thinking": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": delta.reasoning}))
        if delta.text:
            out += self._switch("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": delta.text}))
        for piece in delta.tool_calls:
            if piece.id is not None or self._open != f"tool{piece.index}":
                out += self._switch(f"tool{piece.index}", {"type": "tool_use", "id": piece.id or "",
                                                           "name": piece.name or "", "input": {}})
            if piece.arguments:
                out.append(self._delta({"type": "input_json_delta",
                                        "partial_json": piece.arguments}))
        return out

    def finish(self, outcome: Outcome) -> list[bytes]:
        out = self._close()
        if self._index < 0:  # nothing was said: still one (empty) text block, as Anthropic does
            out += self._switch("text", {"type": "text", "text": ""}) + self._close()
        delta = {"stop_reason": stop_reason(outcome), "stop_sequence": outcome.stop_sequence}
        return out + [sse({"type": "message_delta", "delta": delta,
                           "usage": usage(outcome, outcome.completion_tokens)}, "message_delta"),
                      sse({"type": "message_stop"}, "message_stop")]

    def error(self, status: int, body: dict[str, Any]) -> bytes:
        return b"event: error\ndata: " + dumps(anthropic_body(status, body["error"]["message"])) + b"\n\n"

    def _message(self, content: list[dict[str, Any]], reason: str | None, sequence: str | None,
                 counts: dict[str, int]) -> dict[str, Any]:
        return {"id": self._id, "type": "message", "role": "assistant", "model": self._model,
                "content": content, "stop_reason": reason, "stop_sequence": sequence,
                "usage": counts}

    def _switch(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        """Open a `kind` block unless one is open; close the block before it."""
        if self._open == kind:
            return []
        out = self._close()
        self._index += 1
        self._open = kind
        return out + [sse({"type": "content_block_start", "index": self._index,
                           "content_block": block}, "content_block_start")]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        out = []
        if self._open == "thinking":  # clients expect a signature; local reasoning has none
            out.append(self._delta({"type": "signature_delta", "signature": ""}))
        self._open = None
        return out + [sse({"type": "content_block_stop", "index": self._index},
                          "content_block_stop")]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse({"type": "content_block_delta", "index": self._index, "delta": delta},
                   "content_block_delta")
