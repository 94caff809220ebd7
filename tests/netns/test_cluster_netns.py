"""The issue's proof: a real cluster whose members find each other over real multicast
(network namespaces, root only).

    zq2-h0  10.213.2.1   `zmqinfer gateway`; its nodes.toml lists only n4, by address
    zq2-h1..h3           `zmqinfer node` n1..n3 without --gateway: they find the gateway over
                         mDNS and the gateway finds them the same way
    zq2-m   10.214.2.2   `zmqinfer node` n4 behind a router that stops multicast: started with
                         --gateway and --no-advertise, reached at its nodes.toml address

Every process is the real CLI in its own namespace, and every one has the same host name (the
namespaces share this machine's), as machines cloned from one image do (issue 14: that put all
three mDNS nodes at one address). Each loads the embedded model's converted directory (the
gateway's `model`). Then: `zmqinfer discover` in the gateway's namespace lists n1..n3 (not n4),
each at its own address; the ring becomes ready over all four, each wired to its own address;
a greedy chat completion over HTTP is exactly single-process mlx-lm's answer; and `zmqinfer
status` shows how each node was found.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from zmqinfer.mdns.adverts import server_name

from .hosts import Host, Net, skip_reason

NET_ID = 2  # test_discovery_netns uses 1
API, CONTROL, RESULT, DATA = 8100, 8101, 8102, 8110
FOUND_DEADLINE_S = 60.0  # nodes import mlx and register (~2.5 s) on 2 shared cores
READY_DEADLINE_S = 120.0  # + four shard loads of the 30-layer model
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
# What `zmqinfer up` gives its nodes (see serve.cmd_up): the fast BLAS, and short spin-waits so
# five processes on two cores do not starve each other.
ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", **({"LD_PRELOAD": str(OPENBLAS)} if OPENBLAS.exists() else {})}
ZMQINFER = [sys.executable, "-m", "zmqinfer"]

_HTTP = """
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode() if len(sys.argv) > 2 else None,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=float(sys.argv[3]) if len(sys.argv) > 3 else 5) as r:
        print(r.read().decode())
except Exception as e:
    print(json.dumps({"client_error": repr(e)}))
"""


class Cluster:
    def __init__(self, net: Net, tmp: Path, model_dir: Path) -> None:
        self.net = net
        self.gw = net.hosts[0]
        self.mdns_nodes = {f"n{i}": h for i, h in enumerate(net.hosts[1:], start=1)}
        assert net.blocked is not None
        self.static = net.blocked
        self.config = tmp / "nodes.toml"
        self.config.write_text(
            f'model = "{model_dir}"\n\n[gateway]\naddress = "{self.gw.ip}"\nbind = "{self.gw.ip}"\n'
            f"port = {API}\ncontrol_port = {CONTROL}\nresult_port = {RESULT}\n\n"
            f'[[node]]\nname = "n4"\naddress = "{self.static.ip}"\nport = {DATA}\n')
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self) -> None:
        self.procs["gateway"] = self.net.popen(self.gw, [*ZMQINFER, "gateway", "--config", str(self.config),
                                                         "--interface", self.gw.ip], env=ENV)
        for name, h in self.mdns_nodes.items():
            self.procs[name] = self.node(name, h)
        self.procs["n4"] = self.node("n4", self.static, "--gateway", f"{self.gw.ip}:{CONTROL}", "--no-advertise")

    def node(self, name: str, h: Host, *extra: str) -> subprocess.Popen[str]:
        return self.net.popen(h, [*ZMQINFER, "node", "--name", name, "--interface", h.ip, "--port", str(DATA),
                                  "--bind", h.ip, *extra], env=ENV)

    def logs(self) -> str:
        """Each process's exit status and last log lines, for a failure message."""
        return "\n".join(f"--- {name} (exit {p.poll()}):\n{self.net.stderr(p)[-2500:]}"
                         for name, p in self.procs.items())

    def http(self, path: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """A request to the gateway's API from inside its namespace (nothing leaves the bridge)."""
        args = [sys.executable, "-c", _HTTP, f"http://{self.gw.ip}:{API}{path}"]
        if body is not None:
            args += [json.dumps(body), str(timeout)]
        r = self.net.run(self.gw, args, timeout + 10)
        return json.loads(r.stdout or json.dumps({"client_error": r.stderr[-500:]}))

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.net.run(self.gw, [*ZMQINFER, *args], timeout, env={**ENV, "COLUMNS": "200"})


QUESTION = "What is the capital of France?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir() -> Path:
    reason = skip_reason()
    if reason:
        print(f"skipping netns tests: {reason}")
        pytest.skip(reason)
    from zmqinfer.model.resolve import resolve_model

    return resolve_model(None)  # converts the embedded model once, before any node starts


@pytest.fixture(scope="module")
def greedy_answer(model_dir: Path) -> str:
    """Single-process mlx-lm's greedy answer, computed before the cluster takes the cores."""
    import gc

    from tests.loopback.conftest import Reference

    ref = Reference(model_dir)
    text = ref.text(ref.greedy(ref.chat_ids(QUESTION), MAX_TOKENS))
    del ref
    gc.collect()
    return text


@pytest.fixture(scope="module")
def cluster(model_dir: Path, greedy_answer: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Net(4, net_id=NET_ID, blocked_host=True) as net:
        c = Cluster(net, tmp_path_factory.mktemp("netns-cluster"), model_dir)
        try:
            c.start()
            yield c
        finally:
            net.terminate()  # clean stops first (goodbyes); Net's exit kills the rest


def wait_for(what: str, c: Cluster, probe, deadline_s: float, every_s: float = 1.0):
    """Poll `probe()` until it returns something truthy; fail with every process's logs."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        if dead := [name for name, p in c.procs.items() if p.poll() is not None]:
            raise AssertionError(f"waiting for {what}: {', '.join(dead)} exited\n{c.logs()}")
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"{what} not within {deadline_s:.0f}s; last: {last}\n{c.logs()}")


def test_the_gateway_namespace_sees_the_multicast_nodes_only(cluster: Cluster) -> None:
    c = cluster
    expected = {name: [h.ip] for name, h in c.mdns_nodes.items()}

    def discovered() -> dict[str, Any] | None:
        r = c.cli("discover", "--interface", c.gw.ip, "--seconds", "3", "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        found = {s["id"]: s for s in json.loads(r.stdout)["services"]}
        nodes = {n: s["addresses"] for n, s in found.items() if s["role"] == "node"}
        return found if nodes == expected else None

    found = wait_for("n1..n3 advertised", c, discovered, FOUND_DEADLINE_S, every_s=0.5)
    assert "n4" not in found, "n4 is behind a router that stops multicast (and has --no-advertise)"
    for name in expected:
        assert found[name]["data_port"] == DATA and found[name]["refused"] is None
    gateways = [s for s in found.values() if s["role"] == "gateway"]
    assert [(g["addresses"], g["control_port"]) for g in gateways] == [([c.gw.ip], CONTROL)], found
    # Every namespace has this machine's host name: the gateway names its ad after it...
    assert gateways[0]["id"] == "gateway-" + re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:54]
    # ... and each node answers for its own server name, not that shared host name.
    assert {n: found[n]["host"] for n in expected} == {n: server_name(n) for n in expected}
    text = c.cli("discover", "--interface", c.gw.ip, "--seconds", "2").stdout
    assert all(name in text for name in expected) and "n4" not in text, text


def test_the_ring_serves_over_all_four_nodes(cluster: Cluster, greedy_answer: str) -> None:
    c = cluster

    def ready() -> dict[str, Any] | None:
        # Ready over all four: a gateway may serve a smaller ring first and re-plan as nodes join.
        st = c.http("/cluster/status")
        placed = {n["name"] for n in st.get("nodes", []) if n.get("layers")}
        return st if st.get("ready") and placed == {"n1", "n2", "n3", "n4"} else None

    st = wait_for("ring ready over n1..n4", c, ready, READY_DEADLINE_S, every_s=2.0)
    rows = {n["name"]: n for n in st["nodes"]}
    assert set(rows) == {"n1", "n2", "n3", "n4"}, rows
    assert {n: r["found_by"] for n, r in rows.items()} == \
        {"n1": "mdns", "n2": "mdns", "n3": "mdns", "n4": "static"}, rows
    assert {n: r["address"] for n, r in rows.items()} == \
        {**{n: h.ip for n, h in c.mdns_nodes.items()}, "n4": c.static.ip}
    assert all(r["refused"] is None and r["health"] == "ok" for r in rows.values()), rows
    ranges = sorted(tuple(r["layers"]) for r in rows.values())
    assert ranges[0][0] == 0 and ranges[-1][1] == st["n_layers"] == 30
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:])), ranges

    model = c.http("/v1/models")["data"][0]["id"]
    answer = c.http("/v1/chat/completions", {
        "model": model, "temperature": 0, "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": QUESTION}]}, timeout=120)
    assert "Paris" in greedy_answer, greedy_answer  # the reference itself is sane
    assert answer.get("choices", [{}])[0].get("message", {}).get("content") == greedy_answer, \
        (answer, greedy_answer, c.logs())

    table = c.cli("status", "--url", f"http://{c.gw.ip}:{API}")
    assert table.returncode == 0, table.stdout + table.stderr
    cells = [" ".join(line.translate({ord(ch): " " for ch in "│┃"}).split()) for line in table.stdout.splitlines()]
    lines = {line.split()[0]: line for line in cells if line and line.split()[0] in rows}
    assert "found" in table.stdout
    for name, r in rows.items():
        kind = "static" if name == "n4" else "mdns"
        assert kind in lines[name] and f"[{r['layers'][0]},{r['layers'][1]})" in lines[name], table.stdout

