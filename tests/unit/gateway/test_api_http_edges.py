"""What browsers and lost clients meet: CORS (closed off loopback by default, opened by
[api] cors_origins), a 404 that names the path meant, and Retry-After on every 503 and 429."""

from __future__ import annotations

import pytest

from tests.unit.gateway.test_api_openai import CHAT, ScriptedBackend, script, serve
from zmqinfer.gateway.api.auth import ApiGuard
from zmqinfer.gateway.api.cors import allowed
from zmqinfer.gateway.errors import RingUnavailable

PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_default_origins_are_this_machines_pages_only():
    for origin in ("http://localhost:3000", "https://127.0.0.1", "http://[::1]:8080"):
        assert allowed(origin, ())
    for origin in ("https://evil.example", "http://localhost.evil.example", "file://", "null",
                   "http://192.168.1.5:3000"):
        assert not allowed(origin, ())
    assert allowed("https://app.example.com", ("https://app.example.com",))
    assert not allowed("http://localhost:3000", ("https://app.example.com",))  # the list replaces
    assert allowed("https://anything.example", ("*",))


async def test_preflight_is_answered_before_the_key_check():
    guard = ApiGuard.from_keys({"k": "sk-test-key-long-enough"})
    async with serve(ScriptedBackend(script()), guard=guard) as client:
        r = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "authorization" in r.headers["Access-Control-Allow-Headers"]
        r = await client.options("/v1/chat/completions",
                                 headers=PREFLIGHT | {"Origin": "https://evil.example"})
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        # the real request still needs its key; the refusal carries CORS so the page can read it
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": PREFLIGHT["Origin"]})
        assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == PREFLIGHT["Origin"]


@pytest.mark.parametrize("stream", [False, True])
async def test_configured_origins_get_cors_headers_streams_included(stream):
    guard = ApiGuard.from_keys({}, no_auth=True, cors_origins=("https://app.example.com",))
    async with serve(ScriptedBackend(script()), guard=guard) as client:
        r = await client.post("/v1/chat/completions", json=CHAT | {"stream": stream},
                              headers={"Origin": "https://app.example.com"})
        await r.read()
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "x-request-id" in r.headers["Access-Control-Expose-Headers"]
        r = await client.post("/v1/chat/completions", json=CHAT,
                              headers={"Origin": "http://localhost:3000"})
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
        r = await client.post("/v1/chat/completions", json=CHAT)  # no Origin: not a browser
        assert "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize("path, meant", [
    ("/chat/completions", "/v1/chat/completions"),
    ("/v1/v1/chat/completions", "/v1/chat/completions"),
    ("/completions", "/v1/completions"),
    ("/models", "/v1/models"),
    ("/api/v1/models/", "/v1/models"),
])
async def test_a_404_names_the_path_meant(path, meant):
    async with serve(ScriptedBackend(script())) as client:
        r = await client.post(path, json=CHAT) if "compl" in path else await client.get(path)
        body = await r.json()
    # Under /api/ the error is Ollama's shape ({"error": "..."}: refusal.py), elsewhere OpenAI's.
    message = body["error"] if path.startswith("/api/") else body["error"]["message"]
    assert r.status == 404 and f"did you mean {meant}?" in message


async def test_a_404_elsewhere_points_at_v1():
    async with serve(ScriptedBackend(script())) as client:
        r = await client.get("/nothing/here")
        assert r.status == 404 and "under /v1" in (await r.json())["error"]["message"]


async def test_every_503_carries_retry_after():
    async with serve(ScriptedBackend(script(), error=RingUnavailable("no nodes"), ready=False)) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status == 503 and int(r.headers["Retry-After"]) > 0
        r = await client.get("/health")
        assert r.status == 503 and int(r.headers["Retry-After"]) > 0


async def test_every_429_carries_retry_after():
    backend = ScriptedBackend(script(), hang_at=0)
    async with serve(backend, max_concurrent=1) as client:
        import asyncio

        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT | {"stream": True}))
        await asyncio.wait_for(backend.hanging.wait(), 3)
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status == 429 and int(r.headers["Retry-After"]) > 0
        first.cancel()
