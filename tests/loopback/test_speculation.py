"""Speculation on a real 3-node ring (issue 23): a code edit, whose answer mostly repeats its
prompt, is drafted by prompt lookup, verified through every stage, and answers exactly what
single-process mlx-lm answers with plain greedy decoding; a sampled request runs through it too."""

from __future__ import annotations

import urllib.request

import openai

from tests.loopback.conftest import Reference
from zmqinfer.local import LocalCluster as Cluster

CODE = '''def mean(values):
    """Return the arithmetic mean of a list of numbers."""
    if not values:
        raise ValueError("mean of an empty list")
    total = 0
    for v in values:
        total += v
    return total / len(values)
'''
EDIT = (f"Here is a Python function:\n```python\n{CODE}```\n"
        "Rename the function to `average` and change nothing else. Reply with the code only.")
MAX_TOKENS = 96


def spec_counts(c: Cluster) -> tuple[int, int]:
    sp = c.status()["speculation"]
    return sp["draft_tokens"], sp["accepted_tokens"]


def test_a_code_edit_is_drafted_and_answers_as_plain_greedy(cluster: Cluster, reference: Reference) -> None:
    prompt = reference.chat_ids(EDIT)
    ref, gaps = reference.greedy_with_margins(prompt, MAX_TOKENS)
    drafted0, accepted0 = spec_counts(cluster)
    oc = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=300, max_retries=0)
    r = oc.chat.completions.create(model="default", messages=[{"role": "user", "content": EDIT}],
                                   max_tokens=MAX_TOKENS, temperature=0)
    out, want = r.choices[0].message.content or "", reference.text(ref)
    if out != want:  # only a near-tie, which float rounding of a wider forward may flip, passes
        k = next(i for i in range(1, len(ref) + 1) if not out.startswith(reference.text(ref[:i])))
        assert gaps[k - 1] < 1e-3, f"differs from token {k - 1}: {out!r} != {want!r}"
    assert 'raise ValueError("mean of an empty list")' in out  # it copied code (a 135M model's edit is its own)
    drafted, accepted = spec_counts(cluster)
    assert accepted - accepted0 > MAX_TOKENS // 4, "a copy of the prompt should be drafted and accepted"
    assert drafted - drafted0 >= accepted - accepted0
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as m:
        lines = m.read().decode().splitlines()
    got = [ln for ln in lines if ln.startswith("zmqinfer_spec_decode_num_accepted_tokens_total")]
    assert got and float(got[0].split()[-1]) >= accepted - accepted0
    assert any(ln.startswith("zmqinfer_spec_decode_skipped_steps_total{reason=\"busy\"}") for ln in lines)


def test_a_sampled_request_speculates_and_finishes(cluster: Cluster) -> None:
    drafted0, _ = spec_counts(cluster)
    oc = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=300, max_retries=0)
    r = oc.chat.completions.create(model="default", messages=[{"role": "user", "content": EDIT}],
                                   max_tokens=48, temperature=0.7, seed=5)
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 48
    assert spec_counts(cluster)[0] > drafted0
