"""The seam between the one request path (openai.complete) and each dialect's response shape.

Every dialect (OpenAI chat and completions, Anthropic Messages, OpenAI Responses, Ollama) turns
its request into a validated `ChatRequest`/`CompletionRequest` and hands it to `complete` with
a `Shape`: an object that knows how its dialect writes a completion. `complete` gathers the
deltas into an `Outcome` and asks the shape for

* `body(outcome)`: the whole JSON response (stream off), or
* framed bytes for a stream: `start()` once the first token is back, `chunks(delta)` per delta,
  `finish(outcome)` at the end, and `error(status, body)` when the ring fails mid-stream
  (`body` is OpenAI's error object; each dialect re-shapes it).

The framing is the shape's (`data: ...` SSE, `event: ...` SSE, NDJSON lines), so the request
path never knows which dialect it serves. A shape is made per request and may keep state (which
content block is open, sequence numbers).

`Complete` is the type of `openai.complete`: a dialect's routes are given it when they are added
(server.py), which keeps the dialects beside openai.py instead of a floor above it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from zmqinfer.gateway.api.validate import ChatRequest, CompletionRequest
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
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    entries: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.reasoning += delta.reasoning
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

    def usage(self) -> dict[str, int]:
        """OpenAI's usage object."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Shape(Protocol):
    headers: dict[str, str]  # of a streamed response: its media type and no buffering

    def body(self, outcome: Outcome) -> dict[str, Any]: ...

    def start(self) -> list[bytes]: ...

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
