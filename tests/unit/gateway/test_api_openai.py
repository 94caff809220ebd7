"""api: the HTTP/OpenAI shaping layer, through a real aiohttp server and the `openai` client.

`ScriptedBackend` replays a fixed token sequence instead of running a model. It exists only for
these tests of the HTTP layer (response shapes, errors, closing the generator); everything
below it is tested against real models elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.unit.gateway.test_textout import load_tokenizer
from zmqinfer.clusterstatus import ModelInfo
from zmqinfer.gateway.api.server import make_app
from zmqinfer.gateway.errors import Overloaded, RingTimeout, RingUnavailable
from zmqinfer.protocol.wire import Sample, SamplingParams, SeqId, TokenLogprob

TEXT = "Hello world, this is a test."
KEY = "sk-test-key"


class ScriptedBackend:
    """A Backend that replays `tokens` (test-only). Records each call and how it ended:
    "finished" (ran out / EOS / max_tokens), "closed" (aclose) or "cancelled"."""

    def __init__(self, tokens: list[int], *, error: Exception | None = None, error_at: int = 0,
                 hang_at: int | None = None, ready: bool = True, context_length: int = 2048):
        self.model_id = "scripted-model"
        self.tokenizer = load_tokenizer()
        self.context_length = context_length
        self.model_info: ModelInfo | None = None
        self.tokens, self.error, self.error_at, self.hang_at = tokens, error, error_at, hang_at
        self.ready = ready
        self.calls: list[tuple[list[int], SamplingParams, int, str]] = []
        self.endings: list[str] = []
        self.yielded = 0
        self.hanging = asyncio.Event()

    async def generate(self, prompt: list[int], params: SamplingParams, max_tokens: int,
                       request_id: str) -> AsyncIterator[Sample]:
        self.calls.append((prompt, params, max_tokens, request_id))
        ending = "finished"
        try:
            for i, token in enumerate(self.tokens[:max_tokens]):
                if self.error is not None and i == self.error_at:
                    raise self.error
                if i == self.hang_at:
                    self.hanging.set()
                    await asyncio.Event().wait()  # until the API cancels or closes us
                top = tuple(TokenLogprob(t, -0.5 - j) for j, t in enumerate([token, 0, 1]))
                yield Sample(SeqId(0), token, -0.5, top[: params.top_logprobs])
                self.yielded += 1
                if token in self.tokenizer.eos_token_ids:
                    break
                await asyncio.sleep(0)
        except GeneratorExit:
            ending = "closed"
            raise
        except asyncio.CancelledError:
            ending = "cancelled"
            raise
        finally:
            self.endings.append(ending)

    def cluster_status(self) -> dict:
        return {"ready": self.ready, "reason": None if self.ready else "no nodes", "nodes": []}

    async def cluster_ping(self) -> dict:
        return {"nodes": {"n1": 0.001}}


def script(text: str = TEXT, eos: bool = True) -> list[int]:
    tok = load_tokenizer()
    return tok.encode(text, add_special_tokens=False) + ([min(tok.eos_token_ids)] if eos else [])


@contextlib.asynccontextmanager
async def serve(backend: ScriptedBackend, **kw: Any) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(make_app(backend, **kw)))  # TestServer cancels handlers
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def oai(client: TestClient, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)


def events(body: str) -> list[Any]:
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


CHAT = {"model": "scripted-model", "messages": [{"role": "user", "content": "Say hello"}]}
COMPLETION = {"model": "scripted-model", "prompt": "Say hello"}


async def wait_for(predicate, seconds: float = 3.0) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.01)


# ---- shapes -----------------------------------------------------------------------------------


async def test_chat_non_stream():
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 50, "seed": 3})
        assert r.status == 200
        body = await r.json()
    rid = r.headers["x-request-id"]
    assert rid.startswith("req-") and body["id"] == "chatcmpl-" + rid.removeprefix("req-")
    assert body["object"] == "chat.completion" and body["model"] == "scripted-model"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": TEXT},
                                "logprobs": None, "finish_reason": "stop"}]
    prompt, params, max_tokens, request_id = backend.calls[0]
    tok = backend.tokenizer
    assert prompt == list(tok.apply_chat_template(CHAT["messages"], add_generation_prompt=True))
    assert (max_tokens, request_id, params.seed) == (50, rid, 3)
    n = len(script())
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": n,
                             "total_tokens": len(prompt) + n,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # a scripted backend caches nothing
    # After the EOS sample the API closes the generator rather than waiting for it to end.
    assert len(backend.endings) == 1 and backend.yielded == n - 1


async def test_chat_stream_with_usage():
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions",
                              json=CHAT | {"stream": True, "stream_options": {"include_usage": True}})
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["x-request-id"].startswith("req-")
        chunks = events(await r.text())
    assert chunks[-1] == "[DONE]"
    usage, final, first = chunks[-2], chunks[-3], chunks[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert final["choices"][0]["finish_reason"] == "stop" and final["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(script())
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-3]) == TEXT
    assert len({c["id"] for c in chunks[:-1]}) == 1


async def test_completion_non_stream_with_logprobs():
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        r = await client.post("/v1/completions", json=COMPLETION | {"logprobs": 2})
        body = await r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == TEXT and choice["finish_reason"] == "stop"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(script()) - 1  # the EOS token has no entry
    assert "".join(lp["tokens"]) == TEXT and lp["text_offset"][0] == 0
    assert len(lp["top_logprobs"][0]) >= 2
    assert backend.calls[0][0] == backend.tokenizer.encode("Say hello")
    assert backend.calls[0][1].top_logprobs == 2


async def test_completion_stream_stop_string_closes_the_generator():
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        r = await client.post("/v1/completions", json=COMPLETION | {"stream": True, "stop": ["is a"]})
        chunks = events(await r.text())
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Hello world, this "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "text_completion" for c in chunks[:-1])
    assert backend.endings == ["closed"]  # the API stopped the generation itself...
    assert backend.yielded < len(script()) - 2  # ...well before its end


async def test_length_and_chat_logprobs():
    backend = ScriptedBackend(script(eos=False))
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions",
                              json=CHAT | {"max_tokens": 3, "logprobs": True, "top_logprobs": 2})
        body = await r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    content = choice["logprobs"]["content"]
    assert len(content) == 3 and "".join(c["token"] for c in content) == choice["message"]["content"]
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert len(content[0]["top_logprobs"]) == 2


# ---- the openai client ------------------------------------------------------------------------


async def test_openai_client_parses_everything():
    backend = ScriptedBackend(script())
    async with serve(backend, api_keys=frozenset({KEY})) as client:
        async with oai(client) as api:
            models = await api.models.list()
            assert [m.id for m in models.data] == ["scripted-model"]
            assert (await api.models.retrieve("scripted-model")).id == "scripted-model"

            r = await api.chat.completions.create(model="scripted-model", messages=CHAT["messages"],
                                                  logprobs=True, top_logprobs=1)
            assert r.choices[0].message.content == TEXT and r.choices[0].finish_reason == "stop"
            assert r.usage.completion_tokens == len(script())
            assert r.choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.5

            stream = await api.chat.completions.create(
                model="scripted-model", messages=CHAT["messages"], stream=True,
                stream_options={"include_usage": True})
            parts, finish, usage = [], None, None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            assert "".join(parts) == TEXT and finish == "stop"
            assert usage.completion_tokens == len(script())

            c = await api.completions.create(model="scripted-model", prompt="Say hello", max_tokens=4)
            assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 4
            stream = await api.completions.create(model="scripted-model", prompt="Say", stream=True)
            assert "".join([x.choices[0].text async for x in stream]) == TEXT

            with pytest.raises(openai.BadRequestError) as e:
                await api.chat.completions.create(model="scripted-model", messages=CHAT["messages"], n=2)
            assert e.value.body["message"] == "n>1 is not supported; send one request per completion"
            assert e.value.body["param"] == "n"


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path, data, param, fragment", [
    ("/v1/chat/completions", b"{nope", None, "not valid JSON"),
    ("/v1/chat/completions", b"[]", None, "JSON object"),
    ("/v1/chat/completions", json.dumps(CHAT | {"tools": [{"type": "function"}]}).encode(),
     "tools[0]", "function"),
    ("/v1/chat/completions", json.dumps(CHAT | {"max_tokens": 5000}).encode(), "max_tokens", "2048"),
    ("/v1/completions", json.dumps(COMPLETION | {"wat": 1}).encode(), "wat", "unknown field"),
    ("/v1/completions", json.dumps({"prompt": ""}).encode(), "prompt", "non-empty"),
])
async def test_400s_are_openai_errors(path, data, param, fragment):
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        r = await client.post(path, data=data, headers={"Content-Type": "application/json"})
        body = await r.json()
    assert r.status == 400 and r.headers["x-request-id"].startswith("req-")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    assert fragment in body["error"]["message"]
    assert backend.calls == []


async def test_body_too_large_and_unknown_route():
    async with serve(ScriptedBackend(script())) as client:
        r = await client.post("/v1/completions", data=io.BytesIO(b"x" * (5 << 20)))
        assert r.status == 413 and "error" in await r.json()
        r = await client.get("/v1/nothing")
        assert r.status == 404 and "error" in await r.json()


async def test_api_keys():
    async with serve(ScriptedBackend(script()), api_keys=frozenset({KEY, "other"})) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
        r = await client.get("/v1/models", headers={"Authorization": "Bearer other"})
        assert r.status == 200
        assert (await client.get("/health")).status == 200  # open for load balancers
        assert (await client.get("/cluster/status")).status == 401
        async with oai(client, key="wrong") as api:
            with pytest.raises(openai.AuthenticationError):
                await api.models.list()


async def test_models_say_family_quantization_context_and_parameters_as_extra_fields() -> None:
    """The real openai client lists and retrieves the model objects unchanged (id, object,
    created, owned_by), and keeps the fields it does not know: what the served model is."""
    backend = ScriptedBackend(script())
    backend.model_info = {"family": "qwen3_moe", "quantization": "4-bit, group 64 (mixed: 4, 8)",
                          "context_length": 40960, "params_total": 30_532_122_624,
                          "params_active": 3_348_623_360, "batching": "batched"}
    async with serve(backend, api_keys=frozenset({KEY})) as client, oai(client) as api:
        for m in [*(await api.models.list()).data, await api.models.retrieve("scripted-model")]:
            assert (m.id, m.object, m.owned_by) == ("scripted-model", "model", "zmqinfer")
            assert isinstance(m.created, int)
            assert m.model_extra == backend.model_info
        backend.model_info = None  # not known (yet): the plain object
        assert (await api.models.retrieve("scripted-model")).model_extra == {}


@pytest.mark.parametrize("error, status, code", [
    (RingUnavailable("no placement fits"), 503, "ring_unavailable"),
    (RingTimeout("node n2 silent"), 504, "ring_timeout"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_ring_errors_before_the_first_token(error, status, code, stream):
    backend = ScriptedBackend(script(), error=error, error_at=0)
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions", json=CHAT | {"stream": stream})
        body = await r.json()
        assert r.status == status and body["error"]["code"] == code
        assert str(error) in body["error"]["message"]
        async with oai(client) as api:
            with pytest.raises(openai.APIStatusError) as e:
                await api.completions.create(model="m", prompt="x", stream=stream)
            assert e.value.status_code == status


async def test_ring_error_mid_stream_is_an_error_event():
    backend = ScriptedBackend(script(), error=RingTimeout("hop lost"), error_at=3)
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        assert r.status == 200
        chunks = events(await r.text())
        assert chunks[-1]["error"]["code"] == "ring_timeout" and "[DONE]" not in chunks
        async with oai(client) as api:
            stream = await api.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)
            with pytest.raises(openai.APIError, match="hop lost"):
                async for _ in stream:
                    pass


async def test_client_disconnect_closes_the_generator():
    backend = ScriptedBackend(script(), hang_at=3)
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        assert r.status == 200
        await r.content.readline()  # the role chunk is out: the stream is live
        await backend.hanging.wait()
        r.close()  # drop the connection mid-stream
        await wait_for(lambda: backend.endings)
    assert backend.endings[0] in ("cancelled", "closed")


async def test_too_many_requests():
    backend = ScriptedBackend(script(), hang_at=0)
    async with serve(backend, max_concurrent=1) as client:
        first = asyncio.ensure_future(client.post("/v1/completions", json=COMPLETION))
        try:
            await backend.hanging.wait()
            r = await client.post("/v1/completions", json=COMPLETION)
            assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limit_exceeded"
            assert int(r.headers["Retry-After"]) > 0
        finally:
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
        await wait_for(lambda: backend.endings)


async def test_a_full_admission_queue_is_a_429_with_retry_after():
    backend = ScriptedBackend(script(), error=Overloaded("12 requests already wait (limit 12)", 3))
    async with serve(backend) as client:
        for stream in (False, True):
            r = await client.post("/v1/chat/completions", json=CHAT | {"stream": stream})
            body = await r.json()
            assert r.status == 429 and r.headers["Retry-After"] == "3", body
            assert body["error"]["code"] == "rate_limit_exceeded" and "limit 12" in body["error"]["message"]


# ---- health and cluster -----------------------------------------------------------------------


async def test_health_status_ping():
    backend = ScriptedBackend(script())
    async with serve(backend) as client:
        r = await client.get("/health")
        assert r.status == 200 and await r.json() == {"status": "ok"}
        backend.ready = False
        r = await client.get("/health")
        assert r.status == 503 and (await r.json())["reason"] == "no nodes"
        assert (await (await client.get("/cluster/status")).json())["ready"] is False
        assert await (await client.post("/cluster/ping")).json() == {"nodes": {"n1": 0.001}}
        assert (await client.get("/v1/models/other")).status == 404
