"""Every dialect (OpenAI chat, Anthropic Messages, OpenAI Responses, Ollama chat and generate) goes
through the same path: API keys, admission (429 with Retry-After), body limits and deadlines
(413, 408), bad JSON, request ids, metrics by `api`, and a client that disconnects ending the
generation; each refusal in its own dialect's error shape."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from typing import Any

import pytest

from tests.unit.gateway.test_api_openai import KEY, ScriptedBackend, script, serve, wait_for
from zmqinfer.gateway.errors import Overloaded

MESSAGES = [{"role": "user", "content": "Say hello"}]
ROUTES = {  # path -> (api label, a valid streaming body)
    "/v1/chat/completions": ("openai", {"model": "m", "messages": MESSAGES, "stream": True}),
    "/v1/messages": ("anthropic", {"model": "m", "messages": MESSAGES, "max_tokens": 20, "stream": True}),
    "/v1/responses": ("responses", {"model": "m", "input": "Say hello", "stream": True}),
    "/api/chat": ("ollama", {"model": "m", "messages": MESSAGES}),
    "/api/generate": ("ollama", {"model": "m", "prompt": "Say hello"}),
}


def message_of(path: str, body: Any) -> str:
    """The error message, read the way the path's dialect's clients read it."""
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return body["error"]["message"]
    if path.startswith("/api/"):
        assert set(body) == {"error"}, body
        return body["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["message"]


@pytest.mark.parametrize("path", ROUTES)
async def test_keys_bodies_and_json_in_the_dialects_shape(path: str) -> None:
    api, body = ROUTES[path]
    async with serve(ScriptedBackend(script()), api_keys=frozenset({KEY})) as client:
        for headers in ({}, {"Authorization": "Bearer sk-wrong-0123456789abcd"}, {"x-api-key": "nope"}):
            r = await client.post(path, json=body, headers=headers)
            assert r.status == 401 and "API key" in message_of(path, await r.json())
        ok = {"x-api-key": KEY} if api == "anthropic" else {"Authorization": f"Bearer {KEY}"}
        r = await client.post(path, data=b"{not json", headers=ok)
        assert r.status == 400 and "not valid JSON" in message_of(path, await r.json())
        r = await client.post(path, data=io.BytesIO(b"x" * (5 << 20)), headers=ok)
        assert r.status == 413 and "too large" in message_of(path, await r.json())
        r = await client.post(path, json=body, headers=ok)
        assert r.status == 200 and r.headers["x-request-id"].startswith("req-")
        await r.read()
        exposition = (await (await client.get("/metrics", headers=ok)).text())
        line = f'zmqinfer_api_requests_total{{api="{api}",finished_reason="stop",model_name="scripted-model"}} 1.0'
        assert line in exposition


@pytest.mark.parametrize("path", ROUTES)
async def test_a_body_that_never_comes_is_a_408(path: str) -> None:
    async with serve(ScriptedBackend(script()), body_timeout=0.2) as client:
        async def trickle():
            yield b"{"
            await asyncio.sleep(5)

        r = await client.post(path, data=trickle())
        assert r.status == 408 and "did not arrive" in message_of(path, await r.json())


@pytest.mark.parametrize("path", ROUTES)
async def test_admission_limit_and_a_full_queue_are_429s(path: str) -> None:
    api, body = ROUTES[path]
    backend = ScriptedBackend(script(), hang_at=0)
    async with serve(backend, max_concurrent=1) as client:
        first = asyncio.ensure_future(client.post(path, json=body))
        try:
            await backend.hanging.wait()
            r = await client.post(path, json=body)
            assert r.status == 429 and int(r.headers["Retry-After"]) > 0
            assert "too many requests" in message_of(path, await r.json())
        finally:
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
        await wait_for(lambda: backend.endings)
    backend = ScriptedBackend(script(), error=Overloaded("12 requests already wait (limit 12)", 3))
    async with serve(backend) as client:
        r = await client.post(path, json=body)
        assert r.status == 429 and r.headers["Retry-After"] == "3"
        assert "limit 12" in message_of(path, await r.json())


@pytest.mark.parametrize("path", ROUTES)
async def test_a_client_that_goes_away_ends_the_generation(path: str) -> None:
    backend = ScriptedBackend(script(), hang_at=3)
    async with serve(backend) as client:
        r = await client.post(path, json=ROUTES[path][1])
        assert r.status == 200
        await r.content.readline()  # the stream is live
        await backend.hanging.wait()
        r.close()
        await wait_for(lambda: backend.endings)
    assert backend.endings[0] in ("cancelled", "closed")


async def test_protected_mode_refuses_a_remote_client_in_each_dialect() -> None:
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from zmqinfer.gateway.api.auth import ApiGuard, middleware
    from zmqinfer.gateway.api.refusal import refuse

    guarded = middleware(ApiGuard.from_keys({}), lambda rq, st, msg, code: refuse(rq, st, msg, code=code))
    for path in ROUTES:
        remote = mock.Mock()  # a peer on another machine (TEST-NET-3), as the netns test has it for real
        remote.get_extra_info.return_value = ("203.0.113.5", 40000)
        request = make_mocked_request("POST", path, transport=remote)

        async def handler(_: Any) -> Any:
            raise AssertionError("a remote client reached the handler")

        response = await guarded(request, handler)
        assert response.status == 403
        assert "protected mode" in message_of(path, json.loads(response.body))


# ---- hostile input: every dialect's own fields, each a 400 in its shape ------------------------

HOSTILE: dict[str, list[dict[str, Any]]] = {
    "/v1/messages": [
        {"top_k": 1 << 64}, {"temperature": 10 ** 400}, {"max_tokens": 10 ** 30}, {"max_tokens": True},
        {"messages": "x"}, {"messages": [5]}, {"messages": [{"role": "user", "content": [5]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                     "content": [5]}]}]},
        {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n",
                                                          "input": "x"}]}]},
        {"messages": [{"role": "user", "content": "a\udc80b"}]},
        {"system": [5]}, {"system": 5}, {"tools": [5]}, {"tools": "x"}, {"tool_choice": "auto"},
        {"tool_choice": {"type": "tool"}}, {"metadata": {"user_id": 5}}, {"metadata": {"x": 1}},
        {"thinking": {"type": 5}}, {"stop_sequences": [""]}, {"stream": "yes"},
    ],
    "/v1/responses": [
        {"top_k": 1 << 64}, {"temperature": 10 ** 400}, {"max_output_tokens": 10 ** 30},
        {"input": 5}, {"input": [5]}, {"input": [{"role": "user", "content": 5}]},
        {"input": [{"type": "function_call", "call_id": 5, "name": "n", "arguments": "{}"}]},
        {"input": [{"type": "function_call_output", "call_id": "c", "output": [5]}]},
        {"input": [{"role": "robot", "content": "x"}]}, {"input": "a\udc80b"},
        {"instructions": 5}, {"tools": [5]}, {"tool_choice": {"type": "file_search"}},
        {"text": {"format": {"type": "json_schema", "name": "x"}}}, {"text": {"format": "json"}},
        {"reasoning": {"effort": 5}}, {"include": "x"}, {"metadata": 5}, {"store": "no"},
        {"previous_response_id": "resp_1"}, {"background": True},
    ],
    "/api/chat": [
        {"options": {"top_k": 1 << 64}}, {"options": {"temperature": 10 ** 400}},
        {"options": {"num_predict": 10 ** 30}}, {"options": {"num_predict": 0}}, {"options": 5},
        {"options": {"num_ctx": "big"}}, {"options": {"stop": 5}}, {"messages": "x"},
        {"messages": [5]}, {"messages": [{"role": 5, "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "assistant", "content": "", "tool_calls": 5}]},
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": 5}]}]},
        {"messages": [{"role": "user", "content": "a\udc80b"}]}, {"format": []}, {"think": []},
        {"tools": [5]}, {"stream": "yes"}, {"model": 5},
    ],
    "/api/generate": [
        {"options": {"top_k": 1 << 64}}, {"prompt": 5}, {"system": 5}, {"raw": "yes"},
        {"prompt": "a\udc80b"}, {"images": ["aGk="]}, {"context": [1, 2]}, {"template": "x"},
        {"options": {"seed": 1 << 64}}, {"format": 5},
    ],
}


@pytest.mark.parametrize("path,change", [(p, c) for p, cs in HOSTILE.items() for c in cs],
                         ids=lambda v: str(v)[:60])
async def test_hostile_input_is_a_400_in_the_dialects_shape(path: str, change: dict[str, Any]) -> None:
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        body = ROUTES[path][1] | change
        r = await client.post(path, data=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})
        assert r.status == 400, (r.status, await r.text())
        message = message_of(path, await r.json())
        assert len(message) < 400 and "Traceback" not in message
    assert backend.calls == []  # nothing reached the ring


@pytest.mark.parametrize("path,change,named", [
    ("/v1/messages", {"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ("/v1/messages", {"max_tokens": 10 ** 6}, "max_tokens"),  # past the context: plan's 400
    ("/v1/responses", {"max_output_tokens": 10 ** 6}, "max_output_tokens"),
    ("/api/chat", {"options": {"num_predict": 0}}, "options.num_predict"),
    ("/api/chat", {"options": {"repeat_penalty": 100}}, "options.repeat_penalty"),
])
async def test_a_400_names_the_field_the_client_sent(path: str, change: dict[str, Any], named: str) -> None:
    async with serve(ScriptedBackend(script())) as client:
        r = await client.post(path, json=ROUTES[path][1] | change)
        assert r.status == 400
        assert named in message_of(path, await r.json())


@pytest.mark.parametrize("path", ROUTES)
async def test_a_bug_is_a_500_in_the_dialects_shape(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = ScriptedBackend(script())

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("/root/secret/tokenizer.json exploded")

    monkeypatch.setattr(backend.tokenizer, "apply_chat_template", broken)
    async with serve(backend) as client:
        r = await client.post(path, json=ROUTES[path][1])
        assert r.status == 500
        message = message_of(path, await r.json())
        assert "internal error" in message and "secret" not in message
