"""Frame fuzzing a running 3-node ring (issue 10): a few thousand seeded hostile messages to
every node's data port and to the gateway's control and results ROUTERs (as a DEALER: a node's
control DEALER connects out to the gateway, so the gateway's side is where a peer can speak).
Every process keeps its pid, the ring keeps its epoch (nobody was declared dead), and the same
greedy request answers exactly as before the fuzzing. Bounded: FRAMES_PER_TARGET messages per
target and FUZZ_DEADLINE_S in all."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import openai
import pytest
import zmq
import zmq.asyncio

from tests.loopback.fuzz_frames import Fuzz
from zmqinfer import local
from zmqinfer.local import (
    CONTROL_OFFSET,
    DATA_OFFSET,
    RESULT_OFFSET,
    LocalCluster,
)
from zmqinfer.protocol.inbox import DROP_LOG_EVERY_S

SEED = 20261201
FRAMES_PER_TARGET = 600  # x 5 targets = 3,000 messages, plus a few oversized frames
FUZZ_DEADLINE_S = 60.0
SEND_TIMEOUT_S = 5.0
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # Plaintext: the fuzzer is then a peer the ring accepts, as one holding valid credentials
    # would be (what strangers without a key get is tests/loopback/test_security.py's).
    c = local.start(tmp_path_factory.mktemp("fuzz"), nodes=3, extra=["--no-curve"])
    yield c
    local.stop(c)


def greedy(c: LocalCluster) -> str:
    oc = openai.OpenAI(base_url=c.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    r = oc.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTION}],
                                   max_tokens=16, temperature=0)
    return r.choices[0].message.content or ""


async def fuzz(c: LocalCluster, epoch: int) -> dict[str, int]:
    """Send every target its messages; how many went to each."""
    ctx = zmq.asyncio.Context()
    targets = {f"node{i}": (zmq.PUSH, c.port + DATA_OFFSET + i, "first" if i == 0 else "later") for i in range(3)}
    targets |= {"control": (zmq.DEALER, c.port + CONTROL_OFFSET, "control"),
                "results": (zmq.DEALER, c.port + RESULT_OFFSET, "results")}
    sent: dict[str, int] = {}
    socks = []
    try:
        async with asyncio.timeout(FUZZ_DEADLINE_S):
            for i, (name, (kind, port, role)) in enumerate(targets.items()):
                s = ctx.socket(kind)
                s.setsockopt(zmq.LINGER, 0)
                if kind == zmq.DEALER:
                    s.setsockopt(zmq.ROUTING_ID, f"fuzzer-{i}".encode())  # nobody the ring knows
                s.connect(f"tcp://127.0.0.1:{port}")
                socks.append(s)
                gen = Fuzz(SEED + i, epoch)
                for n in range(FRAMES_PER_TARGET):
                    async with asyncio.timeout(SEND_TIMEOUT_S):
                        await s.send_multipart(gen.message(role))
                    if n % 50 == 0:
                        await asyncio.sleep(0.01)  # a burst, then let the peer breathe
                for _ in range(2):  # each costs the fuzzer its connection; it reconnects
                    async with asyncio.timeout(SEND_TIMEOUT_S):
                        await s.send_multipart(gen.oversized(role))
                sent[name] = FRAMES_PER_TARGET + 2
            await asyncio.sleep(1.0)  # let the last ones be read
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    return sent


def post(c: LocalCluster, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(c.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_issues_requests_are_400s_and_the_gateway_lives(ring: LocalCluster) -> None:
    """Issue 10 against `up`: top_k 2**64 was a 504, then the gateway died (and `up` with it);
    a lone surrogate was a plain-text 500."""
    for body, param in [(b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 18446744073709551616}', "top_k"),
                        (b'{"messages": [{"role": "user", "content": "a\\udc80b"}]}', "messages")]:
        status, answer = post(ring, body)
        assert status == 400 and answer["error"]["param"] == param, answer
    assert ring.proc.poll() is None and ring.status()["ready"]


def test_fuzzed_frames_take_nothing_down(ring: LocalCluster, tmp_path: Path) -> None:
    st = ring.status()
    epoch, pids = st["epoch"], ring.node_pids()
    before = greedy(ring)
    assert "Paris" in before

    t0 = time.monotonic()
    sent = asyncio.run(fuzz(ring, epoch))
    took = time.monotonic() - t0
    assert sum(sent.values()) >= 3000 and took < FUZZ_DEADLINE_S

    assert ring.proc.poll() is None, ring.output()[-3000:]
    for name, pid in pids.items():
        assert local.pid_running(pid), f"{name} (pid {pid}) died:\n{ring.output()[-3000:]}"
    st = local.wait_ready(ring, 30)
    assert st["epoch"] == epoch, "a node was declared dead during the fuzzing"
    assert ring.node_pids() == pids
    assert greedy(ring) == before

    # The drops were counted and logged at a rate limit: a few lines, not thousands, and from
    # every loop that was fuzzed.
    lines = [json.loads(l) for l in ring.output().splitlines() if '"dropped messages"' in l]
    loops = 2 + 3 * 2  # gateway control + results, each node's data + control
    assert len(lines) <= loops * (took / DROP_LOG_EVERY_S + 2), len(lines)
    heard = {(l.get("node", "gateway"), l["loop"]) for l in lines}
    assert {("node0", "data"), ("node1", "data"), ("node2", "data"), ("gateway", "control"),
            ("gateway", "results")} <= heard, heard
    print(f"fuzz: {sum(sent.values())} messages in {took:.1f} s; {len(lines)} drop log lines")
