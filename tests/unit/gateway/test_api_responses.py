"""responses.py: OpenAI's Responses API through a real aiohttp server and the official `openai`
client (`responses.create`, streamed and not); the translation to a chat body; the event stream
of deltas carrying reasoning and tool calls (built by hand: the chat path's tools arrive with
issue 20)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import Response, ResponseFunctionToolCall, ResponseOutputMessage

from tests.unit.gateway.test_api_openai import KEY, TEXT, ScriptedBackend, oai, script, serve
from zmqinfer.gateway.api.fields import RequestError
from zmqinfer.gateway.api.responses import ResponseShape, to_chat
from zmqinfer.gateway.api.shape import Outcome
from zmqinfer.gateway.api.validate import parse_chat
from zmqinfer.gateway.errors import RingUnavailable
from zmqinfer.gateway.prefixes import Scope
from zmqinfer.gateway.textout import Delta, ToolCallDelta

BODY = {"model": "scripted-model", "instructions": "Be brief.", "input": "Say hello",
        "max_output_tokens": 50}


def events(body: str) -> list[dict[str, Any]]:
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            payload = json.loads(data.removeprefix("data: "))
            assert name == "event: " + payload["type"], block
            out.append(payload)
    return out


async def test_responses_create_whole_and_streamed():
    backend = ScriptedBackend(script())
    async with serve(backend, api_keys=frozenset({KEY})) as client:
        async with oai(client) as oc:
            r = await oc.responses.create(**BODY)
            assert r.output_text == TEXT and r.status == "completed"
            assert [o.type for o in r.output] == ["message"]
            chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
            prompt = backend.calls[0][0]
            assert prompt == list(backend.tokenizer.apply_chat_template(chat, add_generation_prompt=True))
            assert (r.usage.input_tokens, r.usage.output_tokens) == (len(prompt), len(script()))

            stream = await oc.responses.create(**BODY, stream=True)
            got = [e async for e in stream]
            types = [e.type for e in got]
            assert types[:4] == ["response.created", "response.in_progress",
                                 "response.output_item.added", "response.content_part.added"]
            assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                                  "response.output_item.done", "response.completed"]
            assert [e.sequence_number for e in got] == list(range(len(got)))
            assert "".join(e.delta for e in got if e.type == "response.output_text.delta") == TEXT
            assert got[-1].response.output_text == TEXT  # type: ignore[union-attr]

            async with oc.responses.stream(**BODY) as helper:  # the SDK's accumulating helper
                final = await helper.get_final_response()
            assert final.output_text == TEXT


async def test_max_output_tokens_makes_it_incomplete():
    async with serve(ScriptedBackend(script())) as client, oai(client) as oc:
        r = await oc.responses.create(**BODY | {"max_output_tokens": 2})
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
        stream = await oc.responses.create(**BODY | {"max_output_tokens": 2}, stream=True)
        assert [e async for e in stream][-1].type == "response.incomplete"


@pytest.mark.parametrize("change,fragment", [
    ({"previous_response_id": "resp_1"}, "stateless"),
    ({"store": True}, "store: true is not supported"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference item"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
    ({"tools": [{"type": "web_search"}]}, "only function tools"),
    ({"temperature": 5}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens must be"),
    ({"frequency_penalty": 1}, "frequency_penalty is not a supported field"),
    ({"input": None}, "input must be"),
])
async def test_400s_are_openai_errors(change, fragment):
    async with serve(ScriptedBackend(script())) as client:
        body = {k: v for k, v in (BODY | change).items() if v is not None}
        r = await client.post("/v1/responses", json=body)
        assert r.status == 400
        err = (await r.json())["error"]
        assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}


async def test_ring_error_mid_stream_is_an_error_event():
    backend = ScriptedBackend(script(), error=RingUnavailable("node lost"), error_at=3)
    async with serve(backend) as client:
        r = await client.post("/v1/responses", json=BODY | {"stream": True})
        got = events(await r.text())
        assert got[-1]["type"] == "error" and got[-1]["code"] == "ring_unavailable"
        assert "response.completed" not in [e["type"] for e in got]


def test_items_tools_and_formats_become_an_openai_chat_body():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = {"model": "m", "instructions": "Sys", "store": False, "include": ["reasoning.encrypted_content"],
            "tools": [{"type": "function", "name": "get_weather", "description": "W", "parameters": schema,
                       "strict": True}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
            "reasoning": {"effort": "low"},
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}]}
    chat = to_chat(body)
    assert chat == {
        "messages": [
            {"role": "system", "content": "Sys"},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "W",
                                                    "parameters": schema, "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema,
                                                                   "strict": True}},
        "chat_template_kwargs": {"enable_thinking": True}}
    assert to_chat({"input": "x", "reasoning": {"effort": "none"}})["chat_template_kwargs"] == {
        "enable_thinking": False}
    # Items sent back dumped whole (model_dump(): null `caller`, `namespace`, `phase`, ...).
    echoed = [ResponseOutputMessage.model_validate({
                  "type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                  "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]}),
              ResponseFunctionToolCall.model_validate(body["input"][3] | {"id": "fc_1", "status": "completed"})]
    dumped = [item.model_dump() for item in echoed]
    assert None in dumped[0].values() and None in dumped[1].values()
    assert to_chat(body | {"input": body["input"][:2] + dumped + body["input"][4:]}) == chat
    with pytest.raises(RequestError, match="conversation"):
        to_chat({"input": "x", "conversation": "conv_1"})


def test_reasoning_and_function_calls_as_items_and_events():
    deltas = [Delta("", reasoning="Hmm."), Delta("Calling."),
              Delta("", tool_calls=(ToolCallDelta(0, "call_7", "get_weather", '{"city":'),)),
              Delta("", tool_calls=(ToolCallDelta(0, None, None, '"Paris"}'),)),
              Delta("", finish_reason="tool_calls")]
    req = parse_chat({"messages": [{"role": "user", "content": "x"}]})
    shape, outcome = ResponseShape("m", {"input": "x"}, req), Outcome(prompt_tokens=5, cache=Scope(cached_tokens=3))
    frames = shape.start(outcome)
    for d in deltas:
        outcome.add(d)
        frames += shape.chunks(d)
    outcome.completion_tokens = 9
    frames += shape.finish(outcome)
    got = events(b"".join(frames).decode())
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    added = [e["item"]["type"] for e in got if e["type"] == "response.output_item.added"]
    assert added == ["reasoning", "message", "function_call"]
    args = [e for e in got if e["type"].startswith("response.function_call_arguments")]
    assert [a["type"].rsplit(".", 1)[1] for a in args] == ["delta", "delta", "done"]
    assert args[-1]["arguments"] == '{"city":"Paris"}' and args[-1]["output_index"] == 2
    final = Response.model_validate(got[-1]["response"])
    assert got[-1]["type"] == "response.completed"
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.usage is not None and final.usage.input_tokens == 5
    assert final.usage.input_tokens_details.cached_tokens == 3  # OpenAI counts them inside input_tokens
    call = final.output[2]
    assert (call.call_id, call.name, call.arguments) == ("call_7", "get_weather", '{"city":"Paris"}')  # type: ignore[union-attr]
    whole = Response.model_validate(ResponseShape("m", {"input": "x"}, req).body(outcome))
    assert whole.output_text == "Calling." and whole.output[0].content[0].text == "Hmm."  # type: ignore[union-attr]
