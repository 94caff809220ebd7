"""A chat completion's text -> what the client sees: content, reasoning and tool calls.

Contract of `Splitter` (one per completion, fed textout's certain text in order):
* Text between the model's think markers (`<think>…</think>`, from mlx-lm's tokenizer: it
  knows each family's) is reasoning. A completion starts inside them when the prompt ends
  inside them (templates that open the block themselves); a `<think>` opens one only before any
  content (later it is just text).
* Text between the tool format's markers (tools.py: the model's own, or Hermes' for the generic
  format) is one tool call block, parsed at its end marker by the format's parser (mlx-lm's
  `tool_parsers`, or the JSON parser for Hermes and Llama-3 JSON). A format without an end
  marker, and Llama-3 JSON (an answer that starts with `{` or `<|python_tag|>` is its call),
  close the block at the end of the output. A marker split over deltas is held back until
  certain, so markup never reaches content.
* Each call becomes ToolCallDelta pieces: (index, id, name, "") then (index, None, None, args).
  A call is kept only if it parses, names one of the request's tools, and its arguments
  validate against that tool's JSON schema (jsonschema); anything else is dropped with a
  warning in the log (mlx-lm's server drops unparseable calls the same way). With
  parallel_tool_calls false, only the first call is kept.

`ChatText` wraps textout's `TextStream` with a Splitter (same interface: add, finish,
completion_tokens, finish_reason); a finish "stop" after a tool call becomes "tool_calls".
`chat_text(...)` gives the plain TextStream when there is nothing to split (no tools, no
thinking), so that path stays exactly as it was.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

import structlog
from jsonschema import Draft202012Validator
from mlx_lm.tokenizer_utils import TokenizerWrapper

from zmqinfer.gateway.api.request import ChatRequest, Tool
from zmqinfer.gateway.textout import Delta, FinishReason, TextStream, ToolCallDelta
from zmqinfer.gateway.tools import (
    PYTHON_TAG,
    ToolFormat,
    openai_tools,
    opens_reasoning,
    tool_format,
    uses_tools,
)
from zmqinfer.protocol.wire import Sample

log = structlog.get_logger()

State = Literal["content", "reasoning", "call"]


def _held(text: str, markers: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if m.startswith(text[len(text) - n:]):
                best = n
                break
    return best


class Splitter:
    def __init__(self, fmt: ToolFormat | None, tools: tuple[Tool, ...], *,
                 think: tuple[str, str] | None = None, thinking: bool = False,
                 parallel: bool = True) -> None:
        self._fmt = fmt
        self._tools = {t.name: t for t in tools}
        self._specs = openai_tools(tools)  # what mlx-lm's parsers take (some coerce types by it)
        self._think = think
        self._state: State = "reasoning" if thinking and think else "content"
        self._pending = ""  # text not yet given to a channel (could be the start of a marker)
        self._call = ""  # the open call block's text
        self._seen_content = False
        self._parallel = parallel
        self.calls = 0

    def feed(self, text: str, final: bool) -> tuple[str, str, list[ToolCallDelta]]:
        """(content, reasoning, tool call pieces) that became certain with `text`."""
        content: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCallDelta] = []
        buf, self._pending = self._pending + text, ""
        while buf:
            if self._state == "reasoning":
                assert self._think is not None
                buf = self._until(buf, self._think[1], reasoning, final, "content")
            elif self._state == "call":
                assert self._fmt is not None
                end = self._fmt.end
                i = buf.find(end) if end else -1
                if i < 0:
                    whole = self._call + buf
                    hold = _held(whole, [end]) if end and not final else 0
                    self._call, self._pending = whole[:len(whole) - hold], whole[len(whole) - hold:]
                    break
                calls += self._parse(self._call + buf[:i])
                self._call, buf, self._state = "", buf[i + len(end):], "content"
            else:
                buf = self._content(buf, content, final)
            if "".join(content).strip():
                self._seen_content = True
        if final and self._state == "call":  # no end marker (or a truncated call): the output's end
            calls += self._parse(self._call + self._pending)
            self._call = self._pending = ""
        return "".join(content), "".join(reasoning), calls

    def _until(self, buf: str, marker: str, out: list[str], final: bool, then: State) -> str:
        i = buf.find(marker)
        if i >= 0:
            out.append(buf[:i])
            self._state = then
            return buf[i + len(marker):]
        hold = 0 if final else _held(buf, [marker])
        out.append(buf[:len(buf) - hold])
        self._pending = buf[len(buf) - hold:]
        return ""

    def _content(self, buf: str, out: list[str], final: bool) -> str:
        fmt = self._fmt
        if fmt is not None and fmt.kind == "llama3_json" and not self._seen_content:
            head = buf.lstrip()
            if head.startswith(("{", PYTHON_TAG)):
                self._state = "call"
                return head
            if not final and (not head or PYTHON_TAG.startswith(head)):
                self._pending = buf  # not yet known whether this answer is a call
                return ""
        markers: list[str] = []
        if self._think is not None and not self._seen_content:
            markers.append(self._think[0])
        if fmt is not None and fmt.start:
            markers.append(fmt.start)
        found = [(i, m) for m in markers if (i := buf.find(m)) >= 0]
        if self._think is not None and any(m == self._think[0] and buf[:i].strip() for i, m in found):
            markers.remove(self._think[0])  # content came first: this <think> is just text
            found = [(i, m) for i, m in found if m != self._think[0]]
        if found:
            i, m = min(found)
            out.append(buf[:i])
            self._state = "call" if fmt is not None and m == fmt.start else "reasoning"
            return buf[i + len(m):]
        hold = 0 if final else _held(buf, markers)
        out.append(buf[:len(buf) - hold])
        self._pending = buf[len(buf) - hold:]
        return ""

    def _parse(self, text: str) -> list[ToolCallDelta]:
        assert self._fmt is not None
        try:
            parsed = self._fmt.parse(text, self._specs)
        except Exception as e:  # each family's parser raises its own kinds: all mean "not a call"
            log.warning("tool call dropped: it does not parse", error=f"{type(e).__name__}: {e}"[:200])
            return []
        out: list[ToolCallDelta] = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            checked = self._check(call)
            if checked is None:
                continue
            if not self._parallel and self.calls >= 1:
                log.warning("tool call dropped: parallel_tool_calls is false")
                continue
            name, args, call_id = checked
            out += [ToolCallDelta(self.calls, call_id, name, ""),
                    ToolCallDelta(self.calls, None, None, json.dumps(args, ensure_ascii=False))]
            self.calls += 1
        return out

    def _check(self, call: Any) -> tuple[str, dict[str, Any], str] | None:
        name = call.get("name") if isinstance(call, dict) else None
        args = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        tool = self._tools.get(name) if isinstance(name, str) else None
        if tool is None or not isinstance(args, dict):
            log.warning("tool call dropped: unknown tool or arguments not an object", name=str(name)[:64])
            return None
        errors = sorted(Draft202012Validator(tool.parameters).iter_errors(args), key=str)
        if errors:
            log.warning("tool call dropped: arguments fail the tool's schema", name=name,
                        error=errors[0].message[:200])
            return None
        call_id = call.get("id") if isinstance(call.get("id"), str) else None
        return tool.name, args, call_id or f"call_{secrets.token_hex(12)}"


class ChatText:
    """A TextStream whose deltas are split into content, reasoning and tool calls."""

    def __init__(self, text: TextStream, splitter: Splitter) -> None:
        self._text = text
        self._splitter = splitter
        self.finish_reason: FinishReason | None = None

    @property
    def completion_tokens(self) -> int:
        return self._text.completion_tokens

    @property
    def stop_string(self) -> str | None:
        return self._text.stop_string

    def add(self, sample: Sample) -> Delta:
        return self._split(self._text.add(sample))

    def finish(self) -> Delta:
        return self._split(self._text.finish())

    def _split(self, d: Delta) -> Delta:
        content, reasoning, calls = self._splitter.feed(d.text, d.finish_reason is not None)
        finish = d.finish_reason
        if finish == "stop" and self._splitter.calls:
            finish = "tool_calls"
        self.finish_reason = finish
        return Delta(content, d.logprobs, finish, reasoning, tuple(calls))


def chat_text(req: ChatRequest, tokenizer: TokenizerWrapper, prompt: tuple[int, ...],
              text: TextStream) -> TextStream | ChatText:
    """`text` itself when there is nothing to split, else a ChatText around it."""
    tools = req.tools if req.tool_choice.mode != "none" else ()
    fmt = tool_format(tokenizer) if tools and uses_tools(req) else None
    think = (tokenizer.think_start, tokenizer.think_end) if tokenizer.has_thinking else None
    if fmt is None and think is None:
        return text
    # The template may have opened the block: the prompt ends inside it.
    return ChatText(text, Splitter(fmt, tools, think=think, thinking=opens_reasoning(tokenizer, prompt),
                                   parallel=req.parallel_tool_calls))
