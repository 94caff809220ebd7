"""The other dialects on a real 3-node ring, through their official clients: `anthropic`
(messages, streamed, count_tokens), `openai` (responses.create, streamed and not) and `ollama`
(chat, generate, streamed, list, show). Their tools, formats and cached tokens:
test_dialect_agents.py; API keys and reasoning: test_dialect_keyed_ring.py. Each greedy answer
must be the chat route's, token for token, since every dialect is translated into the chat path
(gateway/api/shape.py)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from zmqinfer import local
from zmqinfer.local import LocalCluster

PROMPT = "What is the capital of France?"
MAX_TOKENS = 24
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def chat(cluster: LocalCluster) -> openai.types.chat.ChatCompletion:
    """The chat route's greedy answer: what every dialect must reproduce."""
    oc = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    r = oc.chat.completions.create(model="default", messages=MESSAGES,  # type: ignore[arg-type]
                                   max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content
    return r


def test_anthropic_messages_streamed_and_counted(cluster: LocalCluster, chat) -> None:
    expected = chat.choices[0].message.content
    # The SDK sends x-api-key (and anthropic-version); this ring is loopback-only, no keys.
    ac = anthropic.Anthropic(base_url=cluster.url, api_key="sk-ant-unused", timeout=120, max_retries=0)
    greedy = {"temperature": 0}  # Anthropic's default temperature is 1, as OpenAI's
    m = ac.messages.create(model="claude-sonnet-4-5", max_tokens=MAX_TOKENS, messages=MESSAGES,  # type: ignore[arg-type]
                           extra_body=greedy)
    assert m.content[0].text == expected  # type: ignore[union-attr]
    # The chat answer's prompt is cached by now: Anthropic counts those tokens apart.
    assert (m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0),
            m.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    with ac.messages.stream(model="claude-sonnet-4-5", max_tokens=MAX_TOKENS, messages=MESSAGES,  # type: ignore[arg-type]
                            extra_body=greedy) as stream:
        streamed = "".join(stream.text_stream)
    assert streamed == expected
    counted = ac.messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGES)  # type: ignore[arg-type]
    assert counted.input_tokens == chat.usage.prompt_tokens


def test_openai_responses_whole_and_streamed(cluster: LocalCluster, chat) -> None:
    expected = chat.choices[0].message.content
    oc = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    r = oc.responses.create(model="default", input=PROMPT, max_output_tokens=MAX_TOKENS, temperature=0)
    assert r.output_text == expected and r.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]
    events = list(oc.responses.create(model="default", input=PROMPT, max_output_tokens=MAX_TOKENS,
                                      temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output_text == expected  # type: ignore[union-attr]


def test_ollama_chat_generate_list_show(cluster: LocalCluster, chat) -> None:
    expected = chat.choices[0].message.content
    oc = ollama.Client(host=cluster.url, timeout=120)
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    r = oc.chat(model="default", messages=MESSAGES, options=options)
    assert r.message.content == expected and r.eval_count == chat.usage.completion_tokens
    streamed = "".join(p.message.content or "" for p in oc.chat(model="default", messages=MESSAGES,
                                                               options=options, stream=True))
    assert streamed == expected
    assert oc.generate(model="default", prompt=PROMPT, options=options).response == expected
    assert "".join(p.response or "" for p in oc.generate(model="default", prompt=PROMPT,
                                                         options=options, stream=True)) == expected
    served = [m.model for m in oc.list().models]
    assert len(served) == 1 and served[0]
    shown = oc.show(served[0])
    assert "completion" in (shown.capabilities or [])
    context = shown.modelinfo["zmqinfer.context_length"]  # type: ignore[index]
    with pytest.raises(ollama.ResponseError, match="num_ctx"):  # more context than the ring has
        oc.chat(model="default", messages=MESSAGES, options=options | {"num_ctx": context + 1})


def test_openai_agents_default_model_runs_against_the_ring(cluster: LocalCluster, chat) -> None:
    """openai-agents' default model class speaks Responses: a run (whole and streamed) ends with
    the chat route's greedy answer. (Its one-tool task: test_dialect_agents.py.)"""
    import asyncio

    from agents import Agent, ModelSettings, Runner, set_default_openai_client, set_tracing_disabled

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    set_default_openai_client(openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused",
                                                 timeout=120, max_retries=0), use_for_tracing=False)
    agent = Agent(name="assistant", model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS))

    async def run() -> tuple[str, str]:
        whole = await Runner.run(agent, PROMPT)
        streamed = Runner.run_streamed(agent, PROMPT)
        async for _ in streamed.stream_events():
            pass
        return str(whole.final_output), str(streamed.final_output)

    whole, streamed = asyncio.run(run())
    assert whole == streamed == chat.choices[0].message.content


def test_nodes_toml_aliases_reach_the_gateway(model_dir: Path, tmp_path: Path) -> None:
    """`[gateway] aliases` in nodes.toml, through `zmqinfer gateway --config` (no ring needed)."""
    port = local.free_port_block()
    config = local.write_config(tmp_path / "nodes.toml", port, ["node0"])
    config.write_text(config.read_text().replace(
        "[gateway]\n", '[gateway]\naliases = ["claude-*", "llama3.2:latest"]\n'))
    gw = local.start_gateway(tmp_path, config, port)
    try:
        local.wait_status(gw, lambda st: True, 60, "the gateway to answer")

        def get(path: str) -> dict:
            with urllib.request.urlopen(gw.url + path, timeout=10) as r:
                return json.loads(r.read())

        assert [m["name"] for m in get("/api/tags")["models"]][1:] == ["llama3.2:latest"]
        assert get("/v1/models/claude-opus-4-1")["id"] == "claude-opus-4-1"
        with pytest.raises(urllib.error.HTTPError) as e:
            get("/v1/models/gpt-4o")
        assert e.value.code == 404
    finally:
        local.stop(gw)
