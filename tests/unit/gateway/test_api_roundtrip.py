"""Round trips: what OpenAI clients send back (a response message dumped whole, a one-element
prompt list, tags and hints) is accepted; tool history and template kwargs reach the template."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.gateway.test_textout import load_tokenizer
from zmqinfer.gateway.api.request import Message, ToolCall, ToolChoice
from zmqinfer.gateway.api.validate import parse_chat, parse_completion
from zmqinfer.gateway.prompt import plan

USER = {"role": "user", "content": "What is the weather in Paris?"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CALL = {"id": "call_abc", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER]} | fields


def test_a_response_message_dumped_whole_is_accepted():
    """openai's `resp.choices[0].message.model_dump()`: every key, the nulls included."""
    dumped = {"content": "Sunny.", "refusal": None, "role": "assistant", "annotations": None,
              "audio": None, "function_call": None, "tool_calls": None}
    req = parse_chat(chat(messages=[USER, dumped, {"role": "user", "content": "Thanks"}]))
    assert req.messages[1] == Message("assistant", "Sunny.")
    req = parse_chat(chat(messages=[USER, dumped | {"tool_calls": []}]))
    assert req.messages[1].tool_calls == ()


def test_harmless_fields_are_accepted_and_ignored():
    req = parse_chat(chat(n=1, metadata={"team": "a"}, service_tier="auto", store=False,
                          user="u1", parallel_tool_calls=False, prompt_cache_key="k",
                          safety_identifier="s", tools=None, tool_choice=None))
    assert not req.parallel_tool_calls and req.tools == ()


def test_a_one_element_prompt_list_is_that_prompt():
    assert parse_completion({"prompt": ["Once upon"]}).prompt == "Once upon"
    assert parse_completion({"prompt": [[1, 2, 3]]}).prompt == (1, 2, 3)


def test_tool_history_parses():
    req = parse_chat(chat(tools=[WEATHER], tool_choice="auto", messages=[
        USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"sky": "clear"}'}]))
    assert req.messages[1].tool_calls == (ToolCall("call_abc", "get_weather", '{"city": "Paris"}'),)
    assert req.messages[2] == Message("tool", '{"sky": "clear"}', tool_call_id="call_abc")
    assert req.tools[0].name == "get_weather" and req.tool_choice == ToolChoice("auto")
    named = parse_chat(chat(tools=[WEATHER], tool_choice={"type": "function",
                                                          "function": {"name": "get_weather"}}))
    assert named.tool_choice == ToolChoice("required", "get_weather")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _text(tok, body: dict[str, Any]) -> str:
    return tok.decode(list(plan(parse_chat(body), tok, 4096).prompt))


def test_generic_tools_reach_a_template_without_tool_syntax(tok):
    """The embedded model's template knows no tools: they go in a system message, and the
    history's calls and results are rendered as text it can show."""
    if "tools" in (tok.chat_template or ""):
        pytest.skip("needs a template without tool syntax")  # the embedded SmolLM2 has none
    text = _text(tok, chat(tools=[WEATHER], messages=[
        USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "clear skies"}]))
    assert "get_weather" in text and "<tool_call>" in text and "Current weather" in text
    assert '"arguments": {"city": "Paris"}' in text
    assert "<tool_response>\nget_weather returned: clear skies" in text
    # tool_choice none: the tools are not described at all
    assert "Current weather" not in _text(tok, chat(tools=[WEATHER], tool_choice="none"))


def test_chat_template_kwargs_reach_the_template(tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    wrapped = TokenizerWrapper(tok._tokenizer, type(tok.detokenizer), chat_template=None)
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if enable_thinking %}<think>{% else %}<no-think>{% endif %}")
    wrapped._tokenizer.chat_template, saved = template, tok._tokenizer.chat_template
    try:
        on = _text(wrapped, chat(chat_template_kwargs={"enable_thinking": True}))
        off = _text(wrapped, chat(chat_template_kwargs={"enable_thinking": False}))
    finally:
        wrapped._tokenizer.chat_template = saved
    assert "<think>" in on and "<no-think>" in off
