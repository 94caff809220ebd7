"""What the shared ring cannot show, on one small ring of its own (2 nodes, a tiny random model
that speaks the embedded model's tokenizer plus `<think>` markers): API keys on, and reasoning.

* Keys: Anthropic's client sends its key as `x-api-key`; the right one is served, a wrong one
  gets Anthropic's 401 (`authentication_error`), as the OpenAI and Ollama clients get theirs.
* Reasoning: the model's template opens a think block unless `enable_thinking` is false (as
  R1-style templates do), so with thinking on every dialect must hand the completion back as
  reasoning (an Anthropic `thinking` block, a Responses `reasoning` item, Ollama's
  `message.thinking`), equal to the chat route's `reasoning_content`, and with thinking off as
  plain text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from tests.tiny import make_tiny_model, speak_tokenizer
from zmqinfer import local
from zmqinfer.local import LocalCluster

KEY = "sk-dialects-0123456789abcdef"
WRONG = "sk-wrong-0123456789abcdefgh"
THINK = ("<think>", "</think>")
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12
TIMEOUT_S = 60
# The embedded template, with a generation prompt that opens the think block unless told not to.
OPENS_THINKING = ("{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                  "{% if enable_thinking is not defined or enable_thinking %}{{ '<think>\\n' }}{% endif %}"
                  "{% endif %}")


def thinking_model(dest: Path, model_dir: Path) -> Path:
    """A tiny random llama with the embedded tokenizer, two more tokens (`<think>`, `</think>`:
    mlx-lm's wrapper then reports has_thinking) and a template that opens the block."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    made = speak_tokenizer(make_tiny_model(dest, "llama", vocab=vocab + len(THINK), n_layers=4, hidden=64),
                           model_dir)
    tokenizer = json.loads((made / "tokenizer.json").read_text())
    tokenizer["added_tokens"] += [{"id": vocab + i, "content": t, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": False}
                                  for i, t in enumerate(THINK)]
    (made / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((made / "tokenizer_config.json").read_text())
    template = config["chat_template"]
    config["chat_template"] = template[:template.index("{% if add_generation_prompt %}")] + OPENS_THINKING
    (made / "tokenizer_config.json").write_text(json.dumps(config))
    return made


@pytest.fixture(scope="module")
def ring(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("keyed")
    model = thinking_model(tmp / "model", model_dir)
    c = local.start(tmp, nodes=2, extra=["--model", str(model)], api_key=KEY)
    try:
        yield c
    finally:
        local.stop(c)


def test_x_api_key_is_checked_and_a_wrong_one_gets_anthropics_401(ring: LocalCluster) -> None:
    def client(key: str) -> anthropic.Anthropic:  # the SDK sends the key as x-api-key
        return anthropic.Anthropic(base_url=ring.url, api_key=key, timeout=TIMEOUT_S, max_retries=0)

    m = client(KEY).messages.create(model="claude-sonnet-4-5", max_tokens=MAX_TOKENS,
                                    messages=PROMPT, extra_body={"temperature": 0})  # type: ignore[arg-type]
    assert m.usage.output_tokens > 0 and m.stop_reason in ("end_turn", "max_tokens")
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(WRONG).messages.create(model="claude-sonnet-4-5", max_tokens=MAX_TOKENS,
                                      messages=PROMPT)  # type: ignore[arg-type]
    assert e.value.status_code == 401
    assert e.value.body == {"type": "error", "error": {  # type: ignore[comparison-overlap]
        "type": "authentication_error", "message": e.value.body["error"]["message"]}}  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        client(WRONG).messages.count_tokens(model="claude-sonnet-4-5", messages=PROMPT)  # type: ignore[arg-type]
    # The other dialects' clients, with the key and without it.
    oc = openai.OpenAI(base_url=ring.url + "/v1", api_key=WRONG, timeout=TIMEOUT_S, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        oc.responses.create(model="m", input="Hi", max_output_tokens=MAX_TOKENS)
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=ring.url, timeout=TIMEOUT_S).list()
    assert refused.value.status_code == 401
    served = ollama.Client(host=ring.url, timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {KEY}"})
    assert served.list().models


@pytest.fixture(scope="module")
def thought(ring: LocalCluster) -> str:
    """The chat route's greedy reasoning: what every dialect must hand back as its own."""
    oc = openai.OpenAI(base_url=ring.url + "/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)
    r = oc.chat.completions.create(model="m", messages=PROMPT, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                   temperature=0)
    reasoning = getattr(r.choices[0].message, "reasoning_content", None)
    assert reasoning and not r.choices[0].message.content, r.choices[0].message
    return str(reasoning)


def test_anthropic_thinking_blocks(ring: LocalCluster, thought: str) -> None:
    ac = anthropic.Anthropic(base_url=ring.url, api_key=KEY, timeout=TIMEOUT_S, max_retries=0)
    kw = dict(model="claude-sonnet-4-5", max_tokens=MAX_TOKENS, messages=PROMPT, extra_body={"temperature": 0})
    m = ac.messages.create(**kw, thinking={"type": "enabled", "budget_tokens": 1024})  # type: ignore[arg-type]
    assert [b.type for b in m.content] == ["thinking"] and m.content[0].thinking == thought  # type: ignore[union-attr]
    with ac.messages.stream(**kw, thinking={"type": "enabled", "budget_tokens": 1024}) as stream:  # type: ignore[arg-type]
        kinds = {e.delta.type for e in stream if e.type == "content_block_delta"}
        final = stream.get_final_message()
    assert kinds == {"thinking_delta", "signature_delta"}
    assert final.content[0].thinking == thought  # type: ignore[union-attr]
    off = ac.messages.create(**kw, thinking={"type": "disabled"})  # type: ignore[arg-type]
    assert [b.type for b in off.content] == ["text"] and off.content[0].text  # type: ignore[union-attr]


def test_responses_reasoning_items(ring: LocalCluster, thought: str) -> None:
    oc = openai.OpenAI(base_url=ring.url + "/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)
    kw = dict(model="m", input=PROMPT[0]["content"], max_output_tokens=MAX_TOKENS, temperature=0)
    r = oc.responses.create(**kw, reasoning={"effort": "low"})  # type: ignore[call-overload]
    assert [o.type for o in r.output] == ["reasoning"]
    assert r.output[0].content[0].text == thought  # type: ignore[union-attr,index]
    events = list(oc.responses.create(**kw, stream=True))  # type: ignore[call-overload]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
    off = oc.responses.create(**kw, reasoning={"effort": "none"})  # type: ignore[call-overload]
    assert [o.type for o in off.output] == ["message"] and off.output_text


def test_ollama_thinking(ring: LocalCluster, thought: str) -> None:
    oc = ollama.Client(host=ring.url, timeout=TIMEOUT_S, headers={"Authorization": f"Bearer {KEY}"})
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    r = oc.chat(model="m", messages=PROMPT, options=options, think=True)
    assert r.message.thinking == thought and not r.message.content
    streamed = "".join(p.message.thinking or "" for p in oc.chat(model="m", messages=PROMPT, options=options,
                                                                 think=True, stream=True))
    assert streamed == thought
    off = oc.chat(model="m", messages=PROMPT, options=options, think=False)
    assert not off.message.thinking and off.message.content
