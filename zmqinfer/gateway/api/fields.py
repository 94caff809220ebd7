"""A request body's JSON, and readers for its typed fields: every 400 about one value's type or
range, and the error they raise (rendered as OpenAI's `{"error": {...}}` object). What a whole
chat or completion request may hold is validate.py's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from zmqinfer.protocol.limits import MAX_TOKEN_ID

# Every integer a client sends is at most this (token ids are int32 on the wire; a budget or a
# top_k larger than any vocabulary or context means nothing). prompt.plan then checks top_k and
# logit_bias ids against the actual vocabulary, and the budget against the context.
MAX_INTEGER = MAX_TOKEN_ID


class RequestError(Exception):
    """A request the API refuses; rendered as OpenAI's error object with HTTP `status`."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status



# ---- body -------------------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`, or RequestError."""
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise RequestError(f"the request body is not valid JSON: {str(e)[:200]}",
                           code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    _no_lone_surrogates(body)
    return body


def _no_lone_surrogates(body: dict[str, Any]) -> None:
    """JSON may escape half a UTF-16 pair ("\\udc80"): valid JSON, but no text. Refused here,
    by where it is, instead of failing deep in the tokenizer."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{where}.{k}" if where else str(k), k) for k in value]  # keys are text too
            stack += [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                name = where.encode("utf-8", "backslashreplace").decode()[:100]
                raise RequestError(f"{name} contains a lone surrogate (\\u{ord(value[e.start]):04x}) at"
                                   f" character {e.start}: not valid Unicode text",
                                   param=name.split("[")[0].split(".")[0], code="invalid_unicode") from None


# ---- field readers: None (absent or null) gives the default --------------------------------


def param_error(name: str, message: str, code: str = "invalid_value") -> RequestError:
    return RequestError(f"{name} {message}", param=name, code=code)


_T = TypeVar("_T")


def given(value: _T | None) -> _T:
    """A parameter read with a non-None default is never None."""
    assert value is not None
    return value


def number(body: Mapping[str, Any], name: str, default: float | None, lo: float, hi: float,
            *, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    # bool is not a number here; an int is compared as is (float() of 10**400 would raise)
    if type(value) not in (int, float) or (type(value) is float and not math.isfinite(value)):
        raise param_error(name, "must be a number", "invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        raise param_error(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {_shown(value)}")
    return float(value)


def _shown(value: float) -> str:
    """A client's number for an error message: never thousands of digits."""
    text = str(value)
    return text if len(text) <= 24 else f"a number of {len(text)} digits"


def integer(body: Mapping[str, Any], name: str, default: int | None, lo: int,
             hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not int:
        raise param_error(name, "must be an integer", "invalid_type")
    top = MAX_INTEGER if hi is None else hi
    if value < lo or value > top:
        bound = (f"between {lo} and {hi}" if hi is not None
                 else f">= {lo}" if value < lo else f"at most {MAX_INTEGER}")
        raise param_error(name, f"must be {bound}, got {_shown(value)}")
    return value


def boolean(body: Mapping[str, Any], name: str, default: bool, where: str = "") -> bool:
    value = body.get(name)
    if value is not None and type(value) is not bool:
        raise param_error(where + name, "must be true or false", "invalid_type")
    return default if value is None else value


def string(body: Mapping[str, Any], name: str, where: str = "") -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise param_error(where + name, "must be a string", "invalid_type")
    return value


def check_fields(body: Mapping[str, Any], known: frozenset[str],
                  unsupported: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    unknown = sorted(set(body) - known - set(unsupported))
    if unknown:
        also = f" (also {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""
        raise RequestError(f"unknown field {unknown[0]!r}{also}", param=unknown[0],
                           code="unknown_parameter")
    for name, (harmless, why) in unsupported.items():
        if name in body and body[name] is not None and not harmless(body[name]):
            raise RequestError(f"{name}: {why}", param=name, code="unsupported_parameter")
