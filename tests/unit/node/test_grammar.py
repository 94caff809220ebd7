"""Grammar-constrained sampling on the last stage, through the real Worker, on a tiny random
model that speaks the embedded model's tokenizer: a model that does not "want" to write JSON.
Seeded random JSON schemas always give output that parses and validates; a replay (the prompt
and the tokens so far prefilled anew, as after a failover) continues exactly as the
uninterrupted sequence; a request without a grammar samples as before."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from jsonschema import Draft202012Validator
from llguidance import LLMatcher

from tests.tiny import with_real_tokenizer
from zmqinfer.node.loading import load_shard
from zmqinfer.node.worker import Worker
from zmqinfer.protocol.codec import tokens_to_wire
from zmqinfer.protocol.wire import NO_GROUP, Chunk, Epoch, Forward, Sampled, SamplingParams, SeqId

OPTIONS: Any = {"whitespace_flexible": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zmqinfer.model.resolve import resolve_model

    return with_real_tokenizer(tmp_path_factory.mktemp("tiny"), resolve_model(None), n_layers=2)


@pytest.fixture(scope="module")
def worker(model: Path) -> Worker:
    w = Worker()
    w.install(load_shard(str(model), 0, 2))
    assert w.grammar_tokenizer is not None
    return w


@pytest.fixture(scope="module")
def tok(model: Path):
    from mlx_lm.tokenizer_utils import load

    return load(model)


def run(w: Worker, seq: int, tokens: list[int], params: SamplingParams, new: int) -> list[int]:
    """Prefill all but the last of `tokens`, then decode up to `new` tokens (EOS ends it)."""
    sid, eos = SeqId(seq), w.grammar_tokenizer.eos_tokens  # type: ignore[attr-defined]
    pos = len(tokens) - 1
    if pos:
        _, failures = w.run(Forward(Epoch(1), 0, (Chunk(sid, 0, pos, False, params),), NO_GROUP,
                                    tokens_to_wire(tokens[:-1])))
        assert not failures
    out, last = [], tokens[-1]
    for step in range(new):
        chunk = Chunk(sid, pos, 1, True, params if pos == 0 else None)
        msg, failures = w.run(Forward(Epoch(1), step + 1, (chunk,), 0, tokens_to_wire([last])))
        assert not failures and isinstance(msg, Sampled)
        last, pos = msg.samples[0].token, pos + 1
        out.append(last)
        if last in eos:
            break
    w.release((sid,))
    return out


def random_schema(r: random.Random, depth: int = 0) -> dict[str, Any]:
    """Bounded schemas (strings, arrays and depth capped) so a complete answer fits the budget."""
    kinds = ["integer", "boolean", "enum", "string", "array"] + (["object"] if depth < 2 else [])
    kind = r.choice(kinds) if depth else "object"
    if kind == "integer":
        lo = r.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + r.randint(0, 100)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": r.sample(["red", "green", "blue", "x y", "ünï", "1"], r.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "maxLength": r.randint(1, 6)}
    if kind == "array":
        return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "maxItems": r.randint(0, 3)}
    props = {f"k{i}": random_schema(r, depth + 1) for i in range(r.randint(1, 3))}
    return {"type": "object", "properties": props, "required": sorted(props),
            "additionalProperties": False}


PROMPT_TEXT = "Reply with JSON."


@pytest.mark.parametrize("seed", range(50))
def test_random_schemas_always_validate(worker: Worker, tok, seed: int) -> None:
    schema = random_schema(random.Random(seed))
    grammar = LLMatcher.grammar_from_json_schema(schema, defaults=OPTIONS)
    prompt = tok.encode(PROMPT_TEXT)
    params = SamplingParams(temperature=0.0 if seed % 2 else 1.0, seed=seed, grammar=grammar,
                            grammar_start=len(prompt))
    out = run(worker, seed, prompt, params, 200)
    assert out[-1] in tok.eos_token_ids, f"no EOS within 200 tokens for {schema}"
    value = json.loads(tok.decode(out[:-1]))
    Draft202012Validator(schema).validate(value)


def test_a_replay_continues_as_the_uninterrupted_sequence(worker: Worker, tok) -> None:
    schema = random_schema(random.Random(7))
    prompt = tok.encode(PROMPT_TEXT)
    params = SamplingParams(grammar=LLMatcher.grammar_from_json_schema(schema, defaults=OPTIONS),
                            grammar_start=len(prompt))
    whole = run(worker, 100, prompt, params, 200)
    assert len(whole) > 4
    for cut in (1, len(whole) // 2, len(whole) - 1):
        # prompt + the first `cut` generated tokens prefilled anew: the matcher is rebuilt from them
        rest = run(worker, 200 + cut, prompt + whole[:cut], params, 200)
        assert whole[:cut] + rest == whole


def test_without_a_grammar_the_samples_are_unconstrained(worker: Worker, tok) -> None:
    """The tiny random model, left alone, does not write JSON: the grammar is what made it."""
    prompt = tok.encode(PROMPT_TEXT)
    free = run(worker, 300, prompt, SamplingParams(), 30)
    with pytest.raises(ValueError):
        json.loads(tok.decode([t for t in free if t not in tok.eos_token_ids]))


@pytest.mark.parametrize("seed", range(10))
def test_required_tool_calls_with_random_tools_always_validate(worker: Worker, tok, seed: int) -> None:
    """The gateway's grammar for tool_choice "required" (generic Hermes format), forced on the
    random model, parsed back by the gateway's splitter: always one valid call."""
    from zmqinfer.gateway.api.validate import parse_chat
    from zmqinfer.gateway.grammar import grammar_for
    from zmqinfer.gateway.markup import Splitter
    from zmqinfer.gateway.tools import tool_format

    r = random.Random(seed)
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": random_schema(r)}}
             for i in range(r.randint(1, 3))]
    named = r.random() < 0.5
    choice: Any = {"type": "function", "function": {"name": "tool_0"}} if named else "required"
    req = parse_chat({"messages": [{"role": "user", "content": "Go"}], "tools": tools,
                      "tool_choice": choice})
    fmt = tool_format(tok)
    assert fmt.kind == "generic"
    prompt = tok.encode(PROMPT_TEXT)
    params = SamplingParams(temperature=1.0, seed=seed, grammar_start=len(prompt),
                            grammar=grammar_for(req, fmt.kind, fmt.start, fmt.end, fmt.hermes))
    out = run(worker, 400 + seed, prompt, params, 300)
    assert out[-1] in tok.eos_token_ids
    content, _, calls = Splitter(fmt, req.tools).feed(tok.decode(out[:-1]), final=True)
    assert content == "" and len(calls) == 2 and calls[0].name is not None  # id+name, then args
    assert not named or calls[0].name == "tool_0"
    schema = next(t.parameters for t in req.tools if t.name == calls[0].name)
    Draft202012Validator(schema).validate(json.loads(calls[1].arguments))


def test_one_matcher_per_sequence_in_a_batched_decode_group(worker: Worker, tok) -> None:
    """Three sequences decoded together in one group, two with different grammars and one free:
    each follows its own (the matcher lives with each sequence's sampler)."""
    schemas = [random_schema(random.Random(s)) for s in (3, 4)]
    prompt = tok.encode(PROMPT_TEXT)
    seqs = [SeqId(500), SeqId(501), SeqId(502)]
    params = [SamplingParams(grammar=LLMatcher.grammar_from_json_schema(s, defaults=OPTIONS),
                             grammar_start=len(prompt)) for s in schemas] + [SamplingParams()]
    for sid, p in zip(seqs, params):
        _, failures = worker.run(Forward(Epoch(1), 0, (Chunk(sid, 0, len(prompt) - 1, False, p),),
                                         NO_GROUP, tokens_to_wire(prompt[:-1])))
        assert not failures
    eos = set(tok.eos_token_ids)
    live = {sid: [prompt[-1]] for sid in seqs}  # each sequence's tokens since the prompt's last
    pos = len(prompt) - 1
    for step in range(200):
        running = [s for s in seqs if not (len(live[s]) > 1 and live[s][-1] in eos)]
        if not running:
            break
        chunks = tuple(Chunk(s, pos + len(live[s]) - 1, 1, True) for s in running)
        msg, failures = worker.run(Forward(Epoch(1), step + 1, chunks, 7,
                                           tokens_to_wire([live[s][-1] for s in running])))
        assert not failures and isinstance(msg, Sampled) and len(msg.samples) == len(running)
        for sample in msg.samples:
            live[sample.seq].append(sample.token)
    worker.release(tuple(seqs))
    for sid, schema in zip(seqs, schemas):
        out = live[sid][1:]
        assert out[-1] in eos
        Draft202012Validator(schema).validate(json.loads(tok.decode(out[:-1])))
    free = [t for t in live[seqs[2]][1:] if t not in eos]
    with pytest.raises(ValueError):
        json.loads(tok.decode(free))


def test_after_a_reasoning_marker_the_grammar_starts(worker: Worker, tok) -> None:
    """A prompt that opened a think block: nothing is masked until the end marker has been
    generated, then the grammar holds; fed all at once (a replay), the state is the same."""
    from zmqinfer.node.grammar import Matcher

    grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=OPTIONS)
    prompt = tok.encode(PROMPT_TEXT)
    marker = tok.encode("</think>", add_special_tokens=False)
    thoughts = tok.encode("Hmm, let me think {not json", add_special_tokens=False)
    logits = mx.zeros((1, worker.grammar_tokenizer.vocab_size))  # type: ignore[attr-defined]
    m = Matcher(worker.grammar_tokenizer, grammar, len(prompt), tuple(marker))
    m.observe(prompt)
    for t in thoughts + marker[:-1]:
        assert not m.active and bool(mx.all(m.mask(logits) == logits))
        m.observe([t])
    m.observe(marker[-1:])
    assert m.active
    allowed = mx.isfinite(m.mask(logits)[0])
    brace = tok.encode("{", add_special_tokens=False)[0]
    assert bool(allowed[brace]) and int(allowed.sum()) < logits.shape[-1] // 10
    replay = Matcher(worker.grammar_tokenizer, grammar, len(prompt), tuple(marker))
    replay.observe(prompt + thoughts + marker)
    assert replay.active and bool(mx.all(mx.isfinite(replay.mask(logits)[0]) == allowed))


def test_a_model_that_may_open_its_reasoning_first(worker: Worker, tok) -> None:
    """With an opener (Qwen3's <think> token): the first position allows it beside the grammar's
    own; taken, the grammar waits for the end marker; not taken, the grammar holds at once."""
    from zmqinfer.node.grammar import Matcher

    grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=OPTIONS)
    prompt = tok.encode(PROMPT_TEXT)
    marker = tuple(tok.encode("</think>", add_special_tokens=False))
    opener = tok.encode("Hmm", add_special_tokens=False)[0]  # stands for a one-token <think>
    brace = tok.encode("{", add_special_tokens=False)[0]
    logits = mx.zeros((1, worker.grammar_tokenizer.vocab_size))  # type: ignore[attr-defined]

    def allowed(m: Matcher) -> mx.array:
        return mx.isfinite(m.mask(logits)[0])

    thinks = Matcher(worker.grammar_tokenizer, grammar, len(prompt), marker, opener)
    thinks.observe(prompt)
    first = allowed(thinks)
    assert bool(first[opener]) and bool(first[brace]) and int(first.sum()) < logits.shape[-1] // 10
    thinks.observe([opener, *tok.encode(" so [1, 2", add_special_tokens=False)])
    assert not thinks.active and bool(allowed(thinks).all())
    thinks.observe(list(marker))
    assert thinks.active and bool(allowed(thinks)[brace]) and not bool(allowed(thinks)[opener])

    direct = Matcher(worker.grammar_tokenizer, grammar, len(prompt), marker, opener)
    direct.observe(prompt + [brace])
    assert direct.active and not bool(allowed(direct)[opener])
