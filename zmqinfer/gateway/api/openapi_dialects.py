"""The OpenAPI description of the other dialects' routes (Anthropic Messages, OpenAI Responses,
Ollama), for openapi.py's document. Their ranges are the chat route's (they are validated by it
after translation), built from the same constants; their error bodies are their own dialect's.
"""

from __future__ import annotations

from typing import Any

from zmqinfer.gateway.api.fields import MAX_INTEGER
from zmqinfer.gateway.api.request import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, SEED_RANGE


def _num(lo: float, hi: float, **kw: Any) -> dict[str, Any]:
    return {"type": "number", "minimum": lo, "maximum": hi, "nullable": True, **kw}


def _int(lo: int, hi: int = MAX_INTEGER) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi, "nullable": True}


_STOPS = {"type": "array", "nullable": True, "maxItems": MAX_STOP_SEQUENCES,
          "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}}
_SAMPLING = {"temperature": _num(0, 2), "top_p": _num(0, 1, exclusiveMinimum=True),
             "top_k": _int(0)}
_SCHEMA = {"type": "object", "description": "A JSON schema"}

# ---- Anthropic Messages -----------------------------------------------------------------------

_A_TEXT = {"type": "object", "required": ["type", "text"],
           "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
_A_BLOCK = {"type": "object", "required": ["type"], "description":
            "text, tool_use (assistant), tool_result (user) or thinking blocks; no images",
            "properties": {"type": {"type": "string",
                                    "enum": ["text", "tool_use", "tool_result", "thinking"]}}}
_A_MESSAGE = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
              "properties": {"role": {"type": "string", "enum": ["user", "assistant"]},
                             "content": {"oneOf": [{"type": "string"},
                                                   {"type": "array", "items": _A_BLOCK}]}}}
_A_TOOL = {"type": "object", "required": ["name", "input_schema"],
           "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                          "input_schema": _SCHEMA}}
_A_COMMON = {
    "model": {"type": "string", "description": "Any name; [gateway] aliases are echoed back."},
    "messages": {"type": "array", "minItems": 1, "items": _A_MESSAGE},
    "system": {"nullable": True, "oneOf": [{"type": "string"}, {"type": "array", "items": _A_TEXT}]},
    "tools": {"type": "array", "nullable": True, "items": _A_TOOL},
    "tool_choice": {"type": "object", "nullable": True, "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
        "name": {"type": "string"}, "disable_parallel_tool_use": {"type": "boolean"}}},
    "thinking": {"type": "object", "nullable": True, "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["enabled", "adaptive", "disabled"]},
        "budget_tokens": {"type": "integer"}}},
    "output_config": {"type": "object", "nullable": True, "additionalProperties": False, "properties": {
        "effort": {"type": "string", "nullable": True},
        "format": {"type": "object", "nullable": True, "required": ["type", "schema"],
                   "additionalProperties": False, "properties": {
                       "type": {"type": "string", "enum": ["json_schema"]}, "schema": _SCHEMA}}}},
    "cache_control": {"type": "object", "nullable": True, "description": "Accepted; no effect here"},
}
ANTHROPIC_MESSAGES = {
    "type": "object", "required": ["model", "max_tokens", "messages"], "additionalProperties": False,
    "properties": _A_COMMON | _SAMPLING | {
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_INTEGER,
                       "description": "At most the context length minus the prompt (else 400)."},
        "stop_sequences": _STOPS,
        "stream": {"type": "boolean", "nullable": True},
        "metadata": {"type": "object", "nullable": True, "additionalProperties": False,
                     "properties": {"user_id": {"type": "string", "nullable": True}}},
        "service_tier": {"type": "string", "nullable": True},
        "inference_geo": {"type": "string", "nullable": True},
        "speed": {"type": "string", "nullable": True},
    },
}
ANTHROPIC_COUNT = {"type": "object", "required": ["model", "messages"], "additionalProperties": False,
                   "properties": _A_COMMON}
ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"type": "string", "enum": ["error"]},
    "error": {"type": "object", "required": ["type", "message"],
              "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}

# ---- OpenAI Responses (errors: OpenAI's object) --------------------------------------------

_R_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"type": "string", "enum": ["input_text", "output_text"]}, "text": {"type": "string"}}}
_R_ITEM = {"type": "object", "description": "A message (role, content), function_call (call_id, name,"
           " arguments), function_call_output (call_id, output) or reasoning item", "properties": {
               "type": {"type": "string", "enum": ["message", "function_call", "function_call_output",
                                                   "reasoning"]},
               "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
               "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _R_PART}]}}}
_R_TOOL = {"type": "object", "required": ["type", "name"], "properties": {
    "type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"},
    "description": {"type": "string"}, "parameters": _SCHEMA, "strict": {"type": "boolean"}}}
RESPONSES = {
    "type": "object", "required": ["input"], "additionalProperties": False,
    "description": "Stateless: previous_response_id, conversation, background and store: true get a 400.",
    "properties": _SAMPLING | {
        "model": {"type": "string", "nullable": True},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": _R_ITEM}]},
        "instructions": {"type": "string", "nullable": True},
        "max_output_tokens": _int(1),
        "seed": _int(*SEED_RANGE),
        "stop": {"nullable": True, "oneOf": [{"type": "string", "minLength": 1,
                                              "maxLength": MAX_STOP_CHARS}, _STOPS]},
        "stream": {"type": "boolean", "nullable": True},
        "store": {"type": "boolean", "nullable": True, "enum": [False, None]},
        "tools": {"type": "array", "nullable": True, "items": _R_TOOL},
        "tool_choice": {"nullable": True, "oneOf": [
            {"type": "string", "enum": ["auto", "none", "required"]},
            {"type": "object", "required": ["type", "name"], "properties": {
                "type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"}}}]},
        "parallel_tool_calls": {"type": "boolean", "nullable": True},
        "text": {"type": "object", "nullable": True, "properties": {"format": {
            "type": "object", "required": ["type"], "properties": {
                "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
                "name": {"type": "string"}, "schema": _SCHEMA}}}},
        "reasoning": {"type": "object", "nullable": True, "properties": {
            "effort": {"type": "string", "nullable": True}}},
        "metadata": {"type": "object", "nullable": True},
        "user": {"type": "string", "nullable": True},
        "include": {"type": "array", "nullable": True, "items": {"type": "string"}},
    },
}

# ---- Ollama (errors: {"error": "..."}) --------------------------------------------------------

_O_OPTIONS = {"type": "object", "nullable": True, "description": "Sampling options as the chat"
              " route bounds them; num_ctx at most the ring's context; llama.cpp runtime knobs"
              " (num_gpu, num_thread, ...) accepted and unused", "properties": _SAMPLING | {
                  "num_predict": {"type": "integer", "minimum": -2, "maximum": MAX_INTEGER,
                                  "nullable": True, "description": "-1, -2: the default budget"},
                  "seed": _int(*SEED_RANGE), "stop": _STOPS, "num_ctx": _int(1)}}
_O_COMMON = {
    "model": {"type": "string"},
    "format": {"nullable": True, "oneOf": [{"type": "string", "enum": ["json", ""]}, _SCHEMA]},
    "options": _O_OPTIONS,
    "stream": {"type": "boolean", "nullable": True, "description": "Default true (NDJSON)"},
    "keep_alive": {"nullable": True, "oneOf": [{"type": "string"}, {"type": "number"}]},
    "think": {"nullable": True, "oneOf": [{"type": "boolean"},
                                          {"type": "string", "enum": ["low", "medium", "high"]}]},
}
_O_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
    "content": {"type": "string"}, "tool_name": {"type": "string"},
    "tool_calls": {"type": "array", "items": {"type": "object"}}}}
OLLAMA_CHAT = {"type": "object", "required": ["model", "messages"], "additionalProperties": False,
               "properties": _O_COMMON | {
                   "messages": {"type": "array", "items": _O_MESSAGE,
                                "description": "Empty: only load the model (done_reason load)"},
                   "tools": {"type": "array", "nullable": True, "items": {"type": "object"}}}}
OLLAMA_GENERATE = {"type": "object", "required": ["model"], "additionalProperties": False,
                   "properties": _O_COMMON | {
                       "prompt": {"type": "string", "nullable": True},
                       "system": {"type": "string", "nullable": True},
                       "raw": {"type": "boolean", "nullable": True}}}
OLLAMA_SHOW = {"type": "object", "additionalProperties": False, "properties": {
    "model": {"type": "string"}, "name": {"type": "string"}, "verbose": {"type": "boolean"}}}
OLLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}

SCHEMAS: dict[str, Any] = {
    "OllamaChatRequest": OLLAMA_CHAT, "OllamaGenerateRequest": OLLAMA_GENERATE,
    "OllamaShowRequest": OLLAMA_SHOW, "OllamaError": OLLAMA_ERROR,
    "ResponsesRequest": RESPONSES,
    "AnthropicMessagesRequest": ANTHROPIC_MESSAGES, "AnthropicCountRequest": ANTHROPIC_COUNT,
    "AnthropicError": ANTHROPIC_ERROR,
}
