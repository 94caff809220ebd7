"""anthropic.py: Anthropic's Messages API through a real aiohttp server and the official
`anthropic` client; the translation to an OpenAI chat body and the event stream of deltas that
carry reasoning and tool calls (built by hand: the chat path's tools arrive with issue 20)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
from anthropic.types import Message
import pytest
from aiohttp.test_utils import TestClient

from tests.unit.gateway.test_api_openai import KEY, TEXT, ScriptedBackend, script, serve
from zmqinfer.gateway.api.anthropic import MessageShape, to_chat
from zmqinfer.gateway.api.fields import RequestError
from zmqinfer.gateway.api.shape import Outcome
from zmqinfer.gateway.errors import RingUnavailable
from zmqinfer.gateway.prefixes import Scope
from zmqinfer.gateway.textout import Delta, ToolCallDelta

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 50, "system": "Be brief.",
        "messages": [{"role": "user", "content": "Say hello"}]}


def client_of(client: TestClient, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key=key, max_retries=0)


def events(body: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), block
            out.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return out


async def test_messages_through_the_official_client_with_x_api_key():
    backend = ScriptedBackend(script())
    async with serve(backend, api_keys=frozenset({KEY}), aliases=("claude-*",)) as client:
        async with client_of(client) as ac:  # the SDK sends x-api-key and anthropic-version
            m = await ac.messages.create(**BODY)
            assert [b.type for b in m.content] == ["text"] and m.content[0].text == TEXT
            assert (m.stop_reason, m.stop_sequence, m.model) == ("end_turn", None, "claude-sonnet-4-5")
            prompt = backend.calls[0][0]
            chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
            assert prompt == list(backend.tokenizer.apply_chat_template(chat, add_generation_prompt=True))
            assert (m.usage.input_tokens, m.usage.output_tokens) == (len(prompt), len(script()))

            counted = await ac.messages.count_tokens(model=BODY["model"], system=BODY["system"],
                                                     messages=BODY["messages"])
            assert counted.input_tokens == len(prompt)

            with pytest.raises(anthropic.AuthenticationError) as e:
                async with client_of(client, "sk-wrong-key-0123456789") as bad:
                    await bad.messages.create(**BODY)
            assert e.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


async def test_an_unaliased_name_is_answered_with_the_served_model():
    async with serve(ScriptedBackend(script())) as client:
        async with client_of(client) as ac:
            m = await ac.messages.create(**BODY)
        assert m.model == "scripted-model"
        assert (await client.get("/v1/models/claude-sonnet-4-5")).status == 404
    async with serve(ScriptedBackend(script()), aliases=("claude-*", "gpt-4o")) as client:
        card = await (await client.get("/v1/models/claude-sonnet-4-5")).json()
        assert card["id"] == "claude-sonnet-4-5"
        listed = await (await client.get("/v1/models")).json()
        assert [m["id"] for m in listed["data"]] == ["scripted-model", "gpt-4o"]  # no globs


async def test_streaming_event_sequence_and_the_sdk_accumulates_it():
    async with serve(ScriptedBackend(script())) as client:
        r = await client.post("/v1/messages", json=BODY | {"stream": True},
                              headers={"anthropic-version": "2023-06-01"})
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        got = events(await r.text())
        names = [n for n, _ in got]
        assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert all(n == d["type"] for n, d in got)
        assert "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta") == TEXT
        assert got[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        async with client_of(client) as ac, ac.messages.stream(**BODY) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == TEXT and final.content[0].text == TEXT and final.stop_reason == "end_turn"
        assert final.usage.output_tokens == len(script())


async def test_stop_sequences_and_max_tokens():
    async with serve(ScriptedBackend(script())) as client:
        async with client_of(client) as ac:
            m = await ac.messages.create(**BODY | {"stop_sequences": ["world"]})
            assert (m.content[0].text, m.stop_reason, m.stop_sequence) == ("Hello ", "stop_sequence", "world")
            m = await ac.messages.create(**BODY | {"max_tokens": 2})
        assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2


@pytest.mark.parametrize("change,param", [
    ({"max_tokens": None}, "max_tokens is required"),
    ({"messages": []}, "messages must not be empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image block"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role must be user or assistant"),
    ({"temperature": 3}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"frequency_penalty": 1}, "frequency_penalty is not a supported field"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "only custom tools"),
])
async def test_400s_are_anthropic_errors(change, param):
    async with serve(ScriptedBackend(script())) as client:
        body = {k: v for k, v in (BODY | change).items() if v is not None}
        r = await client.post("/v1/messages", json=body)
        assert r.status == 400, await r.text()
        err = await r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
        assert param in err["error"]["message"]
        if "max_tokens" in body:  # (the SDK itself refuses a request without it)
            core = {k: body.pop(k) for k in ("model", "max_tokens", "messages")}
            async with client_of(client) as ac:
                with pytest.raises(anthropic.BadRequestError):
                    await ac.messages.create(**core, extra_body=body)


async def test_ring_errors_in_anthropic_shape():
    async with serve(ScriptedBackend(script(), error=RingUnavailable("no ring"))) as client:
        r = await client.post("/v1/messages", json=BODY)
        assert r.status == 503 and (await r.json())["error"]["type"] == "overloaded_error"
    backend = ScriptedBackend(script(), error=RingUnavailable("node lost"), error_at=3)
    async with serve(backend) as client:
        r = await client.post("/v1/messages", json=BODY | {"stream": True})
        got = events(await r.text())
        assert got[-1] == ("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": "the inference ring is unavailable: node lost"}})
        assert "message_stop" not in [n for n, _ in got]


def test_tools_and_results_become_an_openai_chat_body():
    body = {"model": "m", "max_tokens": 9, "stop_sequences": ["x"], "top_k": 3,
            "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            "tools": [{"name": "get_weather", "description": "Weather",
                       "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "metadata": {"user_id": "u1"},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "I should call it", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny"}]},
                    {"type": "text", "text": "Thanks"}]}]}
    assert to_chat(body) == {
        "messages": [
            {"role": "system", "content": "A\nB"},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
            {"role": "user", "content": "Thanks"}],
        "max_tokens": 9, "stop": ["x"], "top_k": 3,
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "chat_template_kwargs": {"enable_thinking": True}, "user": "u1"}
    assert to_chat(body | {"tool_choice": {"type": "any"}})["tool_choice"] == "required"
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    structured = to_chat(body | {"output_config": {"effort": "low", "format": {"type": "json_schema", "schema": schema}},
                                 "thinking": {"type": "adaptive"}, "cache_control": {"type": "ephemeral"}})
    assert structured["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert structured["chat_template_kwargs"] == {"enable_thinking": True}
    for bad in ({"output_config": {"format": {"type": "json_object"}}}, {"container": "c"},
                {"context_management": {}}, {"speed": 5}):
        with pytest.raises(RequestError):
            to_chat(body | bad)
    # A reply's blocks sent back dumped whole (every field the SDK knows, most of them null).
    reply = Message.model_validate({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "tool_use",
        "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1},
        "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]})
    dumped = [b.model_dump() for b in reply.content]
    assert {"caller", "toolset_name", "citations"} <= set(dumped[0]) | set(dumped[1])
    echoed = body["messages"][:1] + [{"role": "assistant", "content": dumped}] + body["messages"][2:]
    assert to_chat(body | {"messages": echoed})["messages"] == to_chat(body)["messages"]
    with pytest.raises(RequestError, match="caller"):  # a caller that is set is not ignored
        to_chat(body | {"messages": [{"role": "assistant", "content": [dumped[1] | {"caller": {"type": "x"}}]}]})
    with pytest.raises(RequestError, match="tool_use blocks belong to assistant turns"):
        to_chat(body | {"messages": [{"role": "user", "content": [
            {"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]})


def test_reasoning_and_tool_calls_as_blocks_and_events():
    deltas = [Delta("", reasoning="Think"), Delta("", reasoning="ing."), Delta("Calling."),
              Delta("", tool_calls=(ToolCallDelta(0, "toolu_9", "get_weather", ""),)),
              Delta("", tool_calls=(ToolCallDelta(0, None, None, '{"city": '),)),
              Delta("", tool_calls=(ToolCallDelta(0, None, None, '"Paris"}'),)),
              Delta("", finish_reason="tool_calls")]
    shape, outcome = MessageShape("m"), Outcome(prompt_tokens=7, cache=Scope(cached_tokens=5))
    frames = shape.start(outcome)
    for d in deltas:
        outcome.add(d)
        frames += shape.chunks(d)
    outcome.completion_tokens = 12
    frames += shape.finish(outcome)
    got = events(b"".join(frames).decode())
    starts = [d["content_block"] for n, d in got if n == "content_block_start"]
    assert starts == [{"type": "thinking", "thinking": ""}, {"type": "text", "text": ""},
                      {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}}]
    kinds = [d["delta"]["type"] for n, d in got if n == "content_block_delta"]
    assert kinds == ["thinking_delta", "thinking_delta", "signature_delta", "text_delta",
                     "input_json_delta", "input_json_delta"]
    assert [d["index"] for n, d in got if n == "content_block_stop"] == [0, 1, 2]
    assert got[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"input_tokens": 2, "cache_creation_input_tokens": 0,
                                    "cache_read_input_tokens": 5, "output_tokens": 12}}
    body = MessageShape("m").body(outcome)
    assert body["content"] == [
        {"type": "thinking", "thinking": "Thinking.", "signature": ""},
        {"type": "text", "text": "Calling."},
        {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}]
    assert body["stop_reason"] == "tool_use"
    # Anthropic counts the prompt tokens a cached prefix supplied apart from input_tokens.
    assert body["usage"] == got[-2][1]["usage"]
    assert got[0][1]["message"]["usage"]["cache_read_input_tokens"] == 5
    # The official client's own models accept both.
    assert Message.model_validate(body).content[2].input == {"city": "Paris"}  # type: ignore[union-attr]
