"""Tool calls and reasoning through the real HTTP layer and the real `openai` SDK: a model's
Hermes-format output (the embedded model's generic format) becomes `tool_calls` with
finish_reason "tool_calls", streamed as OpenAI deltas that the SDK assembles; a history with
tool messages renders; <think> text goes to reasoning_content."""

from __future__ import annotations

import json

from tests.unit.gateway.test_api_openai import CHAT, ScriptedBackend, events, oai, script, serve
from tests.unit.gateway.test_api_roundtrip import CALL, USER, WEATHER

SAYS_CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
TOOLS = CHAT | {"messages": [USER], "tools": [WEATHER]}


async def test_a_tool_call_whole():
    async with serve(ScriptedBackend(script(SAYS_CALL))) as client:
        async with oai(client) as api:
            r = await api.chat.completions.create(**TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_a_tool_call_streamed_assembles():
    async with serve(ScriptedBackend(script("Checking. " + SAYS_CALL))) as client:
        async with oai(client) as api:
            stream = await api.chat.completions.create(**TOOLS, stream=True)
            content, calls, finish = "", {}, None
            async for chunk in stream:
                delta = chunk.choices[0].delta
                content += delta.content or ""
                for c in delta.tool_calls or []:
                    slot = calls.setdefault(c.index, {"id": None, "name": "", "arguments": ""})
                    slot["id"] = slot["id"] or c.id
                    slot["name"] += (c.function.name or "") if c.function else ""
                    slot["arguments"] += (c.function.arguments or "") if c.function else ""
                finish = chunk.choices[0].finish_reason or finish
    assert content == "Checking. " and "<tool_call>" not in content
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


async def test_first_piece_has_id_and_name_then_arguments():
    async with serve(ScriptedBackend(script(SAYS_CALL))) as client:
        r = await client.post("/v1/chat/completions", json=TOOLS | {"stream": True})
        chunks = [e for e in events(await r.text()) if e != "[DONE]"]
    pieces = [c["choices"][0]["delta"]["tool_calls"] for c in chunks
              if c["choices"][0]["delta"].get("tool_calls")]
    first, rest = pieces[0][0], [p for ps in pieces[1:] for p in ps] + pieces[0][1:]
    assert first["id"] and first["function"]["name"] == "get_weather" and first["index"] == 0
    assert all("id" not in p and "name" not in p["function"] for p in rest)


async def test_without_tools_the_same_text_is_content():
    """No tools in the request: nothing is parsed (a model quoting markup is just text)."""
    async with serve(ScriptedBackend(script(SAYS_CALL))) as client:
        async with oai(client) as api:
            r = await api.chat.completions.create(**CHAT)
    assert r.choices[0].message.content == SAYS_CALL and r.choices[0].finish_reason == "stop"


async def test_a_history_with_tool_messages_answers():
    backend = ScriptedBackend(script("It is sunny in Paris."))
    history = [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
               {"role": "tool", "tool_call_id": "call_abc", "content": '{"sky": "sunny"}'}]
    async with serve(backend) as client:
        async with oai(client) as api:
            r = await api.chat.completions.create(**TOOLS | {"messages": history})
            # and the SDK's own objects sent back as they come
            again = await api.chat.completions.create(**TOOLS | {"messages": [
                *history, r.choices[0].message.model_dump(), {"role": "user", "content": "Thanks"}]})
    assert r.choices[0].message.content == "It is sunny in Paris." and again.choices[0].message.content
    prompt = backend.tokenizer.decode(backend.calls[0][0])
    assert '"sunny"' in prompt and "get_weather" in prompt


async def test_tool_choice_none_leaves_the_text_alone():
    async with serve(ScriptedBackend(script(SAYS_CALL))) as client:
        async with oai(client) as api:
            r = await api.chat.completions.create(**TOOLS, tool_choice="none")
    assert r.choices[0].message.content == SAYS_CALL and not r.choices[0].message.tool_calls


def thinking_tokenizer():
    """A small byte-level BPE whose vocabulary has <think> and </think>: mlx-lm's wrapper then
    reports has_thinking, as it does for Qwen3 and DeepSeek-R1."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.unit.gateway.test_textout import CHATML

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Let me think about France. The capital is Paris."] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|im_end|>", "<|im_start|>", "<think>", "</think>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML)
    return TokenizerWrapper(hf, BPEStreamingDetokenizer)


THOUGHT = "<think>Let me think about France.</think>The capital is Paris."


async def test_reasoning_goes_to_reasoning_content_whole_and_streamed():
    backend = ScriptedBackend([])
    backend.tokenizer = thinking_tokenizer()
    assert backend.tokenizer.has_thinking
    backend.tokens = backend.tokenizer.encode(THOUGHT, add_special_tokens=False) + [
        min(backend.tokenizer.eos_token_ids)]
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
        message = (await r.json())["choices"][0]["message"]
        assert message["reasoning_content"] == "Let me think about France."
        assert message["content"] == "The capital is Paris."
        r = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        deltas = [e["choices"][0]["delta"] for e in events(await r.text()) if e != "[DONE]"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think about France."
    assert "".join(d.get("content", "") for d in deltas) == "The capital is Paris."


async def test_a_template_that_opens_the_think_block_starts_in_reasoning():
    """DeepSeek-R1-style templates end the prompt with <think>: the completion starts inside it."""
    from tests.unit.gateway.test_textout import CHATML

    backend = ScriptedBackend([])
    backend.tokenizer = thinking_tokenizer()
    backend.tokenizer._tokenizer.chat_template = CHATML.replace(
        "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n")
    backend.tokens = backend.tokenizer.encode(THOUGHT.removeprefix("<think>"), add_special_tokens=False) + [
        min(backend.tokenizer.eos_token_ids)]
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
        message = (await r.json())["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me think about France."
    assert message["content"] == "The capital is Paris."
