"""The seam between the one request path (openai.complete) and each dialect's response shape.

Every dialect (OpenAI chat and completions, Anthropic Messages, OpenAI Responses, Ollama) turns
its request into a validated `ChatRequest`/`CompletionRequest` and hands it to `complete` with
a `Shape`: an object that knows how its dialect writes a completion. `complete` gathers the
deltas into an `Outcome` and asks the shape for

* `body(outcome)`: the whole JSON response (stream off), or
* framed bytes for a stream: `start(outcome)` once the first token is back (the outcome has
  the prompt's token count by then), `chunks(delta)` per delta,
  `finish(outcome)` at the end, and `error(status, body)` when the ring fails mid-stream
  (`body` is OpenAI's error object; each dialect re-shapes it).

The framing is the shape's (`data: ...` SSE, `event: ...` SSE, NDJSON lines), so the request
path never knows which dialect it serves. A shape is made per request and may keep state (which
content block is open, sequence numbers).

`Complete` is the type of `openai.complete`: a dialect's routes are given it when they are added
(server.py), which keeps the dialects beside openai.py instead of a floor above it (the gateway
has a floor limit: tests/unit/shared/test_architecture.py).

Also here, because every non-OpenAI dialect needs them: `serve_chat` (read, admit, translate to
an OpenAI chat body, validate with the chat route's own `parse_chat`, complete), model aliases
(`[gateway] aliases` in nodes.toml), tool-call arguments as the JSON object clients expect, and
`present` (null fields of items sent back are absent ones).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from zmqinfer.gateway.api.fields import RequestError, parse_body
from zmqinfer.gateway.api.http import ADMISSION, API, BACKEND, admitted, read_body
# request.py, not validate.py: the dialects hand serve_chat the chat route's parse_chat, which keeps
# this module a floor below them (tests/unit/shared/test_architecture.py).
from zmqinfer.gateway.api.request import ChatRequest, CompletionRequest
from zmqinfer.gateway.prefixes import Scope
from zmqinfer.gateway.textout import Delta, LogprobEntry

NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache",
                  "X-Accel-Buffering": "no"}


@dataclass
class ToolCall:
    """One whole tool call, gathered from its `ToolCallDelta` pieces."""

    id: str
    name: str
    arguments: str


@dataclass
class Outcome:
    """A completion as it is gathered: what a whole (non-stream) body and a stream's end need."""

    prompt_tokens: int
    tool_calls: list[ToolCall] = field(default_factory=list)
    entries: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    completion_tokens: int = 0
    # The request's prefix-cache scope: how many prompt tokens came from a cached prefix, filled
    # in when its generation starts (gateway/prefixes.py).
    cache: Scope = field(default_factory=Scope)
    # Pieces, joined when read: appending to one string per token copies it every time.
    _text: list[str] = field(default_factory=list)
    _reasoning: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    def add(self, delta: Delta) -> None:
        self._text.append(delta.text)
        self._reasoning.append(delta.reasoning)
        self.entries.extend(delta.logprobs)
        for piece in delta.tool_calls:
            while len(self.tool_calls) <= piece.index:
                self.tool_calls.append(ToolCall("", "", ""))
            call = self.tool_calls[piece.index]
            call.id = piece.id or call.id
            call.name = piece.name or call.name
            call.arguments += piece.arguments
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cache.cached_tokens}}


class Shape(Protocol):
    headers: dict[str, str]  # of a streamed response: its media type and no buffering

    def body(self, outcome: Outcome) -> dict[str, Any]: ...

    def start(self, outcome: Outcome) -> list[bytes]: ...

    def chunks(self, delta: Delta) -> list[bytes]: ...

    def finish(self, outcome: Outcome) -> list[bytes]: ...

    def error(self, status: int, body: dict[str, Any]) -> bytes: ...


Complete = Callable[[web.Request, ChatRequest | CompletionRequest, Shape],
                    Awaitable[web.StreamResponse]]


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def sse(payload: Any, event: str | None = None) -> bytes:
    """One server-sent event: `data: <json>`, after `event: <name>` when named."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + dumps(payload) + b"\n\n"


def ndjson(payload: Any) -> bytes:
    return dumps(payload) + b"\n"


# ---- what the dialects share ------------------------------------------------------------------

ALIASES = web.AppKey("aliases", tuple)  # glob patterns of model names the served model answers to


async def serve_chat(request: web.Request, api: str, complete: Complete,
                     translate: Callable[[dict[str, Any]], ChatRequest],
                     shape: Callable[[dict[str, Any], ChatRequest], Shape],
                     renames: Mapping[str, str] | None = None) -> web.StreamResponse:
    """One generating request of dialect `api`: its body read under its deadline (before it takes
    a slot), `translate`d into a ChatRequest (the dialect's OpenAI chat body, validated by the
    chat route's own `parse_chat`), run.
    `renames`: chat field -> the dialect's name for it, for the messages of 400s."""
    request[API] = api
    raw = await read_body(request, request.app[ADMISSION].body_timeout)
    with admitted(request), renaming(renames or {}):
        body = parse_body(raw)
        req = translate(body)
        return await complete(request, req, shape(body, req))


@contextlib.contextmanager
def renaming(renames: Mapping[str, str]) -> Iterator[None]:
    """A 400 about a chat field names the field the client sent instead (the chat route's
    `stop` is Anthropic's `stop_sequences`, Ollama's `options.stop`)."""
    try:
        yield
    except RequestError as e:
        old = (e.param or "").split(".")[0].split("[")[0]
        if old not in renames:
            raise
        new = renames[old]
        raise RequestError(re.sub(rf"\b{re.escape(old)}\b", new, e.message),
                           param=new + (e.param or "")[len(old):], code=e.code,
                           status=e.status) from None


def is_served(app: web.Application, name: str) -> bool:
    """`name` is the served model's id or matches one of the configured aliases."""
    return name == app[BACKEND].model_id or any(fnmatch.fnmatchcase(name, pattern)
                                                for pattern in app[ALIASES])


def listed_names(app: web.Application) -> list[str]:
    """What model listings show: the served model's id, then the aliases that are plain names
    (a glob names no model a client could pick)."""
    plain = [a for a in app[ALIASES] if not any(c in a for c in "*?[")]
    return list(dict.fromkeys([app[BACKEND].model_id, *plain]))


def model_name(app: web.Application, requested: Any) -> str:
    """The name an answer echoes: the one asked for when it is served (an alias included), else
    the served model's id (the gateway serves one model whatever a request names)."""
    return requested if isinstance(requested, str) and is_served(app, requested) else app[BACKEND].model_id


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's argument text as the object Anthropic's and Ollama's clients expect. Text that
    is not a JSON object (a model not held to a grammar) is kept whole rather than lost."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def present(item: Mapping[str, Any]) -> dict[str, Any]:
    """`item` without its null fields. A client that sends an answer's blocks or items back
    dumped whole (pydantic's `model_dump()`) sends every field its SDK knows, most of them null
    (`caller`, `toolset_name`, `phase`, ...): a null field means what an absent one does."""
    return {k: v for k, v in item.items() if v is not None}


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def require(body: Mapping[str, Any], name: str, kind: type, where: str = "") -> Any:
    """A required field of type `kind`, or the 400 that names it."""
    value = body.get(name)
    if value is None:
        raise RequestError(f"{where}{name} is required", param=where + name,
                           code="missing_required_parameter")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RequestError(f"{where}{name} must be {_KINDS.get(kind, kind.__name__)}",
                           param=where + name, code="invalid_type")
    return value


_KINDS = {str: "a string", list: "a list", dict: "an object", int: "an integer", bool: "a boolean"}


def only(body: Mapping[str, Any], known: frozenset[str] | set[str], where: str = "") -> None:
    """Refuse a field this dialect does not define (or this server cannot honour), by name."""
    extra = sorted(set(body) - set(known))
    if extra:
        raise RequestError(f"{where}{extra[0]} is not a supported field", param=where + extra[0],
                           code="unknown_parameter")
