"""requests: every 400 (message and param) and the happy paths, with a real tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.gateway.test_textout import load_tokenizer
from zmqinfer.gateway.api.fields import RequestError, parse_body
from zmqinfer.gateway.api.validate import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    ChatRequest,
    Message,
    parse_chat,
    parse_completion,
)
from zmqinfer.gateway.prompt import plan
from zmqinfer.protocol.wire import SamplingParams

USER = [{"role": "user", "content": "What is the capital of France?"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER} | fields


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "Once upon a time"} | fields


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# ---- happy paths ------------------------------------------------------------------------------


def test_chat_defaults():
    req = parse_chat(chat())
    assert req.messages == (Message("user", USER[0]["content"]),)
    o = req.options
    assert (o.max_tokens, o.stop, o.stream) == (None, (), False)
    assert (o.include_usage, o.logprobs) == (False, None)
    assert o.sampling == SamplingParams(temperature=DEFAULT_TEMPERATURE)


def test_chat_every_parameter_maps():
    req = parse_chat(chat(
        max_completion_tokens=7, temperature=0, top_p=0.5, top_k=40, min_p=0.1, seed=-1,
        stop="\n\n", presence_penalty=1.5, frequency_penalty=-0.5, repetition_penalty=1.1,
        logit_bias={"15": -100, "3": 2.5}, logprobs=True, top_logprobs=3, stream=True,
        stream_options={"include_usage": True}, user="alice", n=1, tools=None,
        response_format={"type": "text"}, parallel_tool_calls=False))
    o = req.options
    assert (o.max_tokens, o.max_tokens_param) == (7, "max_completion_tokens")
    assert o.stop == ("\n\n",) and o.stream and o.include_usage and o.logprobs == 3
    assert o.sampling == SamplingParams(
        temperature=0.0, top_p=0.5, top_k=40, min_p=0.1, seed=(1 << 64) - 1,
        repetition_penalty=1.1, presence_penalty=1.5, frequency_penalty=-0.5,
        logit_bias=((3, 2.5), (15, -100.0)), top_logprobs=3)


def test_message_forms():
    req = parse_chat(chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
         "name": "bob"},
        {"role": "assistant", "content": ""},
    ]))
    assert req.messages == (Message("system", "Be brief."), Message("user", "a\nb", "bob"),
                            Message("assistant", ""))


def test_completion_prompt_forms_and_logprobs():
    assert parse_completion(completion()).prompt == "Once upon a time"
    req = parse_completion(completion(prompt=[1, 2, 3], logprobs=2, echo=False, best_of=1,
                                      suffix=None, max_tokens=5))
    assert req.prompt == (1, 2, 3) and req.options.logprobs == 2
    assert req.options.sampling.top_logprobs == 2 and req.options.max_tokens == 5


def test_nulls_mean_defaults():
    req = parse_chat(chat(temperature=None, stop=None, max_tokens=None, logprobs=None, seed=None))
    assert req.options == parse_chat(chat()).options


def test_plan_chat_uses_the_chat_template(tok):
    p = plan(parse_chat(chat()), tok, 2048)
    expected = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=True)
    assert list(p.prompt) == list(expected) and all(type(t) is int for t in p.prompt)
    assert p.max_tokens == DEFAULT_MAX_TOKENS


def test_plan_completion_uses_default_encode(tok):
    p = plan(parse_completion(completion(max_tokens=3)), tok, 2048)
    assert list(p.prompt) == tok.encode("Once upon a time") and p.max_tokens == 3
    assert plan(parse_completion(completion(prompt=[5, 6])), tok, 2048).prompt == (5, 6)


def test_default_budget_is_capped_by_the_context(tok):
    p = plan(parse_completion(completion(prompt=[5] * 100)), tok, 120)
    assert p.max_tokens == 20
    assert plan(parse_completion(completion(prompt=[5] * 100, max_tokens=20)), tok, 120).max_tokens == 20


# ---- 400s -------------------------------------------------------------------------------------


def refused(fn, body, param, *fragments, status=400):
    with pytest.raises(RequestError) as e:
        fn(body)
    assert e.value.param == param, e.value.message
    assert e.value.status == status
    for f in fragments:
        assert f in e.value.message, e.value.message
    return e.value


@pytest.mark.parametrize("raw, fragment", [
    (b"{", "not valid JSON"),
    (b'{"temperature": NaN}', "not valid JSON"),
    (b'{"a": Infinity}', "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b"", "not valid JSON"),
])
def test_bad_bodies(raw, fragment):
    refused(parse_body, raw, None, fragment)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

CHAT_400 = [
    # unknown and unsupported fields
    ({"frobnicate": 1}, "frobnicate", "unknown field 'frobnicate'"),
    ({"tools": [{"type": "function"}]}, "tools[0]", '{"type": "function", "function"'),
    ({"tools": {"type": "function"}}, "tools", "list of tool objects"),
    ({"tools": [TOOL] * 2}, "tools[1].function.name", "defined twice"),
    ({"tools": [TOOL] * 129}, "tools", "at most 128"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name",
     "letters, digits"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters", "not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]},
     "tools[0].function.x", "unknown field"),
    ({"tool_choice": "auto-ish"}, "tool_choice", '"auto", "none", "required"'),
    ({"tool_choice": "required"}, "tool_choice", "no tools are given"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice", "'g', which is not in tools"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"function_call": "auto"}, "function_call", "not supported"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format", "no other field"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format.json_schema.schema", "object"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"enum": ["a" * 1000] * 100}}}},
     "response_format.json_schema.schema", "larger than"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs", "object"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools", "set by the server"),
    ({"metadata": "x"}, "metadata", "object"),
    ({"service_tier": "gold"}, "service_tier", "tier names"),
    ({"n": 2}, "n", "n>1 is not supported"),
    ({"n": 0}, "n", ">= 1"),
    ({"modalities": ["text", "audio"]}, "modalities", "text"),
    ({"audio": {"voice": "x"}}, "audio", "not supported"),
    ({"store": True}, "store", "not supported"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "not supported"),
    # types and ranges
    ({"model": 3}, "model", "string"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"temperature": True}, "temperature", "number"),
    ({"temperature": 2.5}, "temperature", "[0, 2]"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_p": 1.1}, "top_p", "(0, 1]"),
    ({"top_k": -1}, "top_k", ">= 0"),
    ({"top_k": 1.5}, "top_k", "integer"),
    ({"min_p": 1.5}, "min_p", "[0, 1]"),
    ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": -2.1}, "frequency_penalty", "[-2, 2]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "[0.01, 10]"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"seed": 1 << 64}, "seed", "between"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": "10"}, "max_tokens", "integer"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"stream": True, "stream_options": []}, "stream_options", "object"),
    ({"stream": True, "stream_options": {"x": 1}}, "stream_options.x", "unknown field"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "true or false"),
    ({"stop": 5}, "stop", "string or a list"),
    ({"stop": ["a", 1]}, "stop", "string or a list"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "1 to"),
    ({"stop": ""}, "stop", "1 to"),
    ({"logit_bias": [1]}, "logit_bias", "object"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"-5": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"5": "x"}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    ({"logprobs": 1}, "logprobs", "true or false"),
    ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"user": 5}, "user", "string"),
    # messages
    ({"messages": None}, "messages", "messages is required"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "object with role and content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role",
     "system, developer, user, assistant"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "got None"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "not supported"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "required"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]},
     "messages[0].tool_call_id", "only allowed on a tool message"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
     "messages[0].tool_calls", "only allowed on an assistant"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        CALL | {"function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "JSON object"),
    ({"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]},
     "messages[0].audio", "only null"),
    ({"messages": [{"role": "assistant", "content": "x", "frob": None}]}, "messages[0].frob",
     "not supported"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or a list"),
    ({"messages": [{"role": "user", "content": "x", "name": 1}]}, "messages[0].name", "string"),
    ({"messages": USER + [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages[1].content[0]",
     "image_url input is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages[0].content[0]", '"type": "text"'),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]", '"type": "text"'),
]


@pytest.mark.parametrize("fields, param, fragment", CHAT_400)
def test_chat_400(fields, param, fragment):
    refused(parse_chat, chat(**fields), param, fragment)


COMPLETION_400 = [
    ({"prompt": None}, "prompt", "prompt is required"),
    ({"prompt": ""}, "prompt", "non-empty string"),
    ({"prompt": []}, "prompt", "non-empty"),
    ({"prompt": ["a", "b"]}, "prompt", "batched prompts"),
    ({"prompt": [[1, 2], [3]]}, "prompt", "batched prompts"),
    ({"prompt": [1, "a"]}, "prompt", "token ids"),
    ({"prompt": 5}, "prompt", "non-empty string"),
    ({"echo": True}, "echo", "echo=true is not supported"),
    ({"suffix": "end"}, "suffix", "not supported"),
    ({"best_of": 3}, "best_of", "best_of>1"),
    ({"n": 3}, "n", "n>1 is not supported"),
    ({"logprobs": True}, "logprobs", "between 0 and 5"),
    ({"logprobs": 6}, "logprobs", "between 0 and 5"),
    ({"max_completion_tokens": 5}, "max_completion_tokens", "unknown field"),
    ({"messages": USER}, "messages", "unknown field"),
    ({"tools": []}, "tools", "unknown field"),
]


@pytest.mark.parametrize("fields, param, fragment", COMPLETION_400)
def test_completion_400(fields, param, fragment):
    refused(parse_completion, completion(**fields), param, fragment)


def test_several_unknown_fields_are_all_named():
    e = refused(parse_chat, chat(b=1, a=2), "a", "'a'", "'b'")
    assert e.code == "unknown_parameter"


def test_context_too_long_says_the_numbers(tok):
    req = parse_completion(completion(prompt=[5] * 100, max_tokens=50))
    e = refused(lambda r: plan(r, tok, 120), req, "max_tokens", "120", "150", "100", "50")
    assert e.code == "context_length_exceeded"
    req = parse_chat(chat(max_completion_tokens=5000))
    refused(lambda r: plan(r, tok, 2048), req, "max_completion_tokens", "2048")


def test_prompt_that_fills_the_context(tok):
    refused(lambda r: plan(r, tok, 100), parse_completion(completion(prompt=[5] * 100)),
            "prompt", "no room")


def test_token_ids_outside_the_vocabulary(tok):
    vocab = len(tok)
    refused(lambda r: plan(r, tok, 2048), parse_completion(completion(prompt=[1, vocab])),
            "prompt", str(vocab))
    refused(lambda r: plan(r, tok, 2048),
            parse_completion(completion(logit_bias={str(vocab + 5): 1})), "logit_bias", str(vocab + 5))


def test_chat_template_errors_are_400s(tok):
    class Angry:  # a template that raise_exception()s on its input, as many do
        has_chat_template = True

        def __len__(self):
            return len(tok)

        def apply_chat_template(self, *a, **k):
            raise ValueError("Conversation roles must alternate user/assistant")

    req = ChatRequest("m", (Message("user", "a"), Message("user", "b")), parse_chat(chat()).options)
    refused(lambda r: plan(r, Angry(), 2048), req, "messages", "roles must alternate")
