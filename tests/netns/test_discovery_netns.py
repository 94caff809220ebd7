"""Discovery over real multicast between real network stacks (network namespaces, root only).

    zq1-h0  10.213.1.1   the browser (where the gateway would run)
    zq1-h1..h3           three advertising nodes; h1 also carries a malformed foreign ad
    zq1-m   10.214.1.2   a fourth node whose network blocks multicast (behind a router): it
                         advertises too, is never discovered, and is reachable by its address

Every namespace shares this machine's host name, as machines cloned from one image do: each ad
must answer for its own server name (adverts.server_name), not the shared host name. A second
host claiming a live node's id is refused. The browser must see exactly the three, each at its
own IP, within DISCOVERY_DEADLINE_S, see a re-announcement, resolve node2's server name
through mDNS, not resolve the blocked host's,
reach the blocked host by a plain TCP connect to its static address, drop a node that says
goodbye, and find it again when it restarts with the same id (and the node finds the
gateway's own ad, as a node started without --gateway would).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from zmqinfer.mdns.adverts import server_name

from .hosts import Host, Net, skip_reason

DISCOVERY_DEADLINE_S = 10.0  # the bound; measured ~0.1 s on this VM
GIB = 1 << 30


@pytest.fixture(scope="module")
def net():
    reason = skip_reason()
    if reason:
        print(f"skipping netns tests: {reason}")
        pytest.skip(reason)
    with Net(4, net_id=1, blocked_host=True) as n:
        yield n


def agent(net: Net, host: Host, *args: str) -> subprocess.Popen[str]:
    return net.popen(host, [sys.executable, "-m", "tests.netns.agent", *args])


def events(net: Net, p: subprocess.Popen[str], n: int | None = None,
           timeout: float = 30.0) -> list[dict[str, Any]]:
    """The next `n` JSON events, or all of them until the agent exits (within `timeout`)."""
    assert p.stdout is not None
    if n is None:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent still running after {timeout}s:\n{net.stderr(p)[-3000:]}") from None
        lines = p.stdout.read().splitlines()
        if p.returncode != 0:
            raise AssertionError(f"agent failed ({p.returncode}): {lines}\n{net.stderr(p)[-3000:]}")
    else:
        lines = [p.stdout.readline() for _ in range(n)]  # bounded: the agents exit on their own
    parsed = [json.loads(line) for line in lines if line.strip()]
    if n is not None and len(parsed) < n:
        raise AssertionError(f"agent stopped early: {parsed}\n{net.stderr(p)[-3000:]}")
    return parsed


def test_without_root_the_reason_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert skip_reason() == "network namespaces need root (CI runs these as root)"


def test_the_harness_really_blocks_multicast(net: Net) -> None:
    h0, h1, _, _ = net.hosts
    m = net.blocked
    assert m is not None
    assert net.multicast_reaches([(h1, h0), (m, h0), (h0, m)]) == [True, False, False]


def test_discovery_across_namespaces(net: Net) -> None:
    h0, h1, h2, h3 = net.hosts
    m = net.blocked
    assert m is not None
    nodes = {"node1": h1, "node2": h2, "node3": h3, "node4": m}
    ads = {name: agent(net, h, "advertise", "--id", name, "--ip", h.ip,
                       "--update-after", "1.5" if name == "node1" else "0")
           for name, h in nodes.items()}
    junk = agent(net, h1, "junk", "--id", "stranger", "--ip", h1.ip)
    listener = agent(net, m, "listen", "--ip", m.ip, "--port", "8110")
    register_s = {}
    for name, p in ads.items():
        ready = events(net, p, 1)[0]
        assert ready["event"] == "ready", (name, ready)
        register_s[name] = ready["register_s"]
    assert events(net, junk, 1)[0]["event"] == "ready"
    assert events(net, listener, 1)[0]["event"] == "listening"
    # A second host claiming a live node's id is refused while probing, before it announces.
    twin = agent(net, h3, "advertise", "--id", "node2", "--ip", h3.ip)
    refused = events(net, twin, None)
    assert refused[0]["kind"] == "DuplicateNodeId" and "already advertises 'node2'" in refused[0]["error"]

    browser = agent(net, h0, "browse", "--ip", h0.ip, "--expect", "node1,node2,node3",
                    "--absent", "node4", "--absent-grace", "3", "--timeout", str(DISCOVERY_DEADLINE_S),
                    "--wait-update", f"node1={4 * GIB}", "--resolve", server_name("node2"),
                    "--resolve-missing", server_name("node4"), "--wait-gone", "node3",
                    "--connect", f"{m.ip}:8110")
    browsed = events(net, browser, 1)[0]
    # node3 leaves cleanly now; the browser is already waiting to see it go.
    stopped_at = time.monotonic()  # one clock for all namespaces of this host
    net.ask_to_stop(ads["node3"])
    assert events(net, ads["node3"], None)[-1]["event"] == "closed"
    # node3 restarts with the same id while the browser runs: found again by its announcement.
    again = agent(net, h3, "advertise", "--id", "node3", "--ip", h3.ip, "--find-gateway")
    ready, gateway = events(net, again, 2)
    assert ready["event"] == "ready", ready
    # ... and finds the gateway's own ad: a node needs no --gateway where multicast works.
    assert gateway["ok"] and gateway["addresses"] == [h0.ip] and gateway["control_port"] == 8101, \
        (gateway, net.stderr(again)[-3000:])
    net.ask_to_stop(browser)
    rest = {e["event"]: e for e in events(net, browser, None)}
    assert "connected" in rest, (rest, net.stderr(browser)[-3000:])
    updated = events(net, ads["node1"], 1)[0]
    assert updated["event"] == "updated" and updated["sent"]

    print(f"\nregistration (probe + announce): {register_s} s; "
          f"discovery latency after browser start: "
          f"{ {n: f['after_s'] for n, f in sorted(browsed['found'].items())} } s; "
          f"re-announcement seen {rest['update_seen']['at'] - updated['at']:.3f} s after it was sent; "
          f"goodbye seen {rest['gone']['at'] - stopped_at:.3f} s after asking node3 to stop; "
          f"restarted node3 seen {rest['back']['at'] - ready['started_at']:.3f} s after it began "
          f"registering, found the gateway in {gateway['after_s']} s; "
          f".local resolve {rest['resolved']['after_s']} s")
    assert browsed["seen_all"], browsed
    found = browsed["found"]
    assert set(found) == {"node1", "node2", "node3"}, "the multicast-blocked node4 must not be found"
    for name in ("node1", "node2", "node3"):
        assert found[name]["addresses"] == [nodes[name].ip]  # its own, though one host name
        assert found[name]["host"] == server_name(name)
        assert found[name]["port"] == 8110
        assert found[name]["after_s"] < DISCOVERY_DEADLINE_S
    assert browsed["absent_ok"]
    assert any("malformed ad" in why for why in browsed["ignored"].values()), browsed["ignored"]
    assert rest["update_seen"]["ok"], "node1's re-announcement (free memory 4 GiB) was not seen"
    assert rest["resolved"]["ip"] == h2.ip
    assert rest["resolved_missing"]["ip"] is None, "the blocked node's server name must not resolve"
    assert rest["resolved_missing"]["after_s"] < 2.0, "a failed resolve must end at its deadline"
    assert rest["gone"]["ok"], "node3 said goodbye but stayed in the table"
    assert rest["connected"]["peer"] == m.ip, "the blocked host must be reachable by its address"
    assert rest["back"]["ok"] and rest["back"]["addresses"] == [h3.ip]
