"""The prefix cache on a real 3-node ring (issue 22): a conversation's second turn starts from
the first turn's cached KV on every stage, sends only the rest down the ring, and answers
exactly what single-process mlx-lm answers the whole prompt with, cold (the cache off)."""

from __future__ import annotations

import urllib.request

import openai

from tests.loopback.conftest import Reference
from zmqinfer.local import LocalCluster as Cluster

SYSTEM = ("You are a terse assistant for a ship's navigator. Answer in one or two sentences, "
          "name units, and never apologise. Today the ship sails from Lisbon to Madeira.")
TURNS = ["How far is Madeira from Lisbon?", "And how long does that take at twelve knots?"]
MAX_TOKENS = 24


def scrape(c: Cluster) -> str:
    with urllib.request.urlopen(c.url + "/metrics", timeout=10) as r:
        return r.read().decode()


def test_turn_two_hits_the_cache_and_equals_a_cold_mlx_lm_run(cluster: Cluster, reference: Reference) -> None:
    oc = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}]
    prompts, answers = [], []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        prompt = list(reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        ref, gaps = reference.greedy_with_margins(prompt, MAX_TOKENS)  # cold: no cache at all
        r = oc.chat.completions.create(model="default", messages=messages,  # type: ignore[arg-type]
                                       max_tokens=MAX_TOKENS, temperature=0)
        out = r.choices[0].message.content or ""
        want = reference.text(ref)
        if out != want:  # only a near-tie (float rounding of a differently cut prefill) may flip
            k = next(i for i in range(1, len(ref) + 1) if not out.startswith(reference.text(ref[:i])))
            assert gaps[k - 1] < 1e-3, f"turn {len(prompts) + 1} differs from token {k - 1}: {out!r} != {want!r}"
        assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
        prompts.append(prompt)
        answers.append((out, r.usage.prompt_tokens_details.cached_tokens))  # type: ignore[union-attr]
        messages.append({"role": "assistant", "content": out})
    # Turn 1 shares nothing past the template's first tokens; turn 2 reuses all of turn 1's
    # prompt (and as much of its reply as re-renders to the same tokens).
    assert answers[0][1] == 0
    assert prompts[1][: len(prompts[0])] == prompts[0]
    assert len(prompts[0]) <= answers[1][1] <= len(prompts[1]) - 2
    text = scrape(cluster)
    hits = [ln for ln in text.splitlines() if ln.startswith("zmqinfer_prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 1
