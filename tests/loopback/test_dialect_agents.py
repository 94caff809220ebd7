"""Issue 21's agent paths on the shared 3-node ring of the embedded model, through the official
clients: tools, a tool result turn and enforced structured output in Anthropic Messages, OpenAI
Responses and Ollama, and the prefix cache's cached tokens in their usage.

The embedded model's template has no tool syntax (the generic Hermes format, docs/tools.md).
Where a dialect can force a call (Anthropic `any` / `tool`, Responses `required` / a named
function) the grammar holds the tiny model to the tool's schema, so its call must parse and
validate. Ollama has no tool_choice: two earlier calls in the history lead the model (greedy)
to call the tool itself. A tool result turn must answer exactly what the chat route answers the
same history with, since every dialect is translated into the chat path."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import ollama
import openai
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

from zmqinfer.local import LocalCluster

SCHEMAS = {
    "get_weather": {"type": "object", "additionalProperties": False, "required": ["city"],
                    "properties": {"city": {"type": "string", "maxLength": 30}}},
    "get_time": {"type": "object", "additionalProperties": False, "required": ["zone"],
                 "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}},
}
DESCRIPTIONS = {"get_weather": "The current weather of a city",
                "get_time": "The current time in a time zone"}
CHAT_TOOLS = [{"type": "function", "function": {"name": n, "description": DESCRIPTIONS[n],
                                                "parameters": s}} for n, s in SCHEMAS.items()]
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
        "properties": {"city": {"type": "string", "maxLength": 30},
                       "country": {"type": "string", "maxLength": 30},
                       "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000}}}
ASK = "What is the weather in Paris right now?"
RESULT = "Sunny, 21 C"
MAX_TOKENS = 96  # room for a whole call or a CITY object; a continued turn is cut at REPLY_TOKENS
REPLY_TOKENS = 24
TIMEOUT_S = 120


def valid(name: str, arguments: dict[str, Any]) -> None:
    Draft202012Validator(SCHEMAS[name]).validate(arguments)


class ChatReference:
    """The chat route's greedy answer to [ASK, the call, RESULT] with both tools: what each
    dialect's tool result turn must reproduce. One request per distinct call."""

    def __init__(self, cluster: LocalCluster) -> None:
        self._api = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=TIMEOUT_S,
                                  max_retries=0)
        self._answers: dict[str, str] = {}

    def after(self, name: str, arguments: dict[str, Any]) -> str:
        key = json.dumps([name, arguments], sort_keys=True)
        if key not in self._answers:
            r = self._api.chat.completions.create(
                model="m", tools=CHAT_TOOLS, max_tokens=REPLY_TOKENS, temperature=0,  # type: ignore[arg-type]
                messages=[{"role": "user", "content": ASK},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "call_1", "type": "function",
                               "function": {"name": name, "arguments": json.dumps(arguments)}}]},
                          {"role": "tool", "tool_call_id": "call_1", "content": RESULT}])
            assert r.choices[0].message.content
            self._answers[key] = r.choices[0].message.content
        return self._answers[key]


@pytest.fixture(scope="module")
def reference(cluster: LocalCluster) -> ChatReference:
    return ChatReference(cluster)


# ---- Anthropic Messages -----------------------------------------------------------------------

ANTHROPIC_TOOLS = [{"name": n, "description": DESCRIPTIONS[n], "input_schema": s} for n, s in SCHEMAS.items()]
GREEDY = {"temperature": 0}  # the SDK's create() has no temperature keyword; Anthropic's default is 1


def test_anthropic_tool_use_forced_streamed_and_answered(cluster: LocalCluster,
                                                         reference: ChatReference) -> None:
    ac = anthropic.Anthropic(base_url=cluster.url, api_key="sk-ant-unused", timeout=TIMEOUT_S, max_retries=0)
    ask = [{"role": "user", "content": ASK}]
    kw: dict[str, Any] = dict(model="claude-sonnet-4-5", max_tokens=MAX_TOKENS, messages=ask,
                              tools=ANTHROPIC_TOOLS, extra_body=GREEDY)
    m = ac.messages.create(**kw, tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"], m.content
    call = m.content[0]
    assert call.type == "tool_use" and call.id
    valid(call.name, call.input)  # type: ignore[arg-type]

    # Streamed, a named tool: the input arrives as input_json_delta pieces the SDK assembles.
    with ac.messages.stream(**kw, tool_choice={"type": "tool", "name": "get_time"}) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert kinds and set(kinds) == {"input_json_delta"}
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].name == "get_time"  # type: ignore[union-attr]
    valid("get_time", final.content[0].input)  # type: ignore[union-attr,arg-type]

    # The reply sent back as is, and a tool_result: the conversation goes on.
    answer = ac.messages.create(model="claude-sonnet-4-5", max_tokens=REPLY_TOKENS, tools=ANTHROPIC_TOOLS,
                                extra_body=GREEDY, messages=ask + [  # type: ignore[arg-type]
                                    {"role": "assistant", "content": m.content},
                                    {"role": "user", "content": [{"type": "tool_result",
                                                                  "tool_use_id": call.id, "content": RESULT}]}])
    assert [b.type for b in answer.content] == ["text"] and answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content[0].text == reference.after(call.name, call.input)  # type: ignore[union-attr,arg-type]


def test_anthropic_output_config_format_is_enforced(cluster: LocalCluster) -> None:
    ac = anthropic.Anthropic(base_url=cluster.url, api_key="sk-ant-unused", timeout=TIMEOUT_S, max_retries=0)
    m = ac.messages.create(model="claude-sonnet-4-5", max_tokens=MAX_TOKENS, extra_body=GREEDY,
                           output_config={"format": {"type": "json_schema", "schema": CITY}},
                           messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    assert m.stop_reason == "end_turn", m.content
    Draft202012Validator(CITY).validate(json.loads(m.content[0].text))  # type: ignore[union-attr]


# ---- OpenAI Responses -------------------------------------------------------------------------

RESPONSES_TOOLS = [{"type": "function", "name": n, "description": DESCRIPTIONS[n], "parameters": s,
                    "strict": True} for n, s in SCHEMAS.items()]


def test_responses_function_calls_forced_streamed_and_answered(cluster: LocalCluster,
                                                               reference: ChatReference) -> None:
    oc = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    kw: dict[str, Any] = dict(model="m", input=ASK, tools=RESPONSES_TOOLS, temperature=0,
                              max_output_tokens=MAX_TOKENS)
    r = oc.responses.create(**kw, tool_choice="required")
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"], r.output
    call = r.output[0]
    assert call.type == "function_call" and call.call_id
    valid(call.name, json.loads(call.arguments))

    events = list(oc.responses.create(**kw, tool_choice={"type": "function", "name": "get_time"},
                                      stream=True))
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert events[-1].type == "response.completed"
    (streamed,) = events[-1].response.output  # type: ignore[union-attr]
    assert streamed.type == "function_call" and streamed.name == "get_time"
    assert pieces == streamed.arguments
    valid("get_time", json.loads(streamed.arguments))

    # The output items sent back as they came, and the function's output.
    answer = oc.responses.create(model="m", tools=RESPONSES_TOOLS, temperature=0,  # type: ignore[arg-type]
                                 max_output_tokens=REPLY_TOKENS, input=[
                                     {"role": "user", "content": ASK}, *r.output,
                                     {"type": "function_call_output", "call_id": call.call_id,
                                      "output": RESULT}])
    assert answer.output_text == reference.after(call.name, json.loads(call.arguments))


class City(BaseModel):
    city: str = Field(max_length=30)
    population: int = Field(ge=0, le=100_000_000)


def test_responses_text_format_json_schema_is_enforced(cluster: LocalCluster) -> None:
    """The SDK's `parse` sends the model's schema as text.format json_schema (strict) and
    parses the answer back into it."""
    oc = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    r = oc.responses.parse(model="m", input="The biggest city of France?", temperature=0,
                           max_output_tokens=MAX_TOKENS, text_format=City)
    assert r.status == "completed" and isinstance(r.output_parsed, City), r.output_text


# ---- Ollama -----------------------------------------------------------------------------------

OLLAMA_OPTIONS = {"temperature": 0, "num_predict": MAX_TOKENS}


def ollama_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": name,
                                                                             "arguments": arguments}}]}


# Two questions the assistant answered with a call: the model (greedy) answers the third alike.
LEAD = [{"role": "user", "content": "What is the weather in Berlin?"}, ollama_call("get_weather", {"city": "Berlin"}),
        {"role": "user", "content": "What is the weather in Oslo?"}, ollama_call("get_weather", {"city": "Oslo"}),
        {"role": "user", "content": "What is the weather in Paris?"}]


def test_ollama_tool_calls_results_and_formats(cluster: LocalCluster, reference: ChatReference) -> None:
    oc = ollama.Client(host=cluster.url, timeout=TIMEOUT_S)
    r = oc.chat(model="m", messages=LEAD, tools=CHAT_TOOLS, options=OLLAMA_OPTIONS)
    assert r.message.tool_calls, r.message.content
    (call,) = r.message.tool_calls
    valid(call.function.name, dict(call.function.arguments))
    assert r.done_reason == "stop" and not r.message.content
    streamed = [c for part in oc.chat(model="m", messages=LEAD, tools=CHAT_TOOLS, options=OLLAMA_OPTIONS,
                                      stream=True) for c in part.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (call.function.name, call.function.arguments)]

    # Ollama's tool result names its tool instead of a call id.
    arguments = dict(call.function.arguments)
    answer = oc.chat(model="m", tools=CHAT_TOOLS, options=OLLAMA_OPTIONS | {"num_predict": REPLY_TOKENS},
                     messages=[{"role": "user", "content": ASK}, ollama_call(call.function.name, arguments),
                               {"role": "tool", "tool_name": call.function.name, "content": RESULT}])
    assert answer.message.content == reference.after(call.function.name, arguments)

    # format: "json" (any object), and a schema, streamed.
    describe = [{"role": "user", "content": "Describe Paris as JSON."}]
    loose = oc.chat(model="m", messages=describe, format="json", options=OLLAMA_OPTIONS)
    assert loose.done_reason == "stop" and isinstance(json.loads(loose.message.content or ""), dict)
    text = "".join(p.message.content or "" for p in oc.chat(model="m", messages=describe, format=CITY,
                                                           options=OLLAMA_OPTIONS, stream=True))
    Draft202012Validator(CITY).validate(json.loads(text))


# ---- cached tokens (issue 22) -----------------------------------------------------------------

# A prompt no other test sends, long enough that its cached part is most of it.
LONG = ("Summarise in one line. The ship's log, day 14: " + " ".join(
    f"At bell {i} the wind backed {i * 7 % 360} degrees and we reefed the mainsail." for i in range(24)))


def test_cached_tokens_in_anthropic_and_responses_usage(cluster: LocalCluster) -> None:
    """The same long prompt again: its prefix comes from the cache, all but the last two tokens
    (docs/prefix-cache.md). Anthropic counts them apart from input_tokens, OpenAI inside them."""
    ac = anthropic.Anthropic(base_url=cluster.url, api_key="sk-ant-unused", timeout=TIMEOUT_S, max_retries=0)
    kw: dict[str, Any] = dict(model="claude-sonnet-4-5", max_tokens=4, extra_body=GREEDY,
                              messages=[{"role": "user", "content": LONG}])
    first = ac.messages.create(**kw).usage
    with ac.messages.stream(**kw) as stream:  # streamed: message_start carries it too
        second = stream.get_final_message().usage
    total = first.input_tokens + (first.cache_read_input_tokens or 0)
    assert total > 300 and second.input_tokens + (second.cache_read_input_tokens or 0) == total
    assert (second.cache_read_input_tokens, second.input_tokens) == (total - 2, 2)
    assert second.cache_creation_input_tokens == 0
    assert (first.cache_read_input_tokens or 0) < total - 2  # the first could not have all of it

    oc = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    r = oc.responses.create(model="m", input=LONG, temperature=0, max_output_tokens=4)
    assert r.usage is not None and r.usage.input_tokens == total
    assert r.usage.input_tokens_details.cached_tokens == total - 2


def test_openai_agents_completes_a_one_tool_task(cluster: LocalCluster) -> None:
    """openai-agents' default model class (Responses): the first turn must call the tool (the
    grammar holds the model to it), the agent runs it and sends its output back, and the next
    turn (tool_choice reset to auto, as the SDK does after a call) answers."""
    import asyncio

    from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_client,
                        set_tracing_disabled)

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        calls.append(city)
        return RESULT

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    set_default_openai_client(openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused",
                                                 timeout=TIMEOUT_S, max_retries=0), use_for_tracing=False)
    agent = Agent(name="assistant", tools=[get_weather], model_settings=ModelSettings(
        temperature=0, max_tokens=MAX_TOKENS, tool_choice="required"))
    result = asyncio.run(Runner.run(agent, ASK, max_turns=3))
    assert len(calls) == 1 and isinstance(calls[0], str) and calls[0]
    assert isinstance(result.final_output, str) and result.final_output
