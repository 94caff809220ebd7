"""A validated request -> the prompt's token ids and its completion budget.

`plan(request, tokenizer, context_length)` applies the chat template (or the tokenizer's
default `encode`), checks token ids against the vocabulary and the total against the context
length, compiles the request's output grammar if it has one (grammar.py), and returns a `Plan`
(with the sampling parameters to send, grammar included) or a `RequestError` that says what to
fix. It is CPU work (tokenization, compiling), so the API runs it off the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from jinja2 import TemplateError
from mlx_lm.tokenizer_utils import TokenizerWrapper

from zmqinfer.gateway.api.fields import RequestError, param_error
from zmqinfer.gateway.api.request import DEFAULT_MAX_TOKENS, ChatRequest, CompletionRequest
from zmqinfer.gateway import grammar
from zmqinfer.gateway.tools import opens_reasoning, template_input, tool_format
from zmqinfer.protocol.wire import SamplingParams


@dataclass(frozen=True)
class Plan:
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams  # the request's, with its compiled grammar (if any)


def plan(request: ChatRequest | CompletionRequest, tokenizer: TokenizerWrapper,
         context_length: int) -> Plan:
    """Prompt token ids and completion budget for `request`, or RequestError."""
    vocab = len(tokenizer)
    if isinstance(request, ChatRequest):
        prompt, param = _chat_prompt(request, tokenizer), "messages"
    elif isinstance(request.prompt, str):
        prompt, param = [int(t) for t in tokenizer.encode(request.prompt)], "prompt"
    else:
        prompt, param = list(request.prompt), "prompt"
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise param_error("prompt", f"has token id {bad}, outside the vocabulary [0, {vocab})")
    if not prompt:
        raise param_error(param, "encodes to no tokens")
    options = request.options
    bad = next((t for t, _ in options.sampling.logit_bias if t >= vocab), None)
    if bad is not None:
        raise param_error("logit_bias", f"has token id {bad}, outside the vocabulary [0, {vocab})")
    if options.sampling.top_k > vocab:
        raise param_error("top_k", f"must be at most the vocabulary size {vocab}, got {options.sampling.top_k}")

    sampling = options.sampling
    if isinstance(request, ChatRequest):
        sampling = _constrained(request, tokenizer, prompt, sampling)
    room = context_length - len(prompt)
    if options.max_tokens is None:
        if room < 1:
            raise RequestError(
                f"This model's maximum context length is {context_length} tokens, but the prompt"
                f" has {len(prompt)} tokens, leaving no room for a completion. Shorten the"
                f" {param}.", param=param, code="context_length_exceeded")
        return Plan(tuple(prompt), min(DEFAULT_MAX_TOKENS, room), sampling)
    if options.max_tokens > room:
        raise RequestError(
            f"This model's maximum context length is {context_length} tokens. However, you"
            f" requested {len(prompt) + options.max_tokens} tokens ({len(prompt)} in the prompt,"
            f" {options.max_tokens} for the completion). Shorten the {param} or lower"
            f" {options.max_tokens_param}.", param=options.max_tokens_param,
            code="context_length_exceeded")
    return Plan(tuple(prompt), options.max_tokens, sampling)


def _constrained(request: ChatRequest, tokenizer: TokenizerWrapper, prompt: list[int],
                 sampling: SamplingParams) -> SamplingParams:
    """`sampling` with the request's grammar, applied from the first generated token, or, when
    the prompt opened a reasoning block, from the end of the reasoning."""
    tools = bool(request.tools) and request.tool_choice.mode == "required"
    if not tools and request.response_format.kind == "text":
        return sampling
    fmt = tool_format(tokenizer)
    text = grammar.grammar_for(request, fmt.kind, fmt.start, fmt.end, fmt.hermes)
    if text is None:
        return sampling
    grammar.check(text, tokenizer, "tools" if tools else "response_format")
    if not tokenizer.has_thinking:
        return replace(sampling, grammar=text, grammar_start=len(prompt))
    # The grammar starts after the reasoning: at once if the prompt opened the block, else only
    # if the model opens it with its first token (a one-token marker, as Qwen3's <think>).
    opened, opener = opens_reasoning(tokenizer, prompt), tokenizer.think_start_tokens
    if not opened and len(opener) != 1:
        return replace(sampling, grammar=text, grammar_start=len(prompt))
    return replace(sampling, grammar=text, grammar_start=len(prompt),
                   grammar_after=tuple(tokenizer.think_end_tokens),
                   grammar_opener=None if opened else opener[0])


def _chat_prompt(request: ChatRequest, tokenizer: TokenizerWrapper) -> list[int]:
    if not tokenizer.has_chat_template:
        raise RequestError("this model has no chat template; use /v1/completions with a plain"
                           " prompt", param="messages", code="no_chat_template")
    dicts, kwargs = template_input(request, tokenizer)
    try:
        ids = tokenizer.apply_chat_template(dicts, add_generation_prompt=True, tokenize=True,
                                            **kwargs)
    except (TemplateError, ValueError, TypeError) as e:  # raise_exception(), or a bad kwarg
        raise RequestError(f"the model's chat template rejected these messages: {e}",
                           param="messages", code="invalid_value") from None
    # Some transformers versions return a BatchEncoding or a batch of one; we need list[int].
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]
