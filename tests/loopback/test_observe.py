"""Observability on a real ring (3 node processes + the gateway on loopback, the embedded model):

* /metrics, read with prometheus-client's own parser after real traffic from the `openai`
  client: the counters move by exactly what the responses reported, and every node has its
  gauges, gathered from its heartbeats.
* `zmqinfer top` in a real terminal (tmux): a row per node matching /cluster/status; `q` and
  Ctrl-C leave with status 0 and the terminal as it was.
* The status page and the chat rendered by headless Chromium: every node in the DOM, a streamed
  answer in the chat (screenshots saved next to the test's tmp files).

Traffic is kept small (a few requests of a few tokens): the machine is shared.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.loopback import browser
from zmqinfer.local import LocalCluster
from zmqinfer.node.accelerator import platform_probe

QUESTION = "What is the capital of France?"
MODEL = "smollm2-135m"


def scrape(c: LocalCluster) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(c.url + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(m: dict, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def req(name: str) -> dict[str, str]:
    return {"model_name": MODEL} | ({"finished_reason": name} if name else {})


def wait(what: str, ok, timeout: float = 20.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        got = ok()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout:.0f}s")
        time.sleep(every)


def ring_nodes(st: dict) -> list[dict]:
    return [n for n in st["nodes"] if n["layers"]]


def test_metrics_count_what_the_responses_reported(cluster: LocalCluster) -> None:
    # Every node has beaten with its usage and been pinged once (hop latency) before we start.
    wait("hop latencies measured", lambda: all(n["hop_latency_s"] for n in ring_nodes(cluster.status())))
    before, st0 = scrape(cluster), cluster.status()
    oc = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    a = oc.chat.completions.create(model="x", messages=messages, max_tokens=4, temperature=0)
    b = oc.chat.completions.create(model="x", messages=messages, max_tokens=12, temperature=0,
                                   stop=[" capital"])
    chunks = list(oc.chat.completions.create(model="x", messages=messages, max_tokens=3, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    usages = [a.usage, b.usage, chunks[-1].usage]
    reasons = collections.Counter([a.choices[0].finish_reason, b.choices[0].finish_reason,
                                   *(ch.choices[0].finish_reason for ch in chunks
                                     if ch.choices and ch.choices[0].finish_reason)])
    assert sum(reasons.values()) == 3
    prompt = sum(u.prompt_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    # The handler's `finally` (where a request is counted) may run just after its last byte.
    after = wait("every request counted", lambda: (m := scrape(cluster)) and
                 get(m, "zmqinfer_e2e_request_latency_seconds_count", **req(""))
                 - get(before, "zmqinfer_e2e_request_latency_seconds_count", **req("")) >= 3 and m)
    assert delta("zmqinfer_prompt_tokens_total", **req("")) == prompt
    assert delta("zmqinfer_generation_tokens_total", **req("")) == generated
    for reason in ("stop", "length", "abort"):
        assert delta("zmqinfer_request_success_total", **req(reason)) == reasons.get(reason, 0), reason
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"zmqinfer_{hist}_count", **req("")) == 3, hist
    assert delta("zmqinfer_inter_token_latency_seconds_count", **req("")) == generated - 3
    assert delta("zmqinfer_request_prompt_tokens_sum", **req("")) == prompt
    assert get(after, "zmqinfer_num_requests_running", **req("")) == 0
    assert get(after, "zmqinfer_num_requests_waiting", **req("")) == 0
    assert get(after, "zmqinfer_ring_ready") == 1 and get(after, "zmqinfer_ring_epoch") == st0["epoch"]

    # Every stage computed every prompt token but the last (prefill) and those a cached prefix
    # held (the prefix cache), and one step per generated token; a stop string may leave one
    # more step per request in flight. Beats lag up to ~1 s.
    rows = sum(u.prompt_tokens - 1 - _cached(u) + u.completion_tokens for u in usages)
    tokens0 = {n["name"]: n["tokens"] for n in ring_nodes(st0)}
    st = wait("every node's beat to count the traffic",
              lambda: (s := cluster.status()) and all(n["tokens"] - tokens0[n["name"]] >= rows
                                                      for n in ring_nodes(s)) and s)
    m = scrape(cluster)
    gpu_here = platform_probe() is not None
    for n in ring_nodes(st):
        name = n["name"]
        assert rows <= n["tokens"] - tokens0[name] <= rows + 3, name
        assert get(m, "zmqinfer_node_up", node=name) == 1
        assert get(m, "zmqinfer_node_layers", node=name) == n["layers"][1] - n["layers"][0] == n["layers_held"]
        assert get(m, "zmqinfer_node_tokens_total", node=name) >= tokens0[name] + rows
        assert get(m, "zmqinfer_node_steps_total", node=name) > 0
        assert get(m, "zmqinfer_node_busy_seconds_total", node=name) > 0
        assert get(m, "zmqinfer_node_resident_memory_bytes", node=name) > n["shard_bytes"] > 0
        assert get(m, "zmqinfer_node_hop_latency_seconds", node=name) > 0
        for series in ("busy_ratio", "kv_cache_bytes", "sequences", "shard_bytes", "heartbeat_age_seconds",
                       "memory_free_bytes", "stale_epoch_drops_total"):
            assert ("zmqinfer_node_" + series, frozenset({("node", name)})) in m, series
        # A platform without a reading (Linux on CPU) reports none, rather than 0%.
        has_gpu = ("zmqinfer_node_gpu_utilization_ratio", frozenset({("node", name)})) in m
        assert has_gpu == gpu_here == (n["gpu_utilization"] is not None)


def test_status_json_and_cluster_status_are_the_documented_structure(cluster: LocalCluster) -> None:
    """`zmqinfer status --json` prints /cluster/status as is, and the gateway fills every field
    clusterstatus.py documents (the TypedDicts are the schema)."""
    import json

    from zmqinfer.clusterstatus import (
        ClusterStatus,
        NodeStatus,
        RingCounters,
        Throughput,
    )

    r = subprocess.run([sys.executable, "-m", "zmqinfer", "status", "--json", "--url", cluster.url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cli, http = json.loads(r.stdout), cluster.status()
    for doc in (cli, http):
        assert set(doc) == ClusterStatus.__required_keys__ | ClusterStatus.__optional_keys__
        assert set(doc["ring"]) == RingCounters.__required_keys__
        assert set(doc["throughput"]) == Throughput.__required_keys__
        fields = NodeStatus.__required_keys__ | NodeStatus.__optional_keys__
        for n in doc["nodes"]:
            # `excluded` is NotRequired (Python 3.11 cannot tell so under postponed annotations).
            assert fields - {"excluded"} <= set(n) <= fields
    assert [n["name"] for n in cli["nodes"]] == [n["name"] for n in http["nodes"]]
    assert {k: cli[k] for k in ("model", "n_layers", "epoch", "ready")} == \
        {k: http[k] for k in ("model", "n_layers", "epoch", "ready")}


# ---- zmqinfer top in a real terminal ---------------------------------------------------------

TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (.ci/run installs it)")


class Terminal:
    """A detached tmux session running one shell command, read with capture-pane. Its own tmux
    server (-L): other people's sessions on this machine are never touched."""

    def __init__(self, command: str, width: int = 180, height: int = 40) -> None:
        self.socket = f"zq-top-{os.getpid()}-{time.monotonic_ns()}"
        # COLUMNS/LINES from the test's environment would override the terminal's real size.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self._tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), command, env=env)

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        return subprocess.run([str(TMUX), "-L", self.socket, *args], capture_output=True, text=True,
                              timeout=10, check=True, env=env).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "top", *keys)

    def alternate_screen(self) -> bool:
        return self._tmux("display", "-p", "-t", "top", "#{alternate_on}").strip() == "1"

    def close(self) -> None:
        subprocess.run([str(TMUX), "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


def top_command(url: str, out: Path) -> str:
    """top, then (in the same terminal) its exit status and the terminal's mode afterwards. The
    shell traps SIGINT (a handler, so top still gets the default) to outlive a Ctrl-C."""
    top = shlex.join([sys.executable, "-m", "zmqinfer", "top", "--url", url, "--interval", "0.5"])
    return (f"sh -c 'trap : INT; {top}; echo $? > {out}/rc.tmp; stty -a > {out}/stty; "
            f"mv {out}/rc.tmp {out}/rc; sleep 120'")


def left_cleanly(term: Terminal, out: Path) -> None:
    rc = wait("top to exit", lambda: (out / "rc").exists() and (out / "rc").read_text(), timeout=15)
    assert rc.strip() == "0"
    modes = set((out / "stty").read_text().split())
    assert {"icanon", "echo"} <= modes and not {"-icanon", "-echo"} & modes  # cooked mode again
    assert not term.alternate_screen()  # back on the shell's own screen


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("│")[1:-1]]


@needs_tmux
def test_top_shows_every_node_and_q_leaves_the_terminal_clean(cluster: LocalCluster, tmp_path: Path) -> None:
    term = Terminal(top_command(cluster.url, tmp_path))
    try:
        names = [n["name"] for n in cluster.status()["nodes"]]
        screen = wait("a row per node", lambda: (s := term.screen()) and "ready" in s
                      and all(re.search(rf"^│ {re.escape(n)} ", s, re.M) for n in names) and s, timeout=30)
        st = cluster.status()
        header = ["node", "layers", "health", "busy", "GPU", "rss", "accel", "KV", "tok/s", "step", "hop"]
        assert cells(next(line for line in screen.splitlines() if line.startswith("┃")).replace("┃", "│")) == header
        rows = {cells(line)[0]: cells(line) for line in screen.splitlines() if line.startswith("│ ")}
        for n in st["nodes"]:
            row = dict(zip(header, rows[n["name"]]))
            assert row["layers"] == (f"[{n['layers'][0]},{n['layers'][1]})" if n["layers"] else "-")
            assert row["health"] == n["health"]
            assert row["GPU"] == ("n/a" if n["gpu_utilization"] is None else f"{100 * n['gpu_utilization']:.0f}%")
            assert row["accel"] == ("n/a" if n["accel_memory_bytes"] is None else f"{n['accel_memory_bytes'] / 2**20:.0f} MiB")
            assert re.fullmatch(r"[█░]{10} +\d+%", row["busy"]) and row["rss"].endswith(" MiB")
            assert row["hop"].endswith(" ms")  # measured for every live node
        assert f"epoch {st['epoch']}" in screen and "tok/s generated" in screen
        term.keys("q")
        left_cleanly(term, tmp_path)
    finally:
        term.close()


@needs_tmux
def test_top_without_a_gateway_says_so_and_ctrl_c_leaves_clean(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    term = Terminal(top_command(f"http://127.0.0.1:{port}", tmp_path))
    try:
        screen = wait("the gateway named as unreachable", lambda: (s := term.screen())
                      and "gateway unreachable" in s and s, timeout=30)
        assert f"no gateway at http://127.0.0.1:{port}" in screen and "Traceback" not in screen
        term.keys("C-c")
        left_cleanly(term, tmp_path)
    finally:
        term.close()


# ---- the status page and the chat in Chromium ------------------------------------------------

needs_chromium = pytest.mark.skipif(browser.CHROMIUM is None,
                                    reason="chromium is not installed (.ci/run installs it)")


@needs_chromium
async def test_status_page_shows_every_node_of_the_ring(cluster: LocalCluster, tmp_path: Path) -> None:
    dom = await asyncio.to_thread(browser.dump_dom, cluster.url + "/", tmp_path / "dump-profile")
    st = cluster.status()
    assert 'id="summary" class="summary" data-state="ready"' in dom
    for n in st["nodes"]:
        card = re.search(rf'<article class="node [a-z]+" id="node-{re.escape(n["name"])}".*?</article>', dom, re.S)
        assert card, n["name"]
        assert f'data-health="{n["health"]}"' in card.group(0)
        if n["layers"]:
            assert f"[{n['layers'][0]}, {n['layers'][1]})" in card.group(0)
        assert ('class="gpu absent">n/a<' if n["gpu_utilization"] is None else 'class="gpu">') in card.group(0)
    order = [m.group(1) for m in re.finditer(r'id="node-([^"]+)"', dom)]
    ring = [n["name"] for n in sorted(ring_nodes(st), key=lambda n: n["layers"][0])]
    assert order[:len(ring)] == ring  # drawn in ring order
    # Live: with a request running, the page (refreshing by itself) shows the ring at work.
    oc = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    async with browser.Page(tmp_path / "profile") as page, asyncio.TaskGroup() as tg:
        await page.goto(cluster.url + "/")
        await page.wait_for(f"document.querySelectorAll('article.node').length === {len(st['nodes'])}", 30)
        work = tg.create_task(oc.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Count from one to twenty."}],
            max_tokens=40, temperature=0))
        await page.wait_for("document.getElementById('toks').textContent !== '0.0 tok/s' && "
                            "[...document.querySelectorAll('.busy')].some(b => b.textContent !== '0%')", 60)
        shot = await page.screenshot(tmp_path / "observe-status.png")
        await work
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")


@needs_chromium
async def test_chat_streams_an_answer(cluster: LocalCluster, tmp_path: Path) -> None:
    oc = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    expected = await oc.chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=8, temperature=0)
    query = urllib.parse.urlencode({"q": QUESTION, "max_tokens": 8, "temperature": 0})
    async with browser.Page(tmp_path / "profile") as page:
        await page.goto(f"{cluster.url}/chat?{query}")
        state = await page.wait_for(
            "(a => a && a.dataset.state !== 'streaming' && a.dataset.state)(document.querySelector('.msg.assistant'))",
            timeout=90)
        answer = await page.evaluate("document.querySelector('.msg.assistant .text').textContent")
        chunks = await page.evaluate("Number(document.querySelector('.msg.assistant').dataset.chunks)")
        shot = await page.screenshot(tmp_path / "observe-chat.png")
    assert state == "done"
    # Greedy: the page's streamed answer is the API's answer, and it came in pieces.
    assert answer == expected.choices[0].message.content and answer
    assert chunks > 1
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")


def _cached(usage) -> int:
    """Prompt tokens a cached prefix supplied (issue 22): no stage computed them again."""
    details = usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details is not None else 0
