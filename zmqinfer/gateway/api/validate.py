"""OpenAI request bodies -> frozen, validated requests. Every 400 the API gives is decided here.

Contract:

* `fields.parse_body(raw)` -> the JSON object of a request body (strict JSON: no NaN/Infinity).
* `parse_chat(body)` / `parse_completion(body)` -> `ChatRequest` / `CompletionRequest`. They
  check types and ranges of every field, refuse unknown fields by name, and refuse features this
  server does not have (tools, n>1, echo, images, ...) instead of silently ignoring them.
* Tokenization and the context-length check are `prompt.plan`'s.

Each failure is a `fields.RequestError` whose message says what to fix and whose `param` names the
offending field, ready to be rendered as OpenAI's `{"error": {...}}` body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from zmqinfer.gateway.api import toolfields
from zmqinfer.gateway.api.fields import (
    RequestError,
    boolean,
    check_fields,
    given,
    integer,
    number,
    param_error,
    string,
)
from zmqinfer.gateway.api.request import (  # re-exported: the request types' old home
    DEFAULT_MAX_TOKENS as DEFAULT_MAX_TOKENS,
)
from zmqinfer.gateway.api.request import MAX_STOP_CHARS as MAX_STOP_CHARS
from zmqinfer.gateway.api.request import MAX_STOP_SEQUENCES as MAX_STOP_SEQUENCES
from zmqinfer.gateway.api.request import SEED_RANGE as SEED_RANGE
from zmqinfer.gateway.api.request import ChatRequest as ChatRequest
from zmqinfer.gateway.api.request import CompletionRequest as CompletionRequest
from zmqinfer.gateway.api.request import Message as Message
from zmqinfer.gateway.api.request import Options as Options
from zmqinfer.protocol.limits import GREEDY_TEMPERATURE, MAX_TOKEN_ID
from zmqinfer.protocol.wire import SamplingParams

# OpenAI's own default; clients that want reproducible output send temperature 0 or a seed.
DEFAULT_TEMPERATURE = 1.0
MAX_LOGIT_BIAS = 300  # OpenAI's limit; also keeps the wire header small (see wire.py)
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's limits for chat / legacy completions
MAX_COMPLETION_LOGPROBS = 5
# vLLM's range is (0, inf); below 0.01 (or above 10) logits/penalty overflows float32 to inf.
REPETITION_PENALTY_RANGE = (0.01, 10.0)

# Fields OpenAI defines that this server cannot honour: accepted only with a value that asks for
# nothing (null, or the default), refused otherwise.
_NOT_FUNCTIONS = "the deprecated functions API is not supported; send tools and tool_choice"
_CHAT_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (lambda v: v == [], _NOT_FUNCTIONS),
    "function_call": (lambda v: v == "none", _NOT_FUNCTIONS),
    "modalities": (lambda v: v == ["text"], "only text output is supported"),
    "audio": (lambda v: False, "audio output is not supported"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: False, "reasoning effort is not supported"),
    "web_search_options": (lambda v: False, "web search is not supported"),
    "store": (lambda v: v is False, "stored completions are not supported"),
    # Accepted and not used: tags and routing hints that change nothing about the completion.
    "metadata": (lambda v: isinstance(v, dict), "must be an object"),
    "service_tier": (lambda v: v in ("auto", "default", "flex", "priority", "scale"),
                     "must be one of OpenAI's tier names"),
    "prompt_cache_key": (lambda v: isinstance(v, str), "must be a string"),
    "safety_identifier": (lambda v: isinstance(v, str), "must be a string"),
    "verbosity": (lambda v: v in ("low", "medium", "high"), "must be low, medium or high"),
}
_COMPLETION_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "echo": (lambda v: v is False, "echo=true is not supported"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported"),
    "best_of": (lambda v: v == 1, "best_of>1 is not supported"),
}
_COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
    "stream", "stream_options", "user", "n",
})
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                          "tool_choice", "parallel_tool_calls", "response_format",
                          "chat_template_kwargs"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}


# ---- shared options ---------------------------------------------------------------------------


def _options(body: Mapping[str, Any], logprobs: int | None) -> Options:
    if (integer(body, "n", 1, 1) or 1) > 1:
        raise RequestError("n>1 is not supported; send one request per completion", param="n",
                           code="unsupported_parameter")
    string(body, "user")  # accepted and, like OpenAI's abuse tracking, not used for generation

    max_tokens, param = integer(body, "max_tokens", None, 1), "max_tokens"
    newer = integer(body, "max_completion_tokens", None, 1)
    if newer is not None:
        if max_tokens is not None and max_tokens != newer:
            raise param_error("max_completion_tokens", "and max_tokens disagree; send only one")
        max_tokens, param = newer, "max_completion_tokens"

    stream = boolean(body, "stream", False)
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise param_error("stream_options", "is only allowed when stream is true")
        if not isinstance(stream_options, dict):
            raise param_error("stream_options", "must be an object", "invalid_type")
        extra = sorted(set(stream_options) - {"include_usage"})
        if extra:
            raise param_error(f"stream_options.{extra[0]}", "is an unknown field", "unknown_parameter")
        include_usage = boolean(stream_options, "include_usage", False, "stream_options.")

    seed = integer(body, "seed", None, *SEED_RANGE)
    temperature = number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0) or 0.0
    sampling = SamplingParams(
        # Below GREEDY_TEMPERATURE, 1/T overflows the logits: such a request is greedy.
        temperature=0.0 if temperature < GREEDY_TEMPERATURE else temperature,
        top_p=given(number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        top_k=given(integer(body, "top_k", 0, 0)),  # <= the vocabulary: prompt.plan
        min_p=given(number(body, "min_p", 0.0, 0.0, 1.0)),
        # OpenAI seeds are signed 64-bit; mlx keys are unsigned: the same bits either way.
        seed=None if seed is None else seed % (1 << 64),
        # Penalties stay None (not a neutral value) when absent: the sampler then skips them.
        repetition_penalty=number(body, "repetition_penalty", None, *REPETITION_PENALTY_RANGE),
        presence_penalty=number(body, "presence_penalty", None, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", None, -2.0, 2.0),
        logit_bias=_logit_bias(body.get("logit_bias")),
        top_logprobs=logprobs or 0,
    )
    return Options(max_tokens=max_tokens, max_tokens_param=param, stop=_stop(body.get("stop")),
                   sampling=sampling, stream=stream, include_usage=include_usage,
                   logprobs=logprobs)


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise param_error("stop", "must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise param_error("stop", f"takes at most {MAX_STOP_SEQUENCES} strings, got {len(stops)}")
    if not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise param_error("stop", f"strings must each be 1 to {MAX_STOP_CHARS} characters long")
    return tuple(dict.fromkeys(stops))  # duplicates would only cost time


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise param_error("logit_bias", "must be an object mapping token ids to biases", "invalid_type")
    if len(value) > MAX_LOGIT_BIAS:
        raise param_error("logit_bias", f"takes at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= MAX_TOKEN_ID):
            raise param_error("logit_bias", f"keys must be token ids (decimal integers), got {key[:20]!r}")
        if type(bias) not in (int, float) or not -100 <= bias <= 100:  # NaN fails; big ints compare
            raise param_error("logit_bias", f"values must be numbers between -100 and 100, got"
                                     f" {str(bias)[:20]} for {key!r}")
        out[int(key)] = float(bias)
    return tuple(sorted(out.items()))


# ---- chat -------------------------------------------------------------------------------------


def parse_chat(body: Mapping[str, Any]) -> ChatRequest:
    """A validated /v1/chat/completions request, or RequestError."""
    check_fields(body, _CHAT_FIELDS, _CHAT_UNSUPPORTED)
    logprobs = body.get("logprobs")
    if logprobs is not None and type(logprobs) is not bool:
        raise param_error("logprobs", "must be true or false for chat completions", "invalid_type")
    top = integer(body, "top_logprobs", None, 0, MAX_CHAT_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise param_error("top_logprobs", "requires logprobs to be true")
    options = _options(body, (top or 0) if logprobs else None)
    tools = toolfields.tools(body.get("tools"))
    messages = _messages(body.get("messages"))
    toolfields.check_tool_messages([(m.role, m.tool_call_id) for m in messages])
    return ChatRequest(model=string(body, "model"), messages=messages, options=options,
                       tools=tools, tool_choice=toolfields.tool_choice(body.get("tool_choice"), tools),
                       parallel_tool_calls=boolean(body, "parallel_tool_calls", True),
                       response_format=toolfields.response_format(body.get("response_format")),
                       template_kwargs=toolfields.template_kwargs(body.get("chat_template_kwargs")))


def _messages(value: Any) -> tuple[Message, ...]:
    if value is None:
        raise param_error("messages", "is required", "missing_required_parameter")
    if not isinstance(value, list) or not value:
        raise param_error("messages", "must be a non-empty list of message objects")
    return tuple(_message(m, f"messages[{i}]") for i, m in enumerate(value))


def _message(m: Any, where: str) -> Message:
    if not isinstance(m, dict):
        raise param_error(where, "must be an object with role and content", "invalid_type")
    role = m.get("role")
    if role == "function":
        raise param_error(f"{where}.role", f"'function' is not supported: {_NOT_FUNCTIONS}",
                          "unsupported_parameter")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise param_error(f"{where}.role", f"must be one of system, developer, user, assistant,"
                                           f" tool; got {role!r}")
    extra = next((k for k in m if k not in _MESSAGE_FIELDS), None)
    if extra is not None:
        raise param_error(f"{where}.{extra}", "is not supported", "unsupported_parameter")
    for key in _ECHOED_NULLS:  # what a response message carries; sent back, it must ask nothing
        if m.get(key) is not None:
            raise param_error(f"{where}.{key}", "is not supported (only null)", "unsupported_parameter")
    if role != "assistant" and m.get("tool_calls"):
        raise param_error(f"{where}.tool_calls", "is only allowed on an assistant message")
    calls = toolfields.message_tool_calls(m.get("tool_calls"), f"{where}.tool_calls")
    string(m, "refusal", f"{where}.")  # a refusal sent back is text we never produce: ignored
    string(m, "reasoning_content", f"{where}.")  # our own reasoning, sent back: not re-rendered
    call_id = string(m, "tool_call_id", f"{where}.")
    if call_id is not None and role != "tool":
        raise param_error(f"{where}.tool_call_id", "is only allowed on a tool message")
    content = m.get("content")
    # An assistant turn that only called tools has content null (OpenAI's own responses do).
    text = "" if content is None and (calls or role == "assistant") else _content(content, f"{where}.content")
    # Chat templates know system/user/assistant; "developer" is OpenAI's newer name for system.
    return Message(role="system" if role == "developer" else role, content=text,
                   name=string(m, "name", f"{where}."), tool_calls=calls, tool_call_id=call_id)


_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal",
                             "audio", "function_call", "annotations", "reasoning_content"})
_ECHOED_NULLS = ("audio", "function_call")


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise param_error(where, "is required", "missing_required_parameter")
    if not isinstance(content, list):
        raise param_error(where, "must be a string or a list of text parts", "invalid_type")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image_url", "input_image", "input_audio", "file"):
            raise param_error(f"{where}[{i}]", f"is {kind}: {kind} input is not supported (text only)",
                       "unsupported_parameter")
        if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise param_error(f"{where}[{i}]", 'must be {"type": "text", "text": <string>}')
        texts.append(part["text"])
    return "\n".join(texts)


# ---- legacy completions -----------------------------------------------------------------------


def parse_completion(body: Mapping[str, Any]) -> CompletionRequest:
    """A validated /v1/completions request, or RequestError."""
    check_fields(body, _COMPLETION_FIELDS, _COMPLETION_UNSUPPORTED)
    logprobs = body.get("logprobs")
    if logprobs is not None and (type(logprobs) is not int
                                 or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS):
        raise param_error("logprobs", f"must be an integer between 0 and {MAX_COMPLETION_LOGPROBS}"
                               " for completions")
    return CompletionRequest(model=string(body, "model"), prompt=_prompt(body.get("prompt")),
                             options=_options(body, logprobs))


def _prompt(value: Any) -> str | tuple[int, ...]:
    if value is None:
        raise param_error("prompt", "is required", "missing_required_parameter")
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        return tuple(value)
    # A batch of one (LangChain's OpenAI class always sends a list): that one prompt.
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        return _prompt(value[0])
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise param_error("prompt", "is a batch: batched prompts (a list of strings or of token lists)"
                             " are not supported; send one prompt per request",
                   "unsupported_parameter")
    raise param_error("prompt", "must be a non-empty string or a non-empty list of token ids")
