"""markup: every mlx-lm tool-parser format, Llama-3 JSON and the generic Hermes one, parsed from
recorded model outputs, whole and split at every character; reasoning split from content; the
markup never reaches content; calls that fail their tool's schema are dropped."""

from __future__ import annotations

import importlib
import json
import pkgutil

import mlx_lm.tool_parsers
import pytest

from zmqinfer.gateway.api.request import Tool
from zmqinfer.gateway.markup import Splitter
from zmqinfer.gateway.textout import ToolCallDelta
from zmqinfer.gateway.tools import HERMES_END, HERMES_START, ToolFormat, _parse_json_call

MULTIPLY = Tool("multiply", "Multiply two numbers.", {
    "type": "object", "required": ["a", "b"],
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}}})
ARGS = {"a": 12234585, "b": 48838483920}
JSON_CALL = json.dumps({"name": "multiply", "arguments": ARGS})

# What each family's model writes between its markers for multiply(a=12234585, b=48838483920)
# (from mlx-lm's own tests/test_tool_parsing.py and each parser's docstring).
BODIES = {
    "function_gemma": "call:multiply{a:12234585,b:48838483920}",
    "gemma4": "call:multiply{a:12234585,b:48838483920}",
    "glm47": "multiply<arg_key>a</arg_key><arg_value>12234585</arg_value><arg_key>b</arg_key>"
             "<arg_value>48838483920</arg_value>",
    "json_tools": JSON_CALL,
    "minimax_m2": '<invoke name="multiply">\n<parameter name="a">12234585</parameter>\n'
                  '<parameter name="b">48838483920</parameter>\n</invoke>',
    "qwen3_coder": "<function=multiply>\n<parameter=a>\n12234585\n</parameter>\n<parameter=b>\n"
                   "48838483920\n</parameter>\n</function>",
    "longcat": "multiply<longcat_arg_key>a</longcat_arg_key>\n<longcat_arg_value>12234585"
               "</longcat_arg_value>\n<longcat_arg_key>b</longcat_arg_key>\n<longcat_arg_value>"
               "48838483920</longcat_arg_value>",
    "pythonic": "[multiply(a=12234585, b=48838483920)]",
    "mistral": 'multiply[ARGS]{"a": 12234585, "b": 48838483920}',
    "kimi_k2": '<|tool_call_begin|>functions.multiply:0<|tool_call_argument_begin|>'
               '{"a": 12234585, "b": 48838483920}<|tool_call_end|>',
    "kimi_k3": '<|open|>call tool="multiply" index="1"<|sep|><|open|>json type="object"<|sep|>'
               '{"a": 12234585, "b": 48838483920}<|close|>json<|sep|><|close|>call<|sep|>',
    "minicpm5": '"multiply"><param name="a">12234585</param><param name="b">48838483920</param>',
    "muse_spark": '<atem:invoke name="multiply"><atem:parameter name="a">12234585'
                  '</atem:parameter><atem:parameter name="b">48838483920</atem:parameter>'
                  '</atem:invoke>',
}
# laguna has no markers of its own (mlx-lm never infers it from a template): not a stream format.
UNMARKED = {"laguna"}


def run(splitter: Splitter, text: str, cuts: list[int]) -> tuple[str, str, list[ToolCallDelta]]:
    content, reasoning, calls, last = "", "", [], 0
    for i, cut in enumerate([*cuts, len(text)]):
        c, r, k = splitter.feed(text[last:cut], final=i == len(cuts))
        content, reasoning, calls, last = content + c, reasoning + r, calls + k, cut
    return content, reasoning, calls


def assert_every_split(make: type[Splitter] | object, text: str, check) -> None:
    """Whole, and split at every character (the worst a detokenizer can do)."""
    check(*run(make(), text, []))
    for i in range(1, len(text)):
        check(*run(make(), text, [i]))
    check(*run(make(), text, list(range(1, len(text)))))


def joined(calls: list[ToolCallDelta]) -> list[tuple[str, dict]]:
    out: dict[int, list] = {}
    for c in calls:
        if c.id is not None:
            assert c.id and c.name and c.arguments == ""  # our call_<hex>, or the model's own (Kimi)
            out[c.index] = [c.name, ""]
        else:
            out[c.index][1] += c.arguments
    return [(name, json.loads(args)) for name, args in (out[i] for i in sorted(out))]


def test_every_mlx_lm_format_is_covered():
    names = {m.name for m in pkgutil.iter_modules(mlx_lm.tool_parsers.__path__)}
    assert names - UNMARKED <= set(BODIES), names - UNMARKED - set(BODIES)


@pytest.mark.parametrize("name", sorted(BODIES))
def test_mlx_lm_formats_whole_and_streamed(name):
    mod = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    fmt = ToolFormat("native", mod.tool_call_start, mod.tool_call_end, mod.parse_tool_call, False)
    text = "Let me work that out. " + mod.tool_call_start + BODIES[name] + mod.tool_call_end

    def check(content: str, reasoning: str, calls: list[ToolCallDelta]) -> None:
        assert content == "Let me work that out. " and reasoning == ""
        assert joined(calls) == [("multiply", ARGS)]

    assert_every_split(lambda: Splitter(fmt, (MULTIPLY,)), text, check)


HERMES = ToolFormat("generic", HERMES_START, HERMES_END, _parse_json_call, True)
LLAMA3 = ToolFormat("llama3_json", "", "", _parse_json_call, False)


def test_hermes_parallel_calls_and_text_between():
    text = f"A{HERMES_START}\n{JSON_CALL}\n{HERMES_END}B{HERMES_START}{JSON_CALL}{HERMES_END}"

    def check(content, reasoning, calls):
        assert content == "AB" and joined(calls) == [("multiply", ARGS)] * 2
        assert [c.index for c in calls] == [0, 0, 1, 1]

    assert_every_split(lambda: Splitter(HERMES, (MULTIPLY,)), text, check)

    def first_only(content, reasoning, calls):
        assert joined(calls) == [("multiply", ARGS)]

    assert_every_split(lambda: Splitter(HERMES, (MULTIPLY,), parallel=False), text, first_only)


@pytest.mark.parametrize("text", [
    json.dumps({"name": "multiply", "parameters": ARGS}),
    "<|python_tag|>" + json.dumps({"name": "multiply", "parameters": ARGS}),
    "  " + json.dumps({"name": "multiply", "parameters": ARGS}) + "; "
    + json.dumps({"name": "multiply", "parameters": ARGS}),
])
def test_llama3_json(text):
    n = text.count('"name"')

    def check(content, reasoning, calls):
        assert content == "" and joined(calls) == [("multiply", ARGS)] * n

    assert_every_split(lambda: Splitter(LLAMA3, (MULTIPLY,)), text, check)


def test_llama3_plain_answers_stay_content():
    def check(content, reasoning, calls):
        assert content == "The answer is {42}." and calls == []

    assert_every_split(lambda: Splitter(LLAMA3, (MULTIPLY,)), "The answer is {42}.", check)


@pytest.mark.parametrize("body, why", [
    ('{"name": "multiply", "arguments": {"a": "x", "b": 1}}', "a is not a number"),
    ('{"name": "multiply", "arguments": {"a": 1}}', "b is required"),
    ('{"name": "divide", "arguments": {"a": 1, "b": 2}}', "no such tool"),
    ('{"name": "multiply", "arguments": ', "truncated"),
    ("not json at all", "not JSON"),
])
def test_bad_calls_are_dropped_and_their_markup_never_shows(body, why):
    def check(content, reasoning, calls):
        assert calls == [] and content == "ok ", why

    assert_every_split(lambda: Splitter(HERMES, (MULTIPLY,)),
                       f"ok {HERMES_START}{body}{HERMES_END}", check)


THINK = ("<think>", "</think>")


def test_reasoning_is_split_from_content():
    def check(content, reasoning, calls):
        assert (reasoning, content) == ("Let me think.", "\n\nParis.")

    assert_every_split(lambda: Splitter(None, (), think=THINK),
                       "<think>Let me think.</think>\n\nParis.", check)
    # the template opened the block: the completion starts inside it
    assert_every_split(lambda: Splitter(None, (), think=THINK, thinking=True),
                       "Let me think.</think>\n\nParis.", check)


def test_a_late_think_tag_is_just_text():
    def check(content, reasoning, calls):
        assert reasoning == "" and content == "Use <think> tags like <think>this</think>."

    assert_every_split(lambda: Splitter(None, (), think=THINK),
                       "Use <think> tags like <think>this</think>.", check)


def test_reasoning_then_a_tool_call():
    text = f"<think>I need multiply.</think>{HERMES_START}{JSON_CALL}{HERMES_END}"

    def check(content, reasoning, calls):
        assert reasoning == "I need multiply." and content == ""
        assert joined(calls) == [("multiply", ARGS)]

    assert_every_split(lambda: Splitter(HERMES, (MULTIPLY,), think=THINK), text, check)


def test_a_prefix_of_a_marker_that_never_completes_is_content():
    def check(content, reasoning, calls):
        assert content == "a <tool_c" and calls == []

    assert_every_split(lambda: Splitter(HERMES, (MULTIPLY,)), "a <tool_c", check)
