"""The frozen requests the API works on, once validate.py has checked a body: what every later
step (prompt.py, the tool markup, the dialects) reads. No behaviour here, and no imports from the
gateway: the request types sit on the lowest floor so every module above may name them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from zmqinfer.protocol.wire import SamplingParams

# What a request gets when it names no budget: OpenAI has no fixed default (it runs to the
# context limit), but an unbounded default lets one forgetful client hold the ring for minutes.
DEFAULT_MAX_TOKENS = 512
# Limits validate.py enforces, here so openapi_dialects.py can publish them without importing
# validate.py (a floor higher since the tool fields: tests/unit/shared/test_architecture.py).
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 1000  # a stop string longer than this is a mistake, and each token rescans it
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # OpenAI's int64 seeds, or the uint64 mlx keys take

ChatRole = Literal["system", "user", "assistant", "tool"]
ToolChoiceMode = Literal["auto", "none", "required"]
OutputKind = Literal["text", "json_object", "json_schema"]


@dataclass(frozen=True)
class Options:
    """What both endpoints share: budget, stopping, sampling and output shape."""

    max_tokens: int | None  # None: DEFAULT_MAX_TOKENS, capped by what the context leaves
    max_tokens_param: str  # the field the client used, for error messages
    stop: tuple[str, ...]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no logprobs; k: each token's logprob plus k alternatives


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made, as a client sends it back in the history."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI carries it


@dataclass(frozen=True)
class Message:
    role: ChatRole
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages only
    tool_call_id: str | None = None  # tool messages only: which call this answers


@dataclass(frozen=True)
class Tool:
    """One function the model may call (OpenAI's `{"type": "function", "function": {...}}`)."""

    name: str
    description: str
    parameters: dict[str, Any] = field(compare=False, hash=False)  # a JSON schema (an object)
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode
    name: str | None = None  # a named function: mode "required" restricted to this one tool


@dataclass(frozen=True)
class ResponseFormat:
    kind: OutputKind
    name: str | None = None  # json_schema's name
    schema: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    strict: bool = False


@dataclass(frozen=True)
class ChatRequest:
    model: str | None  # echoed nowhere: the gateway serves one model and answers with its id
    messages: tuple[Message, ...]
    options: Options
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("auto")
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = ResponseFormat("text")
    # Extra variables for the chat template (e.g. Qwen3's enable_thinking), as given.
    template_kwargs: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompt: str | tuple[int, ...]
    options: Options
