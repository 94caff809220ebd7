"""Issue 20 on a real 3-node ring of the embedded model (its template has no tool syntax, so the
generic Hermes format): tool_choice required and named give schema-valid calls, streamed and
not; json_object and json_schema give valid JSON; the openai SDK's `parse` and LangChain's
`bind_tools` / `with_structured_output` work; a history holding a call and its result answers;
hostile schemas are a 400 within a second and every process keeps its pid; kill -9 of the
middle node during a grammar-constrained stream still gives the same valid answer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import openai
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

from tests.unit.gateway.test_api_grammar import HOSTILE
from zmqinfer import local
from zmqinfer.local import LocalCluster

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}}}}
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
        "properties": {"city": {"type": "string", "maxLength": 30},
                       "country": {"type": "string", "maxLength": 30},
                       "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
MAX_TOKENS = 96


def client(c: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def assemble(stream) -> tuple[str, list[dict], str | None]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            slot = calls.setdefault(c.index, {"name": "", "arguments": ""})
            slot["name"] += (c.function.name or "") if c.function else ""
            slot["arguments"] += (c.function.arguments or "") if c.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def valid_call(name: str, arguments: str) -> None:
    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    Draft202012Validator(tool["function"]["parameters"]).validate(json.loads(arguments))


def test_required_and_named_tool_calls_are_schema_valid(cluster: LocalCluster) -> None:
    """required, streamed (assembled from its deltas), then a named function, whole. (Each
    request prefills the ~230-token tool prompt: the two cover both shapes and both choices.)"""
    api = client(cluster)
    kw = dict(model="m", messages=ASK, tools=[WEATHER, TIME], max_tokens=MAX_TOKENS, temperature=0)
    content, calls, finish = assemble(api.chat.completions.create(**kw, tool_choice="required",
                                                                  stream=True))
    assert content == "" and finish == "tool_calls" and len(calls) == 1
    valid_call(calls[0]["name"], calls[0]["arguments"])
    r = api.chat.completions.create(**kw, tool_choice={"type": "function",
                                                       "function": {"name": "get_time"}})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and call.id.startswith("call_")
    valid_call(call.function.name, call.function.arguments)


def test_a_history_with_a_tool_call_and_its_result_renders_and_answers(cluster: LocalCluster) -> None:
    """The turn after a tool ran: the assistant's call and the tool's result are rendered into
    the prompt (generic format: a <tool_call> text and a <tool_response> user turn) and the ring
    answers it."""
    api = client(cluster)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    result = "Paris: 18 degrees Celsius, sunny, light wind from the west."
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": result}]
    kw = dict(model="m", tools=[WEATHER, TIME], temperature=0)
    before = api.chat.completions.create(**kw, messages=ASK, max_tokens=1)
    r = api.chat.completions.create(**kw, messages=history, max_tokens=32)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    assert r.usage is not None and before.usage is not None
    grew = r.usage.prompt_tokens - before.usage.prompt_tokens
    assert grew > len(result) // 4, f"the call and its result were not rendered ({grew} tokens)"


@pytest.mark.parametrize("fmt, stream", [
    ({"type": "json_object"}, False),
    ({"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}, True),
])
def test_json_modes_give_valid_json(cluster: LocalCluster, fmt, stream: bool) -> None:
    api = client(cluster)
    kw = dict(model="m", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
              response_format=fmt, max_tokens=MAX_TOKENS, temperature=0)
    if stream:
        text, _, finish = assemble(api.chat.completions.create(**kw, stream=True))
    else:
        r = api.chat.completions.create(**kw)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop", text
    value = json.loads(text)
    assert isinstance(value, dict)
    if fmt["type"] == "json_schema":
        Draft202012Validator(CITY).validate(value)


class City(BaseModel):
    city: str = Field(max_length=30)
    population: int = Field(ge=0, le=100_000_000)


def test_sdk_parse_with_a_pydantic_model(cluster: LocalCluster) -> None:
    r = client(cluster).chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "The biggest city of France?"}],
        response_format=City, max_tokens=MAX_TOKENS, temperature=0)
    assert isinstance(r.choices[0].message.parsed, City)


def test_langchain_bind_tools_and_structured_output(cluster: LocalCluster) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=cluster.url + "/v1", api_key="unused", model="m", temperature=0,
                     max_tokens=MAX_TOKENS, max_retries=0, timeout=120)
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"].get("city"), str)
    city = llm.with_structured_output(City, method="json_schema").invoke("The biggest city of France?")
    assert isinstance(city, City)


def test_hostile_schemas_are_a_fast_400_and_every_process_lives(cluster: LocalCluster) -> None:
    import urllib.error
    import urllib.request

    pids = cluster.node_pids()
    for name, schema in HOSTILE.items():
        body = ('{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema",'
                '"json_schema":{"name":"x","schema":%s}}}' % schema).encode()
        req = urllib.request.Request(cluster.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and time.monotonic() - started < 1.0, name
    assert cluster.node_pids() == pids and all(local.pid_running(p) for p in pids.values())
    assert cluster.status()["ready"]


# ---- kill -9 of the middle node during a constrained stream --------------------------------------

KILL_AFTER_CHUNKS = 6
LIST_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["cities"],
               "properties": {"cities": {"type": "array", "minItems": 5, "maxItems": 5, "items": CITY}}}


async def _stream(c: LocalCluster, on_chunk=None) -> tuple[str, str | None]:
    api = openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    async with api:
        stream = await api.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Five big European cities as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "l", "schema": LIST_SCHEMA}},
            max_tokens=400, temperature=0, stream=True)
        text, finish, n = "", None, 0
        async for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            n += 1
            if on_chunk is not None:
                on_chunk(n)
    return text, finish


def test_kill_9_mid_constrained_stream_gives_the_same_valid_answer(tmp_path: Path) -> None:
    c = local.start(tmp_path)
    try:
        whole, finish = asyncio.run(asyncio.wait_for(_stream(c), 180))
        assert finish == "stop", whole
        Draft202012Validator(LIST_SCHEMA).validate(json.loads(whole))
        victim = c.node_pids()["node1"]
        killed: list[float] = []

        def kill(n: int) -> None:
            if n == KILL_AFTER_CHUNKS and not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(time.monotonic())

        again, finish = asyncio.run(asyncio.wait_for(_stream(c, kill), 240))
        assert killed, "the stream ended before the kill"
        assert finish == "stop" and again == whole
        assert c.status().get("replans"), "the ring never re-planned: the kill did not land mid-stream"
    finally:
        local.stop(c)
