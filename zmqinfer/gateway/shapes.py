"""OpenAI's response objects: chat.completion(.chunk) and text_completion, whole or streamed.

Pure shaping: text, logprob entries, finish reasons and usage in; JSON-ready dicts out. The API
(api.py) decides when each is sent.
"""

from __future__ import annotations

import time
from typing import Any

from zmqinfer.gateway.textout import (
    Delta,
    LogprobEntry,
    chat_logprobs,
    completion_logprobs,
)
from zmqinfer.gateway.validate import Options


class ChatShape:
    """chat.completion and chat.completion.chunk objects."""

    def __init__(self, request_id: str, model_id: str, opts: Options) -> None:
        self._head = {"id": "chatcmpl-" + request_id.removeprefix("req-"),
                      "created": int(time.time()), "model": model_id}
        self._logprobs = opts.logprobs is not None

    def body(self, text: str, entries: list[LogprobEntry], finish: str | None,
             usage: dict[str, int]) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": chat_logprobs(entries) if self._logprobs else None,
                  "finish_reason": finish}
        return self._head | {"object": "chat.completion", "choices": [choice], "usage": usage}

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""}, (), None)]

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        out = []
        if delta.text or delta.logprobs:
            out.append(self._chunk({"content": delta.text}, delta.logprobs, None))
        if delta.finish_reason is not None:
            out.append(self._chunk({}, (), delta.finish_reason))
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._head | {"object": "chat.completion.chunk", "choices": [], "usage": usage}

    def _chunk(self, delta: dict[str, Any], entries: tuple[LogprobEntry, ...],
               finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta,
                  "logprobs": chat_logprobs(entries) if self._logprobs and entries else None,
                  "finish_reason": finish}
        return self._head | {"object": "chat.completion.chunk", "choices": [choice]}


class CompletionShape:
    """text_completion objects (streamed chunks have the same object name)."""

    def __init__(self, request_id: str, model_id: str, opts: Options) -> None:
        self._head = {"id": "cmpl-" + request_id.removeprefix("req-"),
                      "object": "text_completion", "created": int(time.time()), "model": model_id}
        self._logprobs = opts.logprobs is not None

    def body(self, text: str, entries: list[LogprobEntry], finish: str | None,
             usage: dict[str, int]) -> dict[str, Any]:
        return self._head | {"choices": [self._choice(text, entries, finish)], "usage": usage}

    def start(self) -> list[dict[str, Any]]:
        return []  # legacy completions have no role chunk

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        if not (delta.text or delta.logprobs or delta.finish_reason):
            return []
        return [self._head | {"choices": [self._choice(delta.text, delta.logprobs,
                                                       delta.finish_reason)]}]

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._head | {"choices": [], "usage": usage}

    def _choice(self, text: str, entries: tuple[LogprobEntry, ...] | list[LogprobEntry],
                finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text,
                "logprobs": completion_logprobs(entries) if self._logprobs else None,
                "finish_reason": finish}
