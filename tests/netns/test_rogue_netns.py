"""A rogue on the LAN advertises a listed node's id with a key of its own (network namespaces,
root only): with Curve on, it gets nothing.

    zqs32-h0  10.219.32.1   `zmqinfer gateway --keys` with mDNS discovery; nodes.toml lists n1
    zqs32-h1  10.219.32.2   `zmqinfer node n1 --keys`: the machine n1's key pair was copied to
                            (public_keys/ + its own private_keys/n1.key_secret)
    zqs32-h2  10.219.32.3   the rogue: an mDNS ad "n1" (its own public key, its own address)
                            that is up before the gateway, and a CURVE PULL on the advertised
                            data port that accepts any client key and counts what arrives

Without the key check, the ad would win over nodes.toml's address (mDNS comes first) and the
gateway would push n1's work to the rogue. Here the ad is ignored and noted in
/cluster/status, the ring serves through the real n1, and the rogue counts zero messages.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .hosts import skip_reason
from .secnet import SecNet

NET_ID = 32
API, CONTROL, RESULT, DATA = 8100, 8101, 8102, 8110
READY_DEADLINE_S = 120.0  # tokenizer, one 30-layer shard load, on shared cores
ROGUE_SECONDS = 400  # the rogue's own bound; the test stops it long before
ZMQINFER = [sys.executable, "-m", "zmqinfer"]

_ROGUE = """
import asyncio, json, sys, time
import zmq, zmq.asyncio, zmq.auth
from zmqinfer.mdns.discovery import Advertiser, NodeAd
from zmqinfer.protocol.wire import NodeId

ip, port, keydir, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])

async def main():
    pub, sec = zmq.auth.load_certificate(zmq.auth.create_certificates(keydir, "n1")[1])
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)  # no ZAP handler: a CURVE server that takes any client key
    pull.curve_secretkey, pull.curve_publickey, pull.curve_server = sec, pub, True
    pull.bind(f"tcp://{ip}:{port}")
    adv = Advertiser()
    await adv.start(NodeAd(NodeId("n1"), port, 64 << 30, 60 << 30, "cpu (rogue)", pubkey=pub.decode()), [ip])
    print(json.dumps({"event": "ready", "pubkey": pub.decode()}), flush=True)
    got, end = 0, time.monotonic() + seconds
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    while time.monotonic() < end and not stdin_closed.done():
        if await pull.poll(200):
            await pull.recv_multipart()
            got += 1
    print(json.dumps({"event": "done", "received": got}), flush=True)
    await adv.close()
    pull.close(0)
    ctx.term()

asyncio.run(main())
"""

_GET = """
import json, sys, urllib.request
data = sys.argv[2].encode() if len(sys.argv) > 2 else None
req = urllib.request.Request(sys.argv[1], data=data, headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=60) as r:
        print(r.read().decode())
except Exception as e:
    print(json.dumps({"client_error": repr(e)}))
"""


@pytest.fixture(scope="module")
def net() -> Iterator[SecNet]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with SecNet(3, NET_ID) as n:
        yield n


def http(net: SecNet, path: str, body: dict | None = None) -> dict:
    args = [sys.executable, "-c", _GET, f"http://{net.hosts[0].ip}:{API}{path}", *([json.dumps(body)] if body else [])]
    r = net.run(net.hosts[0], args, 90)
    return json.loads(r.stdout or json.dumps({"client_error": r.stderr[-500:]}))


def test_a_rogue_advertising_a_listed_nodes_id_gets_nothing(net: SecNet, tmp_path: Path) -> None:
    from zmqinfer.model.resolve import resolve_model

    model_dir = resolve_model(None)
    gw, n1, rogue = net.hosts
    admin = tmp_path / "admin"  # the cluster directory where keys are made
    for args in (["init"], ["add", "n1"]):
        subprocess.run([*ZMQINFER, "keys", *args, "--dir", str(admin)], check=True, timeout=30)
    # What the notes say to copy to a node's machine: every public key, and its own secret.
    on_n1 = tmp_path / "n1-machine"
    shutil.copytree(admin / "public_keys", on_n1 / "public_keys")
    (on_n1 / "private_keys").mkdir(mode=0o700)
    shutil.copy2(admin / "private_keys" / "n1.key_secret", on_n1 / "private_keys")
    config = tmp_path / "nodes.toml"
    config.write_text(f'model = "{model_dir}"\n\n[gateway]\naddress = "{gw.ip}"\nbind = "{gw.ip}"\n'
                      f"port = {API}\ncontrol_port = {CONTROL}\nresult_port = {RESULT}\n\n"
                      f'[[node]]\nname = "n1"\naddress = "{n1.ip}"\nport = {DATA}\n')
    (tmp_path / "rogue").mkdir()
    rp = net.python(rogue, _ROGUE, rogue.ip, str(DATA), str(tmp_path / "rogue"), str(ROGUE_SECONDS))
    assert rp.stdout is not None
    ready = {"event": "none"}
    for _ in range(50):  # zeroconf's log lines come first; ours are the JSON ones
        line = rp.stdout.readline()
        if not line or line.startswith('{"event"'):
            ready = json.loads(line or '{"event": "none"}')
            break
    assert ready["event"] == "ready", net.stderr(rp)
    procs = {
        "gateway": net.popen(gw, [*ZMQINFER, "gateway", "--config", str(config), "--keys", str(admin),
                                  "--interface", gw.ip]),
        "n1": net.popen(n1, [*ZMQINFER, "node", "--name", "n1", "--keys", str(on_n1), "--bind", n1.ip,
                             "--port", str(DATA), "--gateway", f"{gw.ip}:{CONTROL}", "--no-advertise"],
                        ),
    }

    def logs() -> str:
        return "\n".join(f"--- {k} (exit {p.poll()}):\n{net.stderr(p)[-2500:]}" for k, p in procs.items())

    deadline, st = time.monotonic() + READY_DEADLINE_S, {}
    while not st.get("ready"):
        assert time.monotonic() < deadline, f"ring not ready: {st}\n{logs()}"
        assert all(p.poll() is None for p in procs.values()), logs()
        time.sleep(1.0)
        st = http(net, "/cluster/status")
    out = http(net, "/v1/chat/completions", {"model": "x", "max_tokens": 8, "temperature": 0,
                                              "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert out.get("choices") and "Paris" in out["choices"][0]["message"]["content"], (out, logs())
    st = http(net, "/cluster/status")
    row = next(n for n in st["nodes"] if n["name"] == "n1")
    assert row["address"] == n1.ip and row["found_by"] == "static", row
    refused = st["security"]["refused_peers"]
    assert any(ready["pubkey"] in who for who in refused), (refused, logs())
    net.ask_to_stop(rp)
    done, _ = rp.communicate(timeout=30)
    events = [json.loads(x) for x in done.splitlines() if x.startswith('{"event"')]
    assert events == [{"event": "done", "received": 0}], done
