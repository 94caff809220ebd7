"""API boundaries through a real aiohttp server on a real socket: every number has a range, any
error in preparing a request is that request's 400/500 in OpenAI's shape, slow clients cost only
their own connection, and /openapi.json describes exactly what is enforced."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.unit.gateway.test_api_openai import (
    CHAT,
    COMPLETION,
    ScriptedBackend,
    script,
    serve,
    wait_for,
)
from tests.unit.gateway.test_scheduler import MemoryRing, running
from zmqinfer.gateway.api.fields import RequestError
from zmqinfer.gateway.api.openapi import SPEC
from zmqinfer.gateway.api.validate import parse_chat
from zmqinfer.gateway.errors import RingUnavailable, StepNotSent
from zmqinfer.gateway.scheduler import Scheduler
from zmqinfer.protocol.codec import encode
from zmqinfer.protocol.wire import Forward, Release, Sample, SamplingParams, SeqId


async def refused(client: Any, body: dict[str, Any] | str, status: int = 400,
                  path: str = "/v1/chat/completions") -> dict[str, Any]:
    data = body if isinstance(body, str) else json.dumps(body)
    r = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    assert r.status == status, await r.text()
    assert r.content_type == "application/json"
    err = (await r.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"] and "/root" not in err["message"]
    return err


# ---- reproduction 1: top_k 2**64 --------------------------------------------------------------


async def test_top_k_past_the_wire_is_a_400_not_a_dead_gateway() -> None:
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        err = await refused(client, CHAT | {"top_k": 18446744073709551616})
        assert err["param"] == "top_k"
        err = await refused(client, CHAT | {"top_k": len(backend.tokenizer) + 1})
        assert "vocabulary size" in err["message"]
        r = await client.post("/v1/chat/completions", json=CHAT | {"top_k": len(backend.tokenizer)})
        assert r.status == 200
    assert len(backend.calls) == 1


class EncodingRing(MemoryRing):
    """MemoryRing that encodes every message first, as the gateway's real send does."""

    async def send(self, msg: Forward | Release) -> None:
        encode(msg)
        await super().send(msg)


async def test_the_pump_survives_a_message_that_cannot_be_encoded() -> None:
    ring = EncodingRing()
    sched = Scheduler(ring, {0})
    async with running(sched):
        with pytest.raises(StepNotSent, match="OverflowError"):
            async with asyncio.timeout(5):
                async for _ in sched.generate([1, 2, 3], SamplingParams(top_k=1 << 64), 4):
                    pass
        got: list[Sample] = []

        async def ok() -> None:
            async for s in sched.generate([1, 2, 3], SamplingParams(), 3):
                got.append(s)

        task = asyncio.create_task(ok())
        try:
            async with asyncio.timeout(5):
                while not task.done():
                    await asyncio.sleep(0)
                    ring.answer(sched)
        finally:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert len(got) == 3  # the pump went on serving


# ---- ranges -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,param", [
    ({"temperature": 10 ** 400}, "temperature"),  # float() of it raised OverflowError: a 500
    ({"top_p": 10 ** 400}, "top_p"),
    ({"max_tokens": 10 ** 30}, "max_tokens"),
    ({"seed": 1 << 64}, "seed"),
    ({"seed": -(1 << 63) - 1}, "seed"),
    ({"repetition_penalty": 0.001}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"logit_bias": {"1" * 5000: 1}}, "logit_bias"),  # int() of 5000 digits raised ValueError
    ({"logit_bias": {"49152": 1}}, "logit_bias"),  # just past the vocabulary
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"5": 10 ** 400}}, "logit_bias"),
])
async def test_every_number_has_a_range(fields: dict[str, Any], param: str) -> None:
    async with serve(ScriptedBackend(script())) as client:
        err = await refused(client, CHAT | fields)
        assert err["param"] == param and len(err["message"]) < 300


async def test_a_tiny_temperature_is_greedy() -> None:
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions", json=CHAT | {"temperature": 1e-7})
        assert r.status == 200
    assert backend.calls[0][1].temperature == 0.0


@pytest.mark.parametrize("body", [
    '{"model": "m", "messages": [{"role": "user", "content": "a\\udc80b"}]}',
    '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
    '{"model": "m", "messages": [{"role": "user", "content": "hi", "name": "\\udfff"}]}',
    '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udc00"]}',
])
async def test_lone_surrogates_are_a_400(body: str) -> None:
    """Issue 10: valid JSON, no text; it used to be a plain-text 500 from the tokenizer."""
    async with serve(ScriptedBackend(script())) as client:
        err = await refused(client, body)
        assert err["code"] == "invalid_unicode" and "lone surrogate" in err["message"]
        err = await refused(client, '{"model": "m", "prompt": "x\\udc80"}', path="/v1/completions")
        assert err["param"] == "prompt"


async def test_a_bug_while_preparing_a_request_is_a_json_500(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = ScriptedBackend(script())

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("/root/secret/tokenizer.json exploded")

    monkeypatch.setattr(backend.tokenizer, "apply_chat_template", broken)
    async with serve(backend) as client:
        err = await refused(client, CHAT, status=500)
        assert err["code"] == "internal_error" and "secret" not in err["message"]
        r = await client.post("/v1/completions", json=COMPLETION)  # the server goes on
        assert r.status == 200


async def test_ring_errors_carry_no_paths() -> None:
    error = RingUnavailable("node1 could not load: FileNotFoundError: '/root/.cache/m/model.safetensors'")
    async with serve(ScriptedBackend(script(), error=error)) as client:
        err = await refused(client, CHAT, status=503)
        assert "<path>" in err["message"] and "node1 could not load" in err["message"]


# ---- slow clients -----------------------------------------------------------------------------


async def stalled_body(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\":")
    await writer.drain()
    return reader, writer


async def test_idle_bodies_take_no_slot_and_get_408() -> None:
    backend = ScriptedBackend(script())
    async with serve(backend, max_concurrent=2, body_timeout=1.0) as client:
        port = client.server.port
        assert port is not None
        stalled = [await stalled_body(port) for _ in range(4)]  # twice the slots
        await asyncio.sleep(0.2)  # their handlers are now waiting for the bodies
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status == 200  # used to be 429: the idle bodies held both slots
        for reader, writer in stalled:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408")
            writer.close()


class EndlessBackend(ScriptedBackend):
    """Yields the same token as fast as it can, up to max_tokens as the scheduler does, for as
    long as the API takes them (test-only)."""

    async def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int,
                       request_id: str) -> AsyncIterator[Sample]:
        self.calls.append((prompt, params, max_tokens, request_id))
        token = self.tokenizer.encode(" hello", add_special_tokens=False)[0]
        try:
            for _ in range(max_tokens):
                yield Sample(SeqId(0), token, -0.5)
                self.yielded += 1
                await asyncio.sleep(0)
        finally:
            self.endings.append("ended")


async def test_a_stream_nobody_reads_is_cut_and_frees_its_slot() -> None:
    backend = EndlessBackend([], context_length=10 ** 8)
    async with serve(backend, max_concurrent=1, write_timeout=0.5) as client:
        port = client.server.port
        assert port is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up soon
        sock.connect(("127.0.0.1", port))
        body = json.dumps(CHAT | {"stream": True, "max_tokens": 10 ** 7}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            await wait_for(lambda: backend.yielded > 0, 5)
            async with asyncio.timeout(60):  # buffers fill, then 0.5 s without progress
                while not backend.endings:
                    await asyncio.sleep(0.05)
            r = await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 3})
            assert r.status == 200  # the slot is free again
        finally:
            sock.close()


# ---- the OpenAPI document ---------------------------------------------------------------------


async def test_openapi_describes_every_route() -> None:
    import schemathesis

    async with serve(ScriptedBackend(script())) as client:
        r = await client.get("/openapi.json")
        assert r.status == 200
        spec = await r.json()
        # The pages' static files (/static/...) are not an API: not in the document.
        routes = {res.canonical for res in client.app.router.resources()
                  if not isinstance(res, web.StaticResource)}
    assert spec == json.loads(json.dumps(SPEC))
    assert set(spec["paths"]) == routes
    assert schemathesis.openapi.from_dict(spec) is not None
    for op in spec["paths"]["/v1/chat/completions"].values():
        assert {"400", "429", "500", "503", "504"} <= set(op["responses"])


CHAT_PROPS = SPEC["components"]["schemas"]["ChatRequest"]["properties"]


@pytest.mark.parametrize("name", [n for n, p in CHAT_PROPS.items() if "maximum" in p])
def test_the_documented_ranges_are_the_enforced_ones(name: str) -> None:
    p = CHAT_PROPS[name]
    base: dict[str, Any] = {"messages": CHAT["messages"]}
    if name == "top_logprobs":
        base["logprobs"] = True
    step = 1 if p["type"] == "integer" else 1e-9
    parse_chat(base | {name: p["maximum"]})
    if not p.get("exclusiveMinimum"):
        parse_chat(base | {name: p["minimum"]})
    for beyond in (p["maximum"] + step * max(1, abs(p["maximum"]) * (p["type"] == "number")),
                   p["minimum"] - step * max(1, abs(p["minimum"]) * (p["type"] == "number"))):
        with pytest.raises(RequestError):
            parse_chat(base | {name: beyond})
