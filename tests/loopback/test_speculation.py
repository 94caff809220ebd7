"""Speculation on a real 3-node ring (issue 23): a code edit, whose answer mostly repeats its
prompt, is drafted by prompt lookup, verified through every stage, and answers exactly what
single-process mlx-lm answers with plain greedy decoding; a sampled request runs through it too."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from pathlib import Path

import openai

from tests.loopback import faults
from tests.loopback.conftest import Reference
from zmqinfer import local
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


def same_as_plain(out: str, ref: list[int], gaps: list[float], reference: Reference) -> None:
    """`out` is plain greedy's text for `ref`, but for a near-tie that float rounding of a wider
    forward may flip."""
    want = reference.text(ref)
    if out != want:
        k = next(i for i in range(1, len(ref) + 1) if not out.startswith(reference.text(ref[:i])))
        assert gaps[k - 1] < 1e-3, f"differs from token {k - 1}: {out!r} != {want!r}"


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
    out = r.choices[0].message.content or ""
    same_as_plain(out, ref, gaps, reference)
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


def test_kill_9_mid_speculation_replays_to_the_same_tokens(reference: Reference, tmp_path: Path) -> None:
    """kill -9 the middle node while a drafted code edit streams: the gateway committed only
    accepted tokens, so the replay on the re-planned ring continues the same plain-greedy text."""
    ref, gaps = reference.greedy_with_margins(reference.chat_ids(EDIT), MAX_TOKENS)
    c = local.start(tmp_path)
    try:
        pid = c.node_pids()["node1"]

        async def kill(streams: list[faults.Stream]) -> None:
            await faults.until_all_have(streams, 24, 120)
            assert spec_counts(c)[1] > 0, "nothing accepted yet: the kill would not be mid-speculation"
            os.kill(pid, signal.SIGKILL)

        stream, = asyncio.run(faults.run_streams(c.url, [EDIT], 240, max_tokens=MAX_TOKENS, during=kill))
        assert stream.error is None and not stream.hung and stream.finish_reason is not None
        same_as_plain(stream.text, ref, gaps, reference)
        assert c.status()["ring"]["replayed_requests"] >= 1
    finally:
        local.stop(c)
