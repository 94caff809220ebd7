"""Protected mode and API keys seen from another machine (network namespaces, root only):

    zqs31-h0  10.219.31.1   `zmqinfer gateway` (its one node never comes: the API answers anyway)
    zqs31-h1  10.219.31.2   the client: another machine on the LAN

No keys: the client gets 403 naming how to set a key, /health stays open, and a client on the
gateway's own machine is served. With keys ($ZMQINFER_API_KEY): 401 without or with a wrong
key, 200 with each key, and no key in the gateway's log. `--no-auth` serves the LAN and says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .hosts import Host, skip_reason
from .secnet import SecNet

NET_ID = 31
API = 8100
KEYS = ("sk-team-a-0123456789abcdef", "sk-team-b-fedcba9876543210")
UP_DEADLINE_S = 90.0  # the gateway loads the tokenizer before it listens
ZMQINFER = [sys.executable, "-m", "zmqinfer"]

_GET = """
import json, sys, urllib.error, urllib.request
headers = {"Authorization": "Bearer " + sys.argv[2]} if len(sys.argv) > 2 else {}
try:
    with urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=5) as r:
        print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": json.loads(e.read() or b"{}")}))
except Exception as e:
    print(json.dumps({"status": None, "body": repr(e)}))
"""


@pytest.fixture(scope="module")
def net() -> Iterator[SecNet]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from zmqinfer.model.resolve import resolve_model

    resolve_model(None)  # converted once, before the gateway needs its tokenizer
    with SecNet(2, NET_ID) as n:
        yield n


def get(net: SecNet, host: Host, url: str, key: str | None = None) -> dict:
    r = net.run(host, [sys.executable, "-c", _GET, url, *([key] if key else [])], 20)
    return json.loads(r.stdout)


def gateway(net: SecNet, tmp: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    gw = net.hosts[0]
    config = tmp / "nodes.toml"
    config.write_text(f'[gateway]\naddress = "{gw.ip}"\nbind = "0.0.0.0"\nport = {API}\n\n'
                      f'[[node]]\nname = "n1"\naddress = "{net.hosts[1].ip}"\n')
    p = net.popen(gw, [*ZMQINFER, "gateway", "--config", str(config), "--no-discovery", "--no-curve", *extra],
                  env=env)
    deadline = time.monotonic() + UP_DEADLINE_S
    while get(net, gw, f"http://127.0.0.1:{API}/health")["status"] is None:
        assert p.poll() is None, net.stderr(p)[-3000:]
        assert time.monotonic() < deadline, net.stderr(p)[-3000:]
        time.sleep(0.5)
    return p


def stop(net: SecNet, p: subprocess.Popen[str]) -> str:
    p.terminate()
    p.wait(timeout=30)
    return net.stderr(p)


def test_protected_mode_refuses_the_lan_and_serves_this_machine(net: SecNet, tmp_path: Path) -> None:
    gw, client = net.hosts
    p = gateway(net, tmp_path)
    try:
        r = get(net, client, f"http://{gw.ip}:{API}/v1/models")
        assert r["status"] == 403 and r["body"]["error"]["code"] == "protected_mode"
        assert "ZMQINFER_API_KEY" in r["body"]["error"]["message"] and "--no-auth" in r["body"]["error"]["message"]
        assert get(net, client, f"http://{gw.ip}:{API}/cluster/status")["status"] == 403
        assert get(net, client, f"http://{gw.ip}:{API}/health")["status"] == 503  # open, ring not ready
        assert get(net, gw, f"http://127.0.0.1:{API}/v1/models")["status"] == 200
        assert get(net, gw, f"http://{gw.ip}:{API}/v1/models")["status"] == 200  # its own address
        status = get(net, gw, f"http://127.0.0.1:{API}/cluster/status")["body"]
        assert status["security"]["api"]["mode"] == "protected" and status["security"]["api"]["refused"] >= 2
    finally:
        log = stop(net, p)
    assert "protected mode" in log


def test_keys_from_the_environment_guard_every_route_and_stay_out_of_the_log(net: SecNet, tmp_path: Path) -> None:
    gw, client = net.hosts
    p = gateway(net, tmp_path, env={"ZMQINFER_API_KEY": ",".join(KEYS)})
    try:
        url = f"http://{gw.ip}:{API}"
        for key in (None, "sk-wrong-0123456789abcdef"):
            r = get(net, client, url + "/v1/models", key)
            assert r["status"] == 401 and r["body"]["error"]["code"] == "invalid_api_key", r
        assert get(net, gw, f"http://127.0.0.1:{API}/v1/models")["status"] == 401  # keys bind loopback too
        for key in KEYS:
            r = get(net, client, url + "/v1/models", key)
            assert r["status"] == 200 and r["body"]["data"][0]["object"] == "model"
            assert get(net, client, url + "/cluster/status", key)["body"]["security"]["api"]["keys"] == ["env:1", "env:2"]
        assert get(net, client, url + "/health")["status"] == 503
        # The CLI reads the same variable (several keys: it sends the first).
        shown = net.run(client, [*ZMQINFER, "status", "--url", url], 30, env={"ZMQINFER_API_KEY": ",".join(KEYS),
                                                                              "COLUMNS": "200"})
        assert "security:" in shown.stdout and "api: keys" in shown.stdout, shown.stderr
        refused = net.run(client, [*ZMQINFER, "status", "--url", url], 30, env={"ZMQINFER_API_KEY": ""})
        assert refused.returncode != 0 and "ZMQINFER_API_KEY" in refused.stderr
    finally:
        log = stop(net, p)
    assert "api keys required" in log and "env:1" in log
    for key in KEYS:
        assert key not in log


def test_no_auth_serves_the_lan_and_says_so(net: SecNet, tmp_path: Path) -> None:
    gw, client = net.hosts
    p = gateway(net, tmp_path, "--no-auth")
    try:
        assert get(net, client, f"http://{gw.ip}:{API}/v1/models")["status"] == 200
    finally:
        log = stop(net, p)
    assert "--no-auth" in log
