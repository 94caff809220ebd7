"""The agent fields of a chat body -> request.py's types: `tools`, `tool_choice`,
`parallel_tool_calls`, `response_format`, `chat_template_kwargs`, and the `tool_calls` of an
assistant message sent back in the history. Each 400 names the field to fix.

Schemas are checked here as JSON Schema documents (jsonschema's metaschema) and against a size
limit; whether the grammar engine can compile one within its budget is grammar.py's question.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from zmqinfer.gateway.api.fields import RequestError, boolean, param_error, string
from zmqinfer.gateway.api.request import ResponseFormat, Tool, ToolCall, ToolChoice
from zmqinfer.protocol.limits import MAX_GRAMMAR_BYTES

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's function names (plus '.', as MCP uses)
# Variables the server itself sets when it renders a template: a client may not replace them.
_RESERVED_TEMPLATE_VARS = frozenset({"messages", "tools", "add_generation_prompt", "tokenize",
                                     "documents", "continue_final_message", "return_dict"})
MAX_TEMPLATE_KWARGS = 32
MAX_TOOL_CALLS_PER_MESSAGE = 128
# JSON levels of a schema document (each schema level is ~2: "properties" and the property).
# OpenAI's structured outputs allow 10 levels of objects; 64 leaves room for that and $defs,
# and keeps every recursive walk of it (jsonschema's, the grammar compiler's) shallow.
MAX_SCHEMA_DEPTH = 64


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise param_error(where, "must be an object", "invalid_type")
    return value


def _depth(value: Any) -> int:
    """How deeply objects and lists nest (iteratively: a hostile schema must not recurse us)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack += [(c, d + 1) for c in (v.values() if isinstance(v, dict) else v)]
    return deepest


def _schema(value: Any, where: str) -> dict[str, Any]:
    schema = _obj(value, where)
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise param_error(where, f"nests deeper than {MAX_SCHEMA_DEPTH} levels of JSON")
    if len(json.dumps(schema)) > MAX_GRAMMAR_BYTES:
        raise param_error(where, f"is larger than {MAX_GRAMMAR_BYTES} bytes of JSON")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise param_error(where, f"is not a valid JSON schema: {e.message[:200]}") from None
    except RecursionError:
        raise param_error(where, "is nested too deeply") from None
    return schema


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise param_error(where, "must be 1 to 64 letters, digits, '_', '-' or '.'")
    return value


def tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise param_error("tools", "must be a list of tool objects", "invalid_type")
    if len(value) > MAX_TOOLS:
        raise param_error("tools", f"takes at most {MAX_TOOLS} tools, got {len(value)}")
    out: dict[str, Tool] = {}
    for i, t in enumerate(value):
        where = f"tools[{i}]"
        t = _obj(t, where)
        if t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise param_error(where, 'must be {"type": "function", "function": {...}}')
        f = t["function"]
        extra = sorted(set(f) - {"name", "description", "parameters", "strict"})
        if extra:
            raise param_error(f"{where}.function.{extra[0]}", "is an unknown field", "unknown_parameter")
        name = _name(f.get("name"), f"{where}.function.name")
        if name in out:
            raise param_error(f"{where}.function.name", f"{name!r} is defined twice")
        params = f.get("parameters")
        schema = ({"type": "object", "properties": {}} if params is None
                  else _schema(params, f"{where}.function.parameters"))
        out[name] = Tool(name, string(f, "description", f"{where}.function.") or "", schema,
                         boolean(f, "strict", False, f"{where}.function."))
    return tuple(out.values())


def tool_choice(value: Any, defined: tuple[Tool, ...]) -> ToolChoice:
    if value is None:
        return ToolChoice("auto")
    if value in ("auto", "none", "required"):
        choice = ToolChoice(value)
    elif (isinstance(value, dict) and value.get("type") == "function"
          and isinstance(value.get("function"), dict)):
        choice = ToolChoice("required", _name(value["function"].get("name"), "tool_choice.function.name"))
    else:
        raise param_error("tool_choice", 'must be "auto", "none", "required" or'
                                         ' {"type": "function", "function": {"name": ...}}')
    if choice.mode == "required" and not defined:
        raise param_error("tool_choice", "asks for a tool call, but no tools are given")
    if choice.name is not None and choice.name not in {t.name for t in defined}:
        raise param_error("tool_choice", f"names {choice.name!r}, which is not in tools")
    return choice


def response_format(value: Any) -> ResponseFormat:
    if value is None:
        return ResponseFormat("text")
    fmt = _obj(value, "response_format")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        if set(fmt) != {"type"}:
            raise param_error("response_format", f"of type {kind} takes no other field")
        return ResponseFormat(kind)
    if kind != "json_schema":
        raise param_error("response_format.type", 'must be "text", "json_object" or "json_schema"')
    spec = _obj(fmt.get("json_schema"), "response_format.json_schema")
    extra = sorted(set(spec) - {"name", "description", "schema", "strict"})
    if extra:
        raise param_error(f"response_format.json_schema.{extra[0]}", "is an unknown field",
                          "unknown_parameter")
    name = _name(spec.get("name"), "response_format.json_schema.name")
    schema = spec.get("schema")
    return ResponseFormat("json_schema", name,
                          {} if schema is None else _schema(schema, "response_format.json_schema.schema"),
                          boolean(spec, "strict", False, "response_format.json_schema."))


def template_kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    kwargs = _obj(value, "chat_template_kwargs")
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise param_error("chat_template_kwargs", f"takes at most {MAX_TEMPLATE_KWARGS} entries")
    reserved = sorted(set(kwargs) & _RESERVED_TEMPLATE_VARS)
    if reserved:
        raise param_error(f"chat_template_kwargs.{reserved[0]}", "is set by the server, not the request")
    return dict(kwargs)


def message_tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls` as clients send it back (null and [] included)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOOL_CALLS_PER_MESSAGE:
        raise param_error(where, f"must be a list of at most {MAX_TOOL_CALLS_PER_MESSAGE} tool calls",
                          "invalid_type")
    out = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        call = _obj(call, at)
        f = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(f, dict):
            raise param_error(at, 'must be {"id": ..., "type": "function", "function": {...}}')
        args = f.get("arguments", "{}")
        if isinstance(args, Mapping):  # some clients send the parsed object back
            args = json.dumps(args)
        if not isinstance(args, str):
            raise param_error(f"{at}.function.arguments", "must be a JSON string", "invalid_type")
        try:
            if not isinstance(json.loads(args or "{}"), dict):
                raise ValueError("not an object")
        except ValueError:
            raise param_error(f"{at}.function.arguments", "must be a JSON object as text") from None
        call_id = string(call, "id", f"{at}.") or f"call_{i}"
        out.append(ToolCall(call_id, _name(f.get("name"), f"{at}.function.name"), args or "{}"))
    return tuple(out)


def check_tool_messages(roles: list[tuple[str, str | None]]) -> None:
    """A tool message without tool_call_id cannot be matched to its call."""
    for i, (role, call_id) in enumerate(roles):
        if role == "tool" and not call_id:
            raise RequestError(f"messages[{i}].tool_call_id is required for a tool message",
                               param=f"messages[{i}].tool_call_id", code="missing_required_parameter")
