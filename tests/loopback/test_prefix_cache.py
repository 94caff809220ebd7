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
