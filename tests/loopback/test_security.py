"""CurveZMQ on a real ring (lone `zmqinfer gateway` + `zmqinfer node` processes on 127.0.0.1,
a cluster directory made with `zmqinfer keys`): strangers get nothing accepted on the control,
data or result plane; a trusted key speaks only as its own name; a revoked key is refused
without restarting anything; legitimate requests running meanwhile stay token-exact."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import zmq
import zmq.asyncio
import zmq.auth

from tests.loopback.conftest import Reference
from zmqinfer import local
from zmqinfer.local import CONTROL_OFFSET, DATA_OFFSET, RESULT_OFFSET, LocalCluster
from zmqinfer.protocol.codec import encode
from zmqinfer.protocol.keys import CurveKeys, load_keys, public_key
from zmqinfer.protocol.wire import (
    Bye,
    Epoch,
    Heartbeat,
    NodeId,
    Release,
    Sample,
    Sampled,
    SeqId,
)

NAMES = ["node0", "node1"]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Name a famous painter.", "Why is the sky blue?"]
MAX_TOKENS = 24
ATTACK_EVERY_S = 0.02  # one forged message per plane this often while the requests run
MAX_ATTACKS = 400  # bound on forged messages per plane
READY_S = 120.0


def keys_cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "zmqinfer", "keys", *args], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


class Ring:
    def __init__(self, gw: LocalCluster, nodes: list[local.NodeProcess], keys: Path) -> None:
        self.gw, self.nodes, self.keys = gw, nodes, keys

    def status(self) -> dict:
        return self.gw.status()

    def security(self) -> dict:
        return self.status()["security"]

    def node_refusals(self) -> dict[str, int]:
        return {n["name"]: n.get("refused_by_node", 0) for n in self.status()["nodes"]}


def start_ring(tmp: Path, names: list[str]) -> Ring:
    keys = tmp / "cluster"
    keys_cli("init", "--dir", str(keys))
    for n in names + ["intruder"]:  # intruder: trusted, but no ring member
        keys_cli("add", n, "--dir", str(keys))
    port = local.free_port_block()
    config = local.write_config(tmp / "nodes.toml", port, names)
    gw = local.start_gateway(tmp, config, port, ["--keys", str(keys)])
    nodes = [local.start_node(tmp, n, f"127.0.0.1:{port + CONTROL_OFFSET}", port + DATA_OFFSET + i,
                               ["--keys", str(keys)]) for i, n in enumerate(names)]
    ring = Ring(gw, nodes, keys)
    try:
        local.wait_status(gw, lambda st: bool(st["ready"]), READY_S, "the Curve ring to serve", nodes=nodes)
    except RuntimeError:
        stop_ring(ring)
        raise
    return ring


def stop_ring(ring: Ring) -> None:
    for n in ring.nodes:
        local.stop_node(n)
    local.stop(ring.gw)


@pytest.fixture(scope="module")
def ring(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ring]:
    r = start_ring(tmp_path_factory.mktemp("curve"), NAMES)
    try:
        yield r
    finally:
        stop_ring(r)


def stranger_keys(tmp: Path, cluster: Path, toward: str) -> CurveKeys:
    """A key pair nobody trusts, set up to connect to `toward` (whose public key it knows)."""
    pub, sec = zmq.auth.create_certificates(tmp, f"stranger-{toward}")
    from zmq.auth.certs import load_certificate

    p, s = load_certificate(sec)
    assert s is not None
    return CurveKeys("stranger", p, s, cluster, public_key(cluster, toward))


def curve_socket(ctx: zmq.asyncio.Context, kind: int, keys: CurveKeys, endpoint: str,
                 routing_id: str | None = None) -> zmq.asyncio.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        s.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    s.curve_secretkey, s.curve_publickey, s.curve_serverkey = keys.secret, keys.public, keys.server_key
    s.connect(endpoint)
    return s


def forged(epoch: int) -> dict[str, list]:
    """What a hostile peer sends: node1 leaving, every sequence's caches freed, text for user 1."""
    bye = encode(Bye(NodeId("node1"), "forged"))
    return {
        "control": bye, "plain": bye,
        "data": encode(Release(Epoch(epoch), tuple(SeqId(i) for i in range(1, 512)))),
        "results": encode(Sampled(Epoch(epoch), 1, (Sample(SeqId(1), 42, -0.1, ()),))),
    }


async def attack(sockets: dict[str, zmq.asyncio.Socket], epoch: int, stop: asyncio.Event) -> int:
    frames, sent = forged(epoch), 0
    for _ in range(MAX_ATTACKS):
        if stop.is_set():
            break
        for plane, s in sockets.items():
            try:
                await s.send_multipart(frames[plane], flags=zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass  # no handshake completed (untrusted key): nothing can even be queued
        await asyncio.sleep(ATTACK_EVERY_S)
    return sent


async def requests_under_attack(ring: Ring, reference: Reference, sockets: dict[str, zmq.asyncio.Socket]) -> None:
    """Every prompt streamed concurrently while `sockets` send forged messages; every answer
    must be single-process mlx-lm's greedy output, exactly."""
    port = ring.gw.port
    oc = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
    stop = asyncio.Event()

    async def one(prompt: str) -> str:
        r = await oc.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=MAX_TOKENS, temperature=0)
        return r.choices[0].message.content or ""

    async with asyncio.timeout(240):
        async with asyncio.TaskGroup() as tg:
            attacker = tg.create_task(attack(sockets, ring.status()["epoch"], stop))
            answers = await asyncio.gather(*(one(p) for p in PROMPTS))
            stop.set()
    assert attacker.result() >= 0
    for p, a in zip(PROMPTS, answers):
        assert a == reference.text(reference.greedy(reference.chat_ids(p), MAX_TOKENS)), p


async def test_strangers_without_a_trusted_key_get_nothing_accepted(ring: Ring, reference: Reference,
                                                                    tmp_path: Path) -> None:
    port, before = ring.gw.port, ring.security()
    node_before = ring.node_refusals()
    ctx = zmq.asyncio.Context()
    try:
        sockets = {
            "control": curve_socket(ctx, zmq.DEALER, stranger_keys(tmp_path, ring.keys, "gateway"),
                                    f"tcp://127.0.0.1:{port + CONTROL_OFFSET}", "node1"),
            "data": curve_socket(ctx, zmq.PUSH, stranger_keys(tmp_path, ring.keys, "node1"),
                                 f"tcp://127.0.0.1:{port + DATA_OFFSET + 1}"),
            "results": curve_socket(ctx, zmq.DEALER, stranger_keys(tmp_path, ring.keys, "gateway"),
                                    f"tcp://127.0.0.1:{port + RESULT_OFFSET}", "node1"),
        }
        # And one peer that does not even speak CURVE: a plaintext DEALER on the control port.
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.setsockopt(zmq.ROUTING_ID, b"node1")
        plain.connect(f"tcp://127.0.0.1:{port + CONTROL_OFFSET}")
        sockets["plain"] = plain
        await requests_under_attack(ring, reference, sockets)
    finally:
        ctx.destroy(linger=0)
    st = ring.status()
    assert st["ready"] and [n["name"] for n in st["nodes"] if n["layers"]] == NAMES
    assert all(n["alive"] for n in st["nodes"])
    after = st["security"]
    assert after["curve"] is True
    # The gateway refused the strangers' handshakes on its control and result ports ...
    assert after["refused_handshakes"] > before["refused_handshakes"]
    # ... and node1 refused the one on its data port.
    deadline = time.monotonic() + 10
    while ring.node_refusals()["node1"] <= node_before["node1"]:
        assert time.monotonic() < deadline, ring.node_refusals()
        await asyncio.sleep(0.25)


async def test_a_trusted_key_speaks_only_as_its_own_name(ring: Ring, reference: Reference) -> None:
    """`intruder` is in the cluster directory, so its handshakes succeed; but it may not say
    Bye as node1, feed node1's data port (only node0 may) or send results (only node1 may)."""
    port, before = ring.gw.port, ring.security()
    node_before = ring.node_refusals()
    intruder = load_keys(ring.keys, "intruder")
    ctx = zmq.asyncio.Context()
    try:
        sockets = {
            "control": curve_socket(ctx, zmq.DEALER, intruder.toward("gateway"),
                                    f"tcp://127.0.0.1:{port + CONTROL_OFFSET}", "node1"),
            "data": curve_socket(ctx, zmq.PUSH, intruder.toward("node1"), f"tcp://127.0.0.1:{port + DATA_OFFSET + 1}"),
            "results": curve_socket(ctx, zmq.DEALER, intruder.toward("gateway"),
                                    f"tcp://127.0.0.1:{port + RESULT_OFFSET}", "node1"),
        }
        await requests_under_attack(ring, reference, sockets)
        # A heartbeat claiming to be node1, from the intruder's key: refused, not a new row.
        beat = Heartbeat(NodeId("node1"), port + DATA_OFFSET + 5, 1 << 30, 1 << 30, "forged", 1, Epoch(0),
                         False, 0, 0.0, 0)
        await sockets["control"].send_multipart(encode(beat))
        await asyncio.sleep(1.0)
    finally:
        ctx.destroy(linger=0)
    st = ring.status()
    assert st["ready"] and all(n["alive"] for n in st["nodes"] if n["name"] in NAMES)
    node1 = next(n for n in st["nodes"] if n["name"] == "node1")
    assert node1["data_port"] == port + DATA_OFFSET + 1  # the forged beat changed nothing
    after = st["security"]
    assert after["refused_messages"] > before["refused_messages"]
    assert any("intruder" in who for who in after["refused_peers"]), after["refused_peers"]
    assert ring.node_refusals()["node1"] > node_before["node1"]
    shown = subprocess.run([sys.executable, "-m", "zmqinfer", "status", "--url", ring.gw.url], capture_output=True,
                           text=True, timeout=30, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "security: curve" in shown and f"{after['refused_messages']} messages refused" in shown, shown
    assert "refused intruder" in shown or "via key of intruder" in shown, shown


async def test_a_revoked_key_is_refused_without_restarting_anything(model_dir: Path, tmp_path: Path) -> None:
    """Revoke node1 with `zmqinfer keys revoke`: the running gateway (same pid) reloads the
    directory, refuses node1's messages and re-plans the ring onto node0 alone."""
    r = start_ring(tmp_path, NAMES)
    try:
        pid = r.gw.proc.pid
        before = r.security()["refused_messages"]
        keys_cli("revoke", "node1", "--dir", str(r.keys))
        st = local.wait_status(r.gw, lambda s: [n["name"] for n in s["nodes"] if n["layers"]] == ["node0"]
                                and s["ready"], 60, "the ring without the revoked node1", nodes=r.nodes)
        assert "node1" not in st["security"]["trusted"]
        assert st["security"]["refused_messages"] > before  # node1's beats, refused per message
        assert r.gw.proc.pid == pid and r.gw.proc.poll() is None and r.nodes[0].running()
        oc = openai.OpenAI(base_url=r.gw.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        out = oc.chat.completions.create(model="default", messages=[{"role": "user", "content": PROMPTS[0]}],
                                         max_tokens=8, temperature=0)
        assert out.choices[0].message.content
        assert "revoked" in r.gw.output() and "node1" in r.gw.output()
    finally:
        stop_ring(r)


def test_up_is_encrypted_by_default_and_a_restarted_node_rejoins_with_its_key(model_dir: Path, tmp_path: Path) -> None:
    """`zmqinfer up` with no setup runs Curve; a node of it killed and started again by hand
    (local.restart_up_node: the same cluster directory) rejoins under its key."""
    import signal

    c = local.start(tmp_path, nodes=2)
    try:
        st = c.status()
        assert st["security"]["curve"] and st["security"]["trusted"] == ["gateway", "node0", "node1"]
        assert st["security"]["api"]["mode"] == "protected"
        old = c.node_pids()["node1"]
        local.signal_pid(old, signal.SIGKILL)
        assert local.wait_pid_gone(old, 10)
        node = local.restart_up_node(c, tmp_path, "node1")
        try:
            local.wait_status(c, lambda s: s["ready"] and c.node_pids().get("node1") == node.pid
                               and all(n["layers"] for n in s["nodes"]), READY_S, "node1 back in the ring",
                               nodes=[node])
        finally:
            local.stop_node(node)
    finally:
        local.stop(c)
