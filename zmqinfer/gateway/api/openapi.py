"""GET /openapi.json: an OpenAPI 3 description of the API's routes (the other dialects' request
schemas are openapi_dialects.py's).

Static: the request bodies carry the same ranges validate.py enforces (built from its constants,
so the two cannot drift), and every route lists the errors it can answer with, 503 included.
Bounds that depend on the model (top_k and logit_bias ids below the vocabulary, max_tokens within
the context) are stated in descriptions: a schema cannot know the model.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from zmqinfer.gateway.api import openapi_dialects as dialects
from zmqinfer.gateway.api.fields import MAX_INTEGER
from zmqinfer.gateway.api.validate import (
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    MAX_LOGIT_BIAS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    REPETITION_PENALTY_RANGE,
    SEED_RANGE,
)


def _num(lo: float, hi: float, why: str = "", **kw: Any) -> dict[str, Any]:
    return {"type": "number", "minimum": lo, "maximum": hi, "nullable": True, "description": why, **kw}


def _int(lo: int, hi: int, why: str = "") -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi, "nullable": True, "description": why}


_STOP_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
_COMMON: dict[str, Any] = {
    "model": {"type": "string", "nullable": True, "description": "Ignored: the gateway serves one model."},
    "max_tokens": _int(1, MAX_INTEGER, "At most the context length minus the prompt (else 400)."),
    "temperature": _num(0, 2, "Below 1e-5 means greedy."),
    "top_p": _num(0, 1, exclusiveMinimum=True),
    "top_k": _int(0, MAX_INTEGER, "0 = off; at most the vocabulary size (else 400)."),
    "min_p": _num(0, 1),
    "seed": _int(*SEED_RANGE, "int64 or uint64: the same 64 bits either way."),
    "stop": {"nullable": True, "oneOf": [_STOP_TEXT, {"type": "array", "items": _STOP_TEXT,
                                                      "maxItems": MAX_STOP_SEQUENCES}]},
    "presence_penalty": _num(-2, 2),
    "frequency_penalty": _num(-2, 2),
    "repetition_penalty": _num(*REPETITION_PENALTY_RANGE),
    "logit_bias": {"type": "object", "nullable": True, "maxProperties": MAX_LOGIT_BIAS,
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                   "description": "Keys: token ids (decimal strings) inside the vocabulary."},
    "stream": {"type": "boolean", "nullable": True},
    "stream_options": {"type": "object", "nullable": True, "additionalProperties": False,
                       "properties": {"include_usage": {"type": "boolean", "nullable": True}},
                       "description": "Only with stream: true."},
    "user": {"type": "string", "nullable": True},
    "n": _int(1, 1, "Only 1 is supported."),
}
_TEXT_PART = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
              "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
_FUNCTION_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"}
_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": _FUNCTION_NAME, "arguments": {"type": "string", "description": "A JSON object as text."}}}}}
_MESSAGE = {
    "type": "object", "required": ["role"], "additionalProperties": False,
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"nullable": True, "oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}],
                    "description": "Required, except null on an assistant turn."},
        "name": {"type": "string", "nullable": True},
        "tool_calls": {"type": "array", "nullable": True, "items": _TOOL_CALL,
                       "description": "Assistant messages only."},
        "tool_call_id": {"type": "string", "nullable": True, "description": "Required on a tool message."},
        "refusal": {"type": "string", "nullable": True, "description": "Sent back: ignored."},
    },
}
_TOOLS = {"type": "array", "nullable": True, "maxItems": 128, "items": {
    "type": "object", "required": ["type", "function"], "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
            "name": _FUNCTION_NAME, "description": {"type": "string"}, "strict": {"type": "boolean"},
            "parameters": {"type": "object", "description": "A JSON schema."}}}}}}
_AGENT_FIELDS: dict[str, Any] = {
    "tools": _TOOLS,
    "tool_choice": {"nullable": True, "oneOf": [
        {"type": "string", "enum": ["auto", "none", "required"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {"name": _FUNCTION_NAME}}}}]},
    "parallel_tool_calls": {"type": "boolean", "nullable": True},
    "response_format": {"type": "object", "nullable": True, "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object", "description": "name, schema, strict: enforced by a grammar"}}},
    "chat_template_kwargs": {"type": "object", "nullable": True,
                             "description": "Extra variables for the chat template (e.g. enable_thinking)."},
}
_CHAT = {
    "type": "object", "required": ["messages"], "additionalProperties": False,
    "properties": _COMMON | {
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_completion_tokens": _int(1, MAX_INTEGER, "The newer name of max_tokens."),
        "logprobs": {"type": "boolean", "nullable": True},
        "top_logprobs": _int(0, MAX_CHAT_TOP_LOGPROBS, "Needs logprobs: true."),
    } | _AGENT_FIELDS,
}
_COMPLETION = {
    "type": "object", "required": ["prompt"], "additionalProperties": False,
    "properties": _COMMON | {
        "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                             {"type": "array", "minItems": 1,
                              "items": {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER}}],
                   "description": "Text, or token ids inside the vocabulary."},
        "logprobs": _int(0, MAX_COMPLETION_LOGPROBS),
    },
}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True}}}}}
_WHY = {
    "400": "Invalid request (OpenAI's error object names the param)", "401": "Missing or invalid API key",
    "404": "Not found", "405": "Method not allowed", "408": "The body did not arrive in time",
    "413": "Body too large", "429": "Too many requests in flight",
    "500": "Internal error (no details: see the server log)",
    "503": "The inference ring is unavailable (not ready, re-planning, or no placement fits)",
    "504": "The inference ring timed out",
}


def _errors(*codes: str, error: str = "Error") -> dict[str, Any]:
    return {c: {"description": _WHY[c], "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}}
            for c in codes}


def _generate(schema: str, summary: str, *, error: str = "Error",
              stream: str = "text/event-stream") -> dict[str, Any]:
    ok = {"description": "The completion (JSON), or with stream: true a stream",
          "content": {"application/json": {"schema": {"type": "object"}},
                      stream: {"schema": {"type": "string"}}}}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {"200": ok} | _errors("400", "401", "408", "413", "429", "500", "503", "504",
                                          error=error)}}


def _post(schema: str, summary: str, *more: str, error: str) -> dict[str, Any]:
    """A POST that answers JSON and generates nothing (count_tokens, Ollama's show)."""
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {"200": ok} | _errors("400", "401", "408", "413", "429", "500", *more,
                                          error=error)}}


def _get(summary: str, *errors: str, content: str = "application/json",
         error: str = "Error") -> dict[str, Any]:
    body = {"type": "object"} if content == "application/json" else {"type": "string"}
    return {"get": {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {content: {"schema": body}}}}
        | _errors("401", *errors, error=error)}}


SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "zmqinfer gateway", "version": "1",
             "description": "OpenAI-compatible API of a pipeline-parallel inference ring."},
    "paths": {
        "/v1/chat/completions": _generate("ChatRequest", "Chat completion"),
        "/v1/completions": _generate("CompletionRequest", "Legacy text completion"),
        "/v1/messages": _generate("AnthropicMessagesRequest", "Anthropic Messages",
                                  error="AnthropicError"),
        "/v1/messages/count_tokens": _post("AnthropicCountRequest", "Anthropic: count a prompt's"
                                           " tokens", error="AnthropicError"),
        "/v1/responses": _generate("ResponsesRequest", "OpenAI Responses (stateless)"),
        "/api/chat": _generate("OllamaChatRequest", "Ollama chat", error="OllamaError",
                               stream="application/x-ndjson"),
        "/api/generate": _generate("OllamaGenerateRequest", "Ollama generate", error="OllamaError",
                                   stream="application/x-ndjson"),
        "/api/show": _post("OllamaShowRequest", "Ollama: describe a model", "404",
                           error="OllamaError"),
        "/api/tags": _get("Ollama: the models served", error="OllamaError"),
        "/api/ps": _get("Ollama: the models loaded", error="OllamaError"),
        "/api/version": _get("Ollama: the API version these routes follow", error="OllamaError"),
        "/v1/models": _get("The served model"),
        "/v1/models/{model_id}": {"get": {
            "summary": "One model", "parameters": [{"name": "model_id", "in": "path", "required": True,
                                                     "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
            | _errors("401", "404")}},
        "/health": {"get": {"summary": "Ready or not", "responses": {
            "200": {"description": "The ring serves", "content": {"application/json": {"schema": {"type": "object"}}}},
            "503": {"description": "The ring is not ready", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        "/cluster/status": _get("Ring state: nodes, layers, epoch"),
        "/cluster/ping": {"post": {"summary": "Round trips to every node and through the ring", "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
            | _errors("401")}},
        "/openapi.json": _get("This document"),
        "/metrics": _get("Prometheus metrics (text exposition format)", content="text/plain"),
        "/": _get("The live status page", content="text/html"),
        "/chat": _get("A minimal chat that streams from the API", content="text/html"),
    },
    "components": {"schemas": {"ChatRequest": _CHAT, "CompletionRequest": _COMPLETION, "Error": _ERROR}
                   | dialects.SCHEMAS},
}


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(SPEC)
