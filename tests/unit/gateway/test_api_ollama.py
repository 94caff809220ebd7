"""ollama.py and ollama_models.py: Ollama's API through a real aiohttp server and the official
`ollama` client (chat, generate, streamed and not, list, show, ps, version); the translation to
a chat body; tool calls and thinking from deltas built by hand (the chat path's tools arrive
with issue 20)."""

from __future__ import annotations

import json

import ollama
import pytest
from aiohttp.test_utils import TestClient

from tests.unit.gateway.test_api_openai import KEY, TEXT, ScriptedBackend, script, serve
from zmqinfer.gateway.api.fields import RequestError
from zmqinfer.gateway.api.ollama import NdjsonShape, chat_body
from zmqinfer.gateway.api.shape import Outcome
from zmqinfer.gateway.errors import RingUnavailable
from zmqinfer.gateway.textout import Delta, ToolCallDelta

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


def client_of(client: TestClient, key: str = KEY) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=str(client.make_url("")), headers={"Authorization": f"Bearer {key}"})


async def test_chat_and_generate_through_the_official_client():
    backend = ScriptedBackend(script())
    async with serve(backend, api_keys=frozenset({KEY})) as client:
        oc = client_of(client)
        r = await oc.chat(model="scripted-model", messages=MESSAGES, options={"num_predict": 50, "seed": 3})
        assert (r.message.role, r.message.content, r.done, r.done_reason) == ("assistant", TEXT, True, "stop")
        prompt, params, max_tokens, _ = backend.calls[0]
        assert prompt == list(backend.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
        assert (max_tokens, params.seed) == (50, 3)
        assert (r.prompt_eval_count, r.eval_count) == (len(prompt), len(script()))
        assert r.total_duration and r.total_duration >= (r.eval_duration or 0)

        pieces = [p async for p in await oc.chat(model="scripted-model", messages=MESSAGES, stream=True)]
        assert "".join(p.message.content or "" for p in pieces) == TEXT
        assert [p.done for p in pieces] == [False] * (len(pieces) - 1) + [True]

        g = await oc.generate(model="scripted-model", prompt="Say hello", system="Be brief.")
        assert g.response == TEXT and backend.calls[-1][0] == prompt  # the same chat prompt
        parts = [p async for p in await oc.generate(model="x", prompt="Say hello", stream=True)]
        assert "".join(p.response or "" for p in parts) == TEXT and parts[-1].done
        raw = await oc.generate(model="x", prompt="Say hello", raw=True, options={"num_predict": 3})
        assert backend.calls[-1][0] == backend.tokenizer.encode("Say hello") and raw.done_reason == "length"

        loaded = await oc.generate(model="scripted-model")  # an empty prompt only "loads" it
        assert loaded.done and loaded.done_reason == "load"

        with pytest.raises(ollama.ResponseError) as e:
            await client_of(client, "sk-wrong-key-0123456789").chat(model="m", messages=MESSAGES)
        assert e.value.status_code == 401 and "API key" in e.value.error


async def test_the_raw_stream_is_ndjson():
    async with serve(ScriptedBackend(script())) as client:
        r = await client.post("/api/chat", json={"model": "m", "messages": MESSAGES})  # streams by default
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in (await r.text()).splitlines()]
        assert all(line["model"] == "scripted-model" and line["created_at"].endswith("Z") for line in lines)
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] == len(script())


async def test_models_show_ps_version():
    backend = ScriptedBackend(script())
    async with serve(backend, aliases=("llama3.2:latest", "claude-*")) as client:
        oc = client_of(client)
        listed = await oc.list()
        assert [m.model for m in listed.models] == ["scripted-model", "llama3.2:latest"]
        shown = await oc.show("llama3.2:latest")
        template = backend.tokenizer.chat_template
        assert shown.template == template and "completion" in (shown.capabilities or [])
        assert ("tools" in (shown.capabilities or [])) == ("tools" in template)
        assert shown.modelinfo["zmqinfer.context_length"] == 2048  # type: ignore[index]
        with pytest.raises(ollama.ResponseError) as e:
            await oc.show("mistral")
        assert e.value.status_code == 404 and "not found" in e.value.error
        running = await oc.ps()
        assert running.models[0].context_length == 2048
        version = await (await client.get("/api/version")).json()
        assert version["version"].count(".") == 2


@pytest.mark.parametrize("path,body,fragment", [
    ("/api/chat", {"model": "m", "messages": MESSAGES, "options": {"num_ctx": 4096}}, "num_ctx must be"),
    ("/api/chat", {"model": "m", "messages": MESSAGES, "options": {"mirostat": 2}}, "options.mirostat"),
    ("/api/chat", {"model": "m", "messages": MESSAGES, "options": {"temperature": 9}}, "temperature"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     "image input is not supported"),
    ("/api/chat", {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "answers no earlier"),
    ("/api/chat", {"model": "m", "messages": MESSAGES, "format": "yaml"}, "format must be"),
    ("/api/generate", {"model": "m", "prompt": "x", "suffix": "y"}, "suffix is not supported"),
    ("/api/chat", {"messages": MESSAGES}, "model is required"),
])
async def test_400s_are_ollama_errors(path, body, fragment):
    async with serve(ScriptedBackend(script())) as client:
        r = await client.post(path, json=body)
        assert r.status == 400
        err = await r.json()
        assert set(err) == {"error"} and fragment in err["error"], err


async def test_a_ring_error_mid_stream_is_an_error_line():
    backend = ScriptedBackend(script(), error=RingUnavailable("node lost"), error_at=3)
    async with serve(backend) as client:
        r = await client.post("/api/chat", json={"model": "m", "messages": MESSAGES})
        lines = [json.loads(line) for line in (await r.text()).splitlines()]
        assert lines[-1] == {"error": "the inference ring is unavailable: node lost"}


def test_options_tools_format_and_think_become_a_chat_body():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
    body = {"model": "m", "stream": False, "format": schema, "think": True, "tools": [tool],
            "options": {"num_predict": -1, "temperature": 0, "top_k": 5, "stop": ["\n"],
                        "repeat_penalty": 1.1, "num_ctx": 2048, "num_gpu": 99},
            "messages": [{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                         {"role": "tool", "content": "Sunny", "tool_name": "get_weather"}]}
    assert chat_body(body, 2048) == {
        "stream": False, "temperature": 0, "top_k": 5, "stop": ["\n"], "repetition_penalty": 1.1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}},
        "chat_template_kwargs": {"enable_thinking": True},
        "messages": [{"role": "user", "content": "Weather?"},
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"id": "call_1_0", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": "call_1_0", "content": "Sunny"}],
        "tools": [tool]}
    assert chat_body(body | {"format": "json"}, 2048)["response_format"] == {"type": "json_object"}
    with pytest.raises(RequestError, match="num_ctx"):
        chat_body(body, 1024)


def test_thinking_and_whole_tool_calls_in_the_stream():
    deltas = [Delta("", reasoning="Hmm."), Delta("Calling."),
              Delta("", tool_calls=(ToolCallDelta(0, "call_1", "get_weather", '{"city":'),)),
              Delta("", tool_calls=(ToolCallDelta(0, None, None, '"Paris"}'),)),
              Delta("", finish_reason="tool_calls")]
    shape, outcome = NdjsonShape("m", "message"), Outcome(prompt_tokens=4)
    frames = shape.start(outcome)
    for d in deltas:
        outcome.add(d)
        frames += shape.chunks(d)
    frames += shape.finish(outcome)
    lines = [ollama.ChatResponse.model_validate_json(f) for f in frames]
    assert [line.message.thinking for line in lines[:1]] == ["Hmm."]
    assert lines[1].message.content == "Calling."
    calls = lines[2].message.tool_calls or []
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert lines[-1].done and lines[-1].done_reason == "stop" and len(lines) == 4
    whole = ollama.ChatResponse.model_validate(NdjsonShape("m", "message").body(outcome))
    assert whole.message.thinking == "Hmm." and whole.message.tool_calls[0].function.name == "get_weather"  # type: ignore[index]
