"""textout: token ids -> text, stop strings, logprobs, with a real byte-level BPE tokenizer.

`load_tokenizer()` (shared with test_requests/test_api) uses the embedded model's converted
tokenizer when `zmqinfer.model.resolve_model()` works, otherwise a small byte-level BPE trained
here with the `tokenizers` package. The tests only state properties that hold for both.
"""

from __future__ import annotations

import functools

import pytest
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from zmqinfer.gateway.textout import (
    Delta,
    TextStream,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
)
from zmqinfer.protocol.wire import Sample, SeqId, TokenLogprob

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.cache
def load_tokenizer() -> TokenizerWrapper:
    try:
        from mlx_lm.tokenizer_utils import load

        from zmqinfer.model.resolve import resolve_model
        return load(resolve_model())
    except Exception:  # model.py not there yet, or no embedded GGUF on this machine
        return _trained_tokenizer()


def _trained_tokenizer() -> TokenizerWrapper:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The capital of France is Paris. Hello world, this is a test. Party time!"] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML)
    return TokenizerWrapper(hf, BPEStreamingDetokenizer)


@pytest.fixture(scope="session")
def tok() -> TokenizerWrapper:
    return load_tokenizer()


def ids(tok: TokenizerWrapper, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def eos(tok: TokenizerWrapper) -> int:
    return min(tok.eos_token_ids)


def sample(token: int, top: tuple[int, ...] = ()) -> Sample:
    return Sample(SeqId(0), token, -0.5, tuple(TokenLogprob(t, -1.0 - i) for i, t in enumerate(top)))


def run(stream: TextStream, tokens: list[int]) -> list[Delta]:
    """Feed tokens until the stream finishes, as the API does; finish() if they run out."""
    deltas = []
    for t in tokens:
        deltas.append(stream.add(sample(t)))
        if deltas[-1].finish_reason:
            return deltas
    deltas.append(stream.finish())
    return deltas


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


TEXT = "Hello world, this is a test."


def test_plain_text_then_eos(tok):
    tokens = ids(tok, TEXT) + [eos(tok)]
    stream = TextStream(tok)
    deltas = run(stream, tokens)
    assert text_of(deltas) == TEXT  # EOS text (<|im_end|>) not shown
    assert deltas[-1].finish_reason == "stop" and stream.finish_reason == "stop"
    assert stream.completion_tokens == len(tokens)  # EOS counted
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_max_tokens_is_length(tok):
    """The scheduler ends the samples at max_tokens (test_scheduler); the stream then finishes."""
    tokens = ids(tok, TEXT)
    stream = TextStream(tok)
    deltas = run(stream, tokens)
    assert text_of(deltas) == TEXT
    assert deltas[-1].finish_reason == "length" and stream.completion_tokens == len(tokens)


def test_samples_ending_early_flush_as_length(tok):
    tokens = ids(tok, "Hello ")  # a trailing space token is held by the detokenizer until finish
    stream = TextStream(tok)
    deltas = run(stream, tokens)
    assert text_of(deltas) == "Hello " and deltas[-1].finish_reason == "length"


def test_leading_space_dropped_for_chat_kept_for_completions(tok):
    tokens = ids(tok, " Paris is")
    assert text_of(run(TextStream(tok), tokens)) == "Paris is"  # as mlx-lm
    stream = TextStream(tok, keep_leading_space=True, logprobs=True)
    deltas = run(stream, tokens)
    assert text_of(deltas) == " Paris is"
    offsets = completion_logprobs([e for d in deltas for e in d.logprobs])["text_offset"]
    assert offsets[0] == 0 and offsets[-1] == len(" Paris is") - len(tok.decode(tokens[-1:]))


def test_add_after_finish_is_a_bug(tok):
    stream = TextStream(tok)
    stream.add(sample(eos(tok)))
    with pytest.raises(RuntimeError):
        stream.add(sample(ids(tok, "a")[0]))


def test_stop_string_across_token_boundaries(tok):
    text = "The capital of France is Paris. Next"
    tokens = ids(tok, text)
    stop = "Paris."
    assert not any(stop in tok.decode([t]) for t in tokens)  # it really spans several tokens
    stream = TextStream(tok, stop=(stop,))
    deltas = run(stream, tokens)
    assert text_of(deltas) == "The capital of France is "
    assert deltas[-1].finish_reason == "stop"
    # The token that completed the stop string is counted; the ones after it were never fed.
    n = next(i for i in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:i]))
    assert stream.completion_tokens == n < len(tokens)


def test_possible_stop_prefix_is_held_back_then_released(tok):
    text = "The capital is Paris, yes"
    tokens = ids(tok, text)
    stream = TextStream(tok, stop=("Paris.",))
    emitted = ""
    for i, t in enumerate(tokens):
        emitted += stream.add(sample(t)).text
        decoded = tok.decode(tokens[: i + 1])
        if decoded.endswith("Paris"):
            assert emitted == "The capital is "  # "Paris" may still become "Paris."
    emitted += stream.finish().text
    assert emitted == text


def test_earliest_of_several_stops_wins(tok):
    stream = TextStream(tok, stop=("test", "world"))
    deltas = run(stream, ids(tok, TEXT))
    assert text_of(deltas) == "Hello " and deltas[-1].finish_reason == "stop"


def test_stop_string_at_the_very_start_returns_nothing(tok):
    deltas = run(TextStream(tok, stop=("Hello",)), ids(tok, TEXT))
    assert text_of(deltas) == "" and deltas[-1].finish_reason == "stop"


def test_multibyte_character_split_over_tokens_is_never_cut(tok):
    text = "Party 🎉 time"
    tokens = ids(tok, text)
    emoji = ids(tok, "🎉")
    assert len(emoji) > 1  # byte-level BPE: the emoji's 4 bytes are several tokens
    deltas = run(TextStream(tok), tokens)
    assert text_of(deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert any("🎉" in d.text for d in deltas)


def test_stop_string_that_is_a_multibyte_character(tok):
    deltas = run(TextStream(tok, stop=("🎉",)), ids(tok, "Party 🎉 time"))
    assert text_of(deltas) == "Party " and deltas[-1].finish_reason == "stop"


def test_concurrent_streams_do_not_share_detokenizer_state(tok):
    a, b = ids(tok, "Hello world"), ids(tok, "Paris 🎉")
    sa, sb = TextStream(tok), TextStream(tok)
    out_a = out_b = ""
    for i in range(max(len(a), len(b))):
        if i < len(a):
            out_a += sa.add(sample(a[i])).text
        if i < len(b):
            out_b += sb.add(sample(b[i])).text
    out_a += sa.finish().text
    out_b += sb.finish().text
    assert (out_a, out_b) == ("Hello world", "Paris 🎉")


# ---- logprobs ---------------------------------------------------------------------------------


def test_token_texts_give_exact_bytes(tok):
    texts = TokenTexts(tok)
    emoji = ids(tok, "🎉")
    assert b"".join(texts(t).bytes for t in emoji) == "🎉".encode()
    assert "\\x" in texts(emoji[0]).text  # a partial character shows its bytes escaped
    word = ids(tok, "Hello")
    assert "".join(texts(t).text for t in word) == "Hello"
    assert texts(eos(tok)).text == tok.decode([eos(tok)])


def test_logprob_entries_cover_the_returned_text(tok):
    text = "Hello 🎉 world"
    tokens = ids(tok, text) + [eos(tok)]
    stream = TextStream(tok, logprobs=True)
    deltas = [stream.add(Sample(SeqId(0), t, -0.25, (TokenLogprob(t, -0.25), TokenLogprob(0, -3.0))))
              for t in tokens]
    entries = [e for d in deltas for e in d.logprobs]
    assert len(entries) == len(tokens) - 1  # no entry for EOS
    assert b"".join(e.token.bytes for e in entries) == text.encode()

    chat = chat_logprobs(entries)["content"]
    assert set(chat[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert chat[0]["logprob"] == -0.25 and chat[0]["bytes"] == list(entries[0].token.bytes)
    assert [t["logprob"] for t in chat[0]["top_logprobs"]] == [-0.25, -3.0]
    assert set(chat[0]["top_logprobs"][1]) == {"token", "logprob", "bytes"}

    legacy = completion_logprobs(entries)
    assert set(legacy) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert legacy["tokens"] == [e.token.text for e in entries]
    assert legacy["token_logprobs"] == [-0.25] * len(entries)
    assert legacy["top_logprobs"][0][entries[0].token.text] == -0.25  # sampled token included
    assert legacy["text_offset"][0] == 0
    assert legacy["text_offset"] == sorted(legacy["text_offset"])
    assert legacy["text_offset"][-1] == len(text) - len(entries[-1].token.text)  # ASCII tail


def test_logprob_entries_are_held_with_their_text(tok):
    tokens = ids(tok, "The capital is Paris, yes")
    stream = TextStream(tok, stop=("Paris.",), logprobs=True)
    for i, t in enumerate(tokens):
        delta = stream.add(sample(t))
        released = b"".join(e.token.bytes for e in delta.logprobs)
        if tok.decode(tokens[: i + 1]).endswith("Paris"):
            assert b"Paris" not in released


def test_stop_cut_drops_entries_of_unreturned_tokens(tok):
    tokens = ids(tok, "Hello world again")
    stream = TextStream(tok, stop=(" world",), logprobs=True)
    deltas = run(stream, tokens)
    entries = [e for d in deltas for e in d.logprobs]
    assert text_of(deltas) == "Hello"
    assert b"".join(e.token.bytes for e in entries) == b"Hello"


def test_no_logprobs_unless_asked(tok):
    deltas = run(TextStream(tok), ids(tok, TEXT))
    assert all(d.logprobs == () for d in deltas)
