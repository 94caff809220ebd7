"""OpenAI's Responses API, stateless: POST /v1/responses (whole or streamed).

Nothing is stored: the client re-sends its history as input items, so `previous_response_id`,
`store: true`, `conversation` and `background` get a 400 that says so. A request is translated
into an OpenAI chat body (`to_chat`) and validated by the chat route's `parse_chat` (its limits,
tools, grammars and reasoning are the chat route's); `ResponseShape` writes the `response`
object, or the event stream clients parse, each event with its `sequence_number`:
response.created, response.in_progress, then per output item output_item.added,
(content_part.added, output_text.delta / reasoning_text.delta ..., .done, content_part.done |
function_call_arguments.delta ..., .done), output_item.done, and response.completed (or
response.incomplete when max_output_tokens cut it). Errors are OpenAI's error object.

Translation: `instructions` -> a system message; a string input -> one user message; message
items (input_text / output_text parts) -> messages; `function_call` items -> the assistant's
tool_calls, `function_call_output` -> tool messages; reasoning items are dropped (templates drop
past reasoning); function tools -> chat tools; `text.format` json_schema / json_object ->
response_format; `reasoning.effort` -> the template's enable_thinking ("none" turns it off).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from aiohttp import web

from zmqinfer.gateway.api.fields import RequestError
from zmqinfer.gateway.api.http import SSE_HEADERS
from zmqinfer.gateway.api.shape import (
    Complete,
    Outcome,
    model_name,
    new_id,
    only,
    present,
    require,
    serve_chat,
    sse,
)
from zmqinfer.gateway.api.validate import ChatRequest, parse_chat
from zmqinfer.gateway.textout import Delta

_FIELDS = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "top_k", "seed",
    "stop", "tools", "tool_choice", "parallel_tool_calls", "text", "reasoning", "stream",
    "stream_options", "store", "previous_response_id", "metadata", "user", "truncation", "include",
    "service_tier", "prompt_cache_key", "safety_identifier", "max_tool_calls", "background",
    "conversation"})
# Fields the API defines that ask for server state this stateless gateway does not keep.
_STATEFUL = {"previous_response_id": "previous_response_id needs stored responses",
             "conversation": "conversations need stored responses",
             "background": "background responses need stored responses"}


def add_routes(router: web.UrlDispatcher, complete: Complete) -> None:
    router.add_post("/v1/responses", functools.partial(create, complete=complete))


async def create(request: web.Request, complete: Complete) -> web.StreamResponse:
    def shape(body: dict[str, Any], req: ChatRequest) -> ResponseShape:
        return ResponseShape(model_name(request.app, body.get("model")), body, req)

    return await serve_chat(request, "responses", complete, lambda b: parse_chat(to_chat(b)), shape,
                            {"max_tokens": "max_output_tokens"})


# ---- request: Responses -> OpenAI chat body ---------------------------------------------------


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the OpenAI chat body it means, or RequestError."""
    only(body, _FIELDS)
    for name, why in _STATEFUL.items():
        if body.get(name) not in (None, False):
            raise RequestError(f"{name}: {why}, and this server is stateless: send the whole"
                               " conversation as input items", param=name,
                               code="unsupported_parameter")
    for name, kind in (("metadata", dict), ("include", list), ("service_tier", str),
                       ("prompt_cache_key", str), ("safety_identifier", str), ("max_tool_calls", int),
                       ("truncation", str), ("stream_options", dict), ("store", bool)):
        if body.get(name) is not None:
            require(body, name, kind)  # accepted and unused here, but never of the wrong type
    if body.get("store") is True:
        raise RequestError("store: true is not supported: this server stores no responses"
                           " (send store: false, and the whole conversation as input)",
                           param="store", code="unsupported_parameter")
    messages = ([{"role": "system", "content": require(body, "instructions", str)}]
                if body.get("instructions") else [])
    chat: dict[str, Any] = {"messages": messages + _input(body.get("input"))}
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
                         ("stop", "stop"), ("stream", "stream"), ("user", "user"),
                         ("parallel_tool_calls", "parallel_tool_calls")):
        if body.get(theirs) is not None:
            chat[ours] = body[theirs]
    if body.get("tools"):
        chat["tools"] = [_tool(t, i) for i, t in enumerate(require(body, "tools", list))]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        only(choice, {"type", "name"}, "tool_choice.")
        if choice.get("type") != "function":
            raise RequestError("tool_choice must be auto, none, required or a function",
                               param="tool_choice", code="unsupported_parameter")
        choice = {"type": "function", "function": {"name": require(choice, "name", str, "tool_choice.")}}
    if choice is not None:
        chat["tool_choice"] = choice
    if body.get("text") is not None:
        chat.update(_text(require(body, "text", dict)))
    if body.get("reasoning") is not None:
        reasoning = require(body, "reasoning", dict)
        only(reasoning, {"effort", "summary", "generate_summary"}, "reasoning.")
        if reasoning.get("effort") is not None:
            require(reasoning, "effort", str, "reasoning.")
        chat["chat_template_kwargs"] = {"enable_thinking": reasoning.get("effort") != "none"}
    return chat


def _input(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RequestError("input must be a string or a non-empty list of input items",
                           param="input", code="invalid_type" if value is not None else
                           "missing_required_parameter")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an input item object", param=where)
        item = present(item)
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            only(item, {"type", "id", "call_id", "name", "arguments", "status"}, where + ".")
            call = {"id": require(item, "call_id", str, where + "."), "type": "function",
                    "function": {"name": require(item, "name", str, where + "."),
                                 "arguments": require(item, "arguments", str, where + ".")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # one turn: its text and calls
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            only(item, {"type", "id", "call_id", "output", "status"}, where + ".")
            output = item.get("output")
            text = output if isinstance(output, str) else _parts(output, where + ".output")
            out.append({"role": "tool", "tool_call_id": require(item, "call_id", str, where + "."),
                        "content": text})
        elif kind != "reasoning":  # past reasoning is not fed back (templates drop it too)
            raise RequestError(f"{where} is a {str(kind)[:40]} item: only message, function_call,"
                               " function_call_output and reasoning items are supported",
                               param=where, code="unsupported_parameter")
    return out


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    only(item, {"type", "role", "content", "id", "status"}, where + ".")
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise RequestError(f"{where}.role must be user, assistant, system or developer",
                           param=where + ".role")
    content = item.get("content")
    text = content if isinstance(content, str) else _parts(content, where + ".content")
    return {"role": role, "content": text}


def _parts(parts: Any, where: str) -> str:
    if not isinstance(parts, list):
        raise RequestError(f"{where} must be a string or a list of content parts", param=where,
                           code="invalid_type")
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}[{i}] is {str(kind)[:30]}: only text parts (input_text,"
                               " output_text) are supported", param=f"{where}[{i}]",
                               code="unsupported_parameter")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise RequestError(f"{where} is a {str(kind)[:40]} tool: only function tools are supported",
                           param=where, code="unsupported_parameter")
    only(tool, {"type", "name", "description", "parameters", "strict"}, where + ".")
    function = {"name": require(tool, "name", str, where + ".")}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _text(text: dict[str, Any]) -> dict[str, Any]:
    only(text, {"format", "verbosity"}, "text.")
    fmt = text.get("format")
    if fmt is None:
        return {}
    only(require(text, "format", dict, "text."), {"type", "name", "schema", "strict", "description"},
         "text.format.")
    kind = fmt.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        schema = {"name": require(fmt, "name", str, "text.format."),
                  "schema": require(fmt, "schema", dict, "text.format.")}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise RequestError("text.format.type must be text, json_object or json_schema",
                       param="text.format.type")


# ---- response: object and event stream --------------------------------------------------------


class ResponseShape:
    """A `response` object, or the Responses event stream of one."""

    headers = SSE_HEADERS

    def __init__(self, model: str, body: dict[str, Any], req: ChatRequest) -> None:
        self._head = {
            "id": new_id("resp_"), "object": "response", "created_at": int(time.time()),
            "model": model, "error": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "metadata": body.get("metadata") or {},
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None, "store": False,
            "temperature": req.options.sampling.temperature, "top_p": req.options.sampling.top_p,
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
            "text": body.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
        }
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # output items so far (stream)
        self._open: str | None = None  # kind of the item now open: reasoning, message, tool<i>
        self._ids = {"message": new_id("msg_"), "reasoning": new_id("rs_")}

    def body(self, outcome: Outcome) -> dict[str, Any]:
        items = []
        if outcome.reasoning:
            items.append(self._reasoning(outcome.reasoning, "completed"))
        if outcome.text or not (outcome.reasoning or outcome.tool_calls):
            items.append(self._message(outcome.text, "completed"))
        items += [self._call(c.id, c.name, c.arguments, "completed") for c in outcome.tool_calls]
        return self._response(outcome, items)

    def start(self, outcome: Outcome) -> list[bytes]:
        response = self._head | {"status": "in_progress", "output": [], "usage": None,
                                 "incomplete_details": None}
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def chunks(self, delta: Delta) -> list[bytes]:
        out: list[bytes] = []
        if delta.reasoning:
            out += self._switch("reasoning")
            out.append(self._event("response.reasoning_text.delta", **self._at(), content_index=0,
                                   delta=delta.reasoning))
            self._items[-1]["content"][0]["text"] += delta.reasoning
        if delta.text:
            out += self._switch("message")
            out.append(self._event("response.output_text.delta", **self._at(), content_index=0,
                                   delta=delta.text, logprobs=[]))
            self._items[-1]["content"][0]["text"] += delta.text
        for piece in delta.tool_calls:
            if piece.id is not None or self._open != f"tool{piece.index}":
                out += self._switch(f"tool{piece.index}", piece.id or "", piece.name or "")
            if piece.arguments:
                out.append(self._event("response.function_call_arguments.delta", **self._at(),
                                       delta=piece.arguments))
                self._items[-1]["arguments"] += piece.arguments
        return out

    def finish(self, outcome: Outcome) -> list[bytes]:
        out = self._close()
        if not self._items:  # nothing was said: still one (empty) message, as the body has
            out += self._switch("message") + self._close()
        response = self._response(outcome, self._items)
        return out + [self._event(f"response.{response['status']}", response=response)]

    def error(self, status: int, body: dict[str, Any]) -> bytes:
        e = body["error"]
        return self._event("error", code=e["code"], message=e["message"], param=None)

    # ---- pieces ----

    def _response(self, outcome: Outcome, items: list[dict[str, Any]]) -> dict[str, Any]:
        incomplete = outcome.finish_reason == "length"
        usage = {"input_tokens": outcome.prompt_tokens,
                 "input_tokens_details": {"cached_tokens": outcome.cache.cached_tokens,
                                          "cache_write_tokens": 0},
                 "output_tokens": outcome.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}
        return self._head | {"status": "incomplete" if incomplete else "completed", "output": items,
                             "usage": usage, "incomplete_details":
                             {"reason": "max_output_tokens"} if incomplete else None}

    def _message(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self._ids["message"], "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def _reasoning(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self._ids["reasoning"], "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    @staticmethod
    def _call(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {"type": "function_call", "id": "fc_" + call_id.removeprefix("call_"),
                "call_id": call_id, "name": name, "arguments": arguments, "status": status}

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq} | fields
        self._seq += 1
        return sse(payload, kind)

    def _at(self) -> dict[str, Any]:
        return {"item_id": self._items[-1]["id"], "output_index": len(self._items) - 1}

    def _switch(self, kind: str, call_id: str = "", name: str = "") -> list[bytes]:
        """Open an output item of `kind` unless one is open; close the one before it."""
        if self._open == kind:
            return []
        out = self._close()
        self._open = kind
        part: dict[str, Any] | None
        if kind == "reasoning":
            item, part = self._reasoning("", "in_progress"), {"type": "reasoning_text", "text": ""}
        elif kind == "message":
            item, part = self._message("", "in_progress"), {"type": "output_text", "text": "",
                                                            "annotations": [], "logprobs": []}
        else:
            item, part = self._call(call_id, name, "", "in_progress"), None
        self._items.append(item)
        added = {**item, "content": []} if part else dict(item)
        out.append(self._event("response.output_item.added", output_index=len(self._items) - 1,
                               item=added))
        if part:
            out.append(self._event("response.content_part.added", **self._at(), content_index=0,
                                   part=part))
        return out

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        item, out = self._items[-1], []
        if item["type"] == "function_call":
            out.append(self._event("response.function_call_arguments.done", **self._at(),
                                   name=item["name"], arguments=item["arguments"]))
        else:
            part = item["content"][0]
            done = ("response.reasoning_text.done" if item["type"] == "reasoning"
                    else "response.output_text.done")
            extra: dict[str, Any] = {} if item["type"] == "reasoning" else {"logprobs": []}
            out.append(self._event(done, **self._at(), content_index=0, text=part["text"], **extra))
            out.append(self._event("response.content_part.done", **self._at(), content_index=0,
                                   part=part))
        item["status"] = "completed"
        out.append(self._event("response.output_item.done", output_index=len(self._items) - 1,
                               item=item))
        self._open = None
        return out
