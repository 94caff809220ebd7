"""The prefix cache on a real 3-node ring (issue 22): a conversation's second turn starts from
the first turn's cached KV on every stage, sends only the rest down the ring, and answers
exactly what single-process mlx-lm answers the whole prompt with, cold (the cache off)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import openai

from tests.loopback.conftest import Reference
from zmqinfer import local
from zmqinfer.local import LocalCluster as Cluster

SYSTEM = ("You are a terse assistant for a ship's navigator. Answer in one or two sentences, "
          "name units, and never apologise. Today the ship sails from Lisbon to Madeira.")
TURNS = ["How far is Madeira from Lisbon?", "And how long does that take at twelve knots?"]
MAX_TOKENS = 24


def scrape(c: Cluster) -> str:
    with urllib.request.urlopen(c.url + "/metrics", timeout=10) as r:
        return r.read().decode()


def converse(c: Cluster, reference: Reference) -> tuple[list[list[int]], list[tuple[str, int]]]:
    """Both turns on `c`: each turn's prompt tokens, and its answer with its cached tokens. Each
    answer must be what single-process mlx-lm answers the whole prompt with, cold (only a
    near-tie, which float rounding of a differently cut prefill may flip, is let pass)."""
    oc = openai.OpenAI(base_url=c.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}]
    prompts, answers = [], []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        prompt = list(reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        ref, gaps = reference.greedy_with_margins(prompt, MAX_TOKENS)
        r = oc.chat.completions.create(model="default", messages=messages,  # type: ignore[arg-type]
                                       max_tokens=MAX_TOKENS, temperature=0)
        out = r.choices[0].message.content or ""
        want = reference.text(ref)
        if out != want:
            k = next(i for i in range(1, len(ref) + 1) if not out.startswith(reference.text(ref[:i])))
            assert gaps[k - 1] < 1e-3, f"turn {len(prompts) + 1} differs from token {k - 1}: {out!r} != {want!r}"
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        prompts.append(prompt)
        answers.append((out, r.usage.prompt_tokens_details.cached_tokens))  # type: ignore[union-attr]
        messages.append({"role": "assistant", "content": out})
    return prompts, answers


def test_turn_two_hits_the_cache_and_answers_as_with_the_cache_off(
        cluster: Cluster, reference: Reference, tmp_path: Path) -> None:
    prompts, on = converse(cluster, reference)
    # Turn 1 shares nothing past the template's first tokens; turn 2 reuses all of turn 1's
    # prompt (and as much of its reply as re-renders to the same tokens).
    assert on[0][1] == 0
    assert prompts[1][: len(prompts[0])] == prompts[0]
    assert len(prompts[0]) <= on[1][1] <= len(prompts[1]) - 2
    pc = cluster.status()["prefix_cache"]
    assert pc["enabled"] and pc["hits"] >= 1 and pc["entries"] >= 1 and pc["bytes"] > 0
    hits = [ln for ln in scrape(cluster).splitlines() if ln.startswith("zmqinfer_prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 1
    # The same conversation on a ring with the cache off: the same answers, nothing cached.
    off_ring = local.start(tmp_path, extra=["--no-prefix-cache"])
    try:
        _, off = converse(off_ring, reference)
        off_status = off_ring.status()["prefix_cache"]
        assert not off_status["enabled"] and off_status["entries"] == 0 and off_status["lookups"] == 0
    finally:
        local.stop(off_ring)
    assert [text for text, _ in off] == [text for text, _ in on]
    assert [cached for _, cached in off] == [0, 0]


def test_a_hybrid_ring_reuses_whole_turns_and_learns_not_to_ask_for_parts(model_dir: Path, tmp_path: Path) -> None:
    """An SSM state cannot be cut (node/prefixes.py): a hybrid model's stages keep whole
    snapshots. A next turn that starts with all of the last one starts from it; a prompt that
    shares only a part is replayed from position 0 once, after which only whole prefixes are
    asked for. Every answer is single-process mlx-lm's (the families' tiny models have no
    near-ties: their weights are scaled up)."""
    from tests.families import with_tokenizer

    path = with_tokenizer(tmp_path / "hybrid", model_dir, "granitemoehybrid", mamba_d_head=32)
    ref = Reference(path)
    turn1 = ref.chat_ids(TURNS[0])
    reply = ref.greedy(turn1, MAX_TOKENS)
    turn2 = turn1 + reply + ref.chat_ids(TURNS[1])[1:]
    part = turn1[:-4] + ref.chat_ids(SYSTEM)[1:]  # shares all but the last 4 of turn 1's prompt
    c = local.start(tmp_path, extra=["--model", str(path)])
    try:
        oc = openai.OpenAI(base_url=c.url + "/v1", api_key="unused", timeout=120, max_retries=0)

        def ask(prompt: list[int]) -> tuple[str, int]:
            r = oc.completions.create(model="default", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            assert r.choices[0].text == ref.text(ref.greedy(prompt, MAX_TOKENS)), f"prompt of {len(prompt)}"
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens or 0

        assert ask(turn1)[1] == 0
        # Turn 1's caches hold its prompt and all but its last token: kept whole, used whole.
        assert ask(turn2)[1] == len(turn1) + len(reply) - 1
        assert not c.status()["prefix_cache"]["exact"]
        # A part of turn 2's prefix: asked for, but the SSM stage has none to give; replayed from
        # position 0, so none of it counts as cached.
        assert ask(part)[1] == 0
        pc = c.status()["prefix_cache"]
        assert pc["exact"] and pc["enabled"] and pc["hits"] == 2
        assert ask(part)[1] == 0 and c.status()["prefix_cache"]["hits"] == 2  # no part asked again
        turn3 = turn2 + ref.greedy(turn2, MAX_TOKENS) + ref.chat_ids(TURNS[0])[1:]
        assert ask(turn3)[1] > len(turn2)  # whole turns still hit
    finally:
        local.stop(c)
