"""A chat request's output constraint -> an llguidance grammar, compiled here before it travels.

Contract:
* `grammar_for(request, kind, start, end)` -> the grammar (llguidance's JSON form) or None:
  - tool_choice "required" or a named function, in a format whose calls are JSON (the generic
    and Hermes formats: `<start>\\n{"name": ..., "arguments": {...}}\\n<end>`; Llama-3 JSON:
    `{"name": ..., "parameters": {...}}`): exactly one call, its name one of the allowed tools
    and its arguments valid for that tool's schema. Other native formats are not constrained
    (their calls are still parsed and checked, markup.py);
  - response_format json_object: any JSON object; json_schema: that schema.
  JSON is compact (no free whitespace): a model that "wants" to pad cannot run out its budget.
* `check(grammar, tokenizer)` compiles it against the model's tokenizer under llguidance's
  limits (the same the node uses) and builds a first mask, or raises a 400 that says why: a
  schema it cannot compile, or one over MAX_GRAMMAR_BYTES or COMPILE_BUDGET_S. So no grammar
  that reaches a node can stall its stage.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from mlx_lm.tokenizer_utils import TokenizerWrapper

from zmqinfer.gateway.api.fields import RequestError
from zmqinfer.gateway.api.request import ChatRequest, Tool
from zmqinfer.protocol.limits import MAX_GRAMMAR_BYTES

# A grammar that takes longer than this to compile and give its first mask is refused: the node
# builds the same matcher on its mlx thread, where every other sequence waits for it.
COMPILE_BUDGET_S = 0.5
# llguidance's defaults, but a tenth of the lexer fuel for building the grammar (~2 ms of
# regex analysis at its documented ~50k/ms): a schema whose regexes need more is refused.
LIMITS = LLParserLimits(initial_lexer_fuel=100_000, step_lexer_fuel=200_000, step_max_items=50_000)
_JSON_OPTIONS: Any = {"whitespace_flexible": False}
JSON_CALL_KINDS = ("generic", "llama3_json")


def _call_schema(tool: Tool, args_key: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["name", args_key],
            "properties": {"name": {"const": tool.name}, args_key: tool.parameters}}


def grammar_for(req: ChatRequest, kind: str, start: str, end: str, hermes: bool) -> str | None:
    choice = req.tool_choice
    if choice.mode == "required" and (kind in JSON_CALL_KINDS or hermes):
        args_key = "parameters" if kind == "llama3_json" else "arguments"
        calls = [_call_schema(t, args_key) for t in req.tools if choice.name in (None, t.name)]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if kind == "llama3_json":
            return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        # Lark string literals take JSON escapes; %json embeds the schema as one rule.
        return LLMatcher.grammar_from_lark(
            f"start: {json.dumps(start + chr(10))} call {json.dumps(chr(10) + end)}\n"
            f'call: %json {json.dumps(schema | {"x-guidance": _JSON_OPTIONS})}\n')
    fmt = req.response_format
    if fmt.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if fmt.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(fmt.schema or {}, defaults=_JSON_OPTIONS)
    return None


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer: TokenizerWrapper) -> LLTokenizer:
    """llguidance's view of the tokenizer (~0.5 s to build, once per tokenizer)."""
    from copy import copy

    backend = copy(tokenizer._tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return LLTokenizer(backend.to_str(), eos_token=sorted(tokenizer.eos_token_ids))


def _refuse(why: str, param: str) -> RequestError:
    return RequestError(f"{param} cannot be enforced: {why}", param=param, code="invalid_schema")


def check(grammar: str, tokenizer: TokenizerWrapper, param: str) -> None:
    """Compile `grammar` as a node will, within the limits; RequestError (400) if it does not."""
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise _refuse(f"its grammar is larger than {MAX_GRAMMAR_BYTES} bytes", param)
    ll = _ll_tokenizer(tokenizer)
    started = time.monotonic()
    matcher = LLMatcher(ll, grammar, limits=LIMITS, log_level=0)
    if not matcher.is_error():
        fill_next_token_bitmask(matcher, allocate_token_bitmask(1, ll.vocab_size), 0)
    if matcher.is_error():
        raise _refuse(matcher.get_error().splitlines()[0][:300], param)
    took = time.monotonic() - started
    if took > COMPILE_BUDGET_S:
        raise _refuse(f"it took {took:.2f} s to compile (the limit is {COMPILE_BUDGET_S:g} s);"
                      " simplify the schema", param)
