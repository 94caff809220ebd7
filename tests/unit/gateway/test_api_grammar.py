"""Structured output at the gateway: the grammar a request asks for is compiled here and rides in
its sampling parameters from the first generated position; a request without one is sent as
before; hostile schemas get a 400 within a second (and nothing is generated)."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import BaseModel

from tests.unit.gateway.test_api_openai import CHAT, ScriptedBackend, oai, script, serve
from tests.unit.gateway.test_api_roundtrip import USER, WEATHER
from zmqinfer.protocol.limits import MAX_GRAMMAR_BYTES


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_object"}},
    {"response_format": schema_format({"type": "object", "properties": {"a": {"type": "integer"}}})},
    {"tools": [WEATHER], "tool_choice": "required"},
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
])
async def test_the_grammar_rides_in_the_sampling_parameters(extra):
    backend = ScriptedBackend(script('{"a": 1}'))
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions", json=CHAT | extra)
        assert r.status == 200, await r.text()
    prompt, params, _, _ = backend.calls[0]
    assert params.grammar  # llguidance's JSON form, or Lark text for a tool call
    assert params.grammar_start == len(prompt)


@pytest.mark.parametrize("extra", [{}, {"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "none"},
                                   {"response_format": {"type": "text"}}])
async def test_no_grammar_unless_asked(extra):
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT | extra)).status == 200
    assert backend.calls[0][1].grammar is None and backend.calls[0][1].grammar_start == 0


class Answer(BaseModel):
    city: str
    temperature_c: int


async def test_the_sdks_parse_returns_a_parsed_object():
    backend = ScriptedBackend(script('{"city": "Paris", "temperature_c": 21}'))
    async with serve(backend) as client:
        async with oai(client) as api:
            r = await api.chat.completions.parse(model="m", messages=[USER], response_format=Answer)
    assert r.choices[0].message.parsed == Answer(city="Paris", temperature_c=21)
    grammar = json.loads(backend.calls[0][1].grammar)
    assert "temperature_c" in json.dumps(grammar)  # the pydantic model's schema is what is enforced


def nested(n: int) -> str:
    return '{"type":"object","properties":{"a":' * n + '{"type":"string"}' + "}}" * n


HOSTILE = {
    "deeply nested": nested(40),
    "nested past the JSON parser": nested(2000),
    "a huge enum": json.dumps({"enum": [f"value-{i}" for i in range(MAX_GRAMMAR_BYTES // 8)]}),
    "a regex it cannot run": json.dumps({"type": "string", "pattern": "(?=a)b"}),
    "an unknown format": json.dumps({"type": "string", "format": "hostname-xyz"}),
    "an integer range past int64": json.dumps({"type": "integer", "minimum": -1e300, "maximum": 1e300}),
    "not a schema": json.dumps({"type": 12}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_schemas_are_a_fast_400(name):
    backend = ScriptedBackend(script())
    body = ('{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema",'
            '"json_schema":{"name":"x","schema":%s}}}' % HOSTILE[name])
    async with serve(backend) as client:
        started = time.monotonic()
        r = await client.post("/v1/chat/completions", data=body,
                              headers={"Content-Type": "application/json"})
        took = time.monotonic() - started
        error = (await r.json())["error"]
    assert r.status == 400 and took < 1.0, (name, r.status, took)
    assert error["code"] == "invalid_json" or error["param"].startswith("response_format"), error
    assert backend.calls == []


async def test_a_prompt_that_opened_reasoning_starts_the_grammar_after_it():
    from tests.unit.gateway.test_api_tools import thinking_tokenizer
    from tests.unit.gateway.test_textout import CHATML

    backend = ScriptedBackend([])
    backend.tokenizer = thinking_tokenizer()
    backend.tokens = backend.tokenizer.encode("The capital is Paris.", add_special_tokens=False)
    async with serve(backend) as client:
        assert (await client.post("/v1/chat/completions",
                                  json=CHAT | {"response_format": {"type": "json_object"}})).status == 200
        backend.tokenizer._tokenizer.chat_template = CHATML.replace(
            "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n")
        assert (await client.post("/v1/chat/completions",
                                  json=CHAT | {"response_format": {"type": "json_object"}})).status == 200
    plain, opened = backend.calls[0][1], backend.calls[1][1]
    end = tuple(backend.tokenizer.think_end_tokens)
    # Qwen3-style: the model may open <think> itself with its first token
    assert plain.grammar and plain.grammar_after == end
    assert plain.grammar_opener == backend.tokenizer.think_start_tokens[0]
    # R1-style: the prompt opened it, the grammar waits for the end marker at once
    assert opened.grammar and opened.grammar_after == end and opened.grammar_opener is None
