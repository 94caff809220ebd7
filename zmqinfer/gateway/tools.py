"""How a model is told about tools and how its calls look: the prompt side of tool calling.

Contract:
* `tool_format(tokenizer)` -> the `ToolFormat` the model's own chat template speaks, chosen as
  mlx-lm chooses it (tokenizer_utils' `_infer_tool_parser`, which sets the wrapper's
  `tool_parser` and `tool_call_start/end`); a Llama-3.1-style template (JSON calls, no markers)
  gets "llama3_json"; a template with no tool syntax at all (the embedded SmolLM2's) gets
  "generic": the tools described in a system message and Hermes' `<tool_call>{json}</tool_call>`,
  as llama.cpp's generic handler does, so every model can call tools.
* `template_input(request, format)` -> (messages, extra template kwargs): the history as the
  template wants it (assistant `tool_calls` with parsed arguments, `tool` messages; in the
  generic format both rewritten as plain text the template can show) and `tools=` when the
  template renders them itself. tool_choice "none" renders no tools at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mlx_lm.tokenizer_utils import TokenizerWrapper

from zmqinfer.gateway.api.request import ChatRequest, Message, Tool

FormatKind = Literal["native", "llama3_json", "generic"]
Parser = Callable[[str, Any], Any]  # mlx-lm's parse_tool_call(text, tools) -> call or [calls]

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PROMPT_TAIL_TOKENS = 32  # enough of a prompt's end to hold a think marker and what follows
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's marker before a call (optional in its JSON form)


@dataclass(frozen=True)
class ToolFormat:
    kind: FormatKind
    start: str  # the marker that opens a call ("" for llama3_json: the whole answer is the call)
    end: str
    parse: Parser
    hermes: bool  # calls are `<tool_call>{"name":..., "arguments":...}</tool_call>` JSON


def _parse_json_call(text: str, tools: Any = None) -> Any:
    """Hermes' body, or Llama 3's whole answer: {"name", "arguments"|"parameters"}; Llama 3
    separates several calls with ';'."""
    text = text.strip().removeprefix(PYTHON_TAG).strip()
    calls = []
    for part in _split_top_level(text):
        call = json.loads(part)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError("a tool call must be an object with a name")
        args = call.get("arguments", call.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args)
        calls.append({"name": call["name"], "arguments": args})
    if not calls:
        raise ValueError("no tool call")
    return calls


def _split_top_level(text: str) -> list[str]:
    """`{...}; {...}` -> each object's text (JSON's own decoder finds where each one ends)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i >= len(text):
            break
        _, end = decoder.raw_decode(text, i)
        out.append(text[i:end])
        i = end
    return out


def tool_format(tokenizer: TokenizerWrapper) -> ToolFormat:
    if tokenizer.has_tool_calling and tokenizer.tool_parser is not None:
        start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
        hermes = start == HERMES_START and "json_tools" in getattr(tokenizer.tool_parser, "__module__", "")
        return ToolFormat("native", start, end, tokenizer.tool_parser, hermes)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "tools" in template and (PYTHON_TAG in template or '"parameters"' in template):
        return ToolFormat("llama3_json", "", "", _parse_json_call, False)
    return ToolFormat("generic", HERMES_START, HERMES_END, _parse_json_call, True)


def opens_reasoning(tokenizer: TokenizerWrapper, prompt: tuple[int, ...] | list[int]) -> bool:
    """The prompt ends inside a think block (templates that open it themselves, R1-style): the
    completion starts with reasoning."""
    if not tokenizer.has_thinking:
        return False
    tail = tokenizer.decode(list(prompt[-PROMPT_TAIL_TOKENS:]))
    return bool(tail.rfind(tokenizer.think_start) > tail.rfind(tokenizer.think_end))


def openai_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]


def generic_system_text(tools: tuple[Tool, ...]) -> str:
    specs = json.dumps(openai_tools(tools), ensure_ascii=False)
    return ("You can call tools. To call one, answer with only this, one block per call:\n"
            f'{HERMES_START}\n{{"name": <tool name>, "arguments": <an object of its parameters>}}\n'
            f"{HERMES_END}\nThe tools:\n{specs}")


def uses_tools(req: ChatRequest) -> bool:
    return bool(req.tools) or any(m.tool_calls or m.role == "tool" for m in req.messages)


def template_input(req: ChatRequest, tokenizer: TokenizerWrapper) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The template's `messages` and extra keyword arguments for `req`."""
    render_tools = bool(req.tools) and req.tool_choice.mode != "none"
    kwargs = dict(req.template_kwargs)
    if not uses_tools(req):
        return [_native(m) for m in req.messages], kwargs
    fmt = tool_format(tokenizer)
    if fmt.kind == "generic":
        names = {c.id: c.name for m in req.messages for c in m.tool_calls}
        messages = [_generic(m, names) for m in req.messages]
        if render_tools:
            note = generic_system_text(req.tools)
            if messages[0]["role"] == "system":
                messages[0] = messages[0] | {"content": messages[0]["content"] + "\n\n" + note}
            else:
                messages.insert(0, {"role": "system", "content": note})
        return messages, kwargs
    if render_tools:
        kwargs["tools"] = openai_tools(req.tools)
    return [_native(m) for m in req.messages], kwargs


def _native(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        # Templates index arguments as a mapping (mlx-lm's server parses them the same way).
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _generic(m: Message, names: dict[str, str]) -> dict[str, Any]:
    """A template without tool syntax knows system/user/assistant only: calls become the
    assistant's Hermes text, results become a user turn that says which tool answered."""
    if m.role == "tool":
        name = names.get(m.tool_call_id or "", m.name or "the tool")
        return {"role": "user",
                "content": f"<tool_response>\n{name} returned: {m.content}\n</tool_response>"}
    text = m.content
    for c in m.tool_calls:
        call = json.dumps({"name": c.name, "arguments": json.loads(c.arguments)}, ensure_ascii=False)
        text += f"{HERMES_START}\n{call}\n{HERMES_END}"
    return {"role": m.role, "content": text} | ({"name": m.name} if m.name else {})
