"""NodePresence, GatewayDirectory and find_gateway over real zeroconf on loopback.

Every test uses its own service type, so concurrent runs on this machine (or a developer's real
cluster) never see each other's ads; multi-host behaviour is in tests/netns.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import pytest

from zmqinfer.mdns.adverts import NodeAd, server_name
from zmqinfer.mdns.discovery import DiscoveryError, DuplicateNodeId
from zmqinfer.mdns.presence import GatewayDirectory, NodePresence, find_gateway
from zmqinfer.protocol.wire import NodeId

GIB = 1 << 30
LO = ("127.0.0.1",)
DEADLINE_S = 8.0  # registration takes ~2.5 s (duplicate check + probing); discovery ~1 s more


@pytest.fixture
def stype() -> str:
    return f"_zq{uuid.uuid4().hex[:8]}._tcp.local."


def node_ad(name: str, free: int = 12 * GIB) -> NodeAd:
    return NodeAd(NodeId(name), 8110, 16 * GIB, free, "cpu (test)", fingerprint="ab12")


def gateway_ad(name: str = "gateway", cport: int = 8101) -> NodeAd:
    return NodeAd(NodeId(name), 8102, 16 * GIB, 8 * GIB, "cpu (test)", control_port=cport, role="gateway")


async def wait_for(predicate, timeout: float = DEADLINE_S) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_node_and_gateway_find_each_other(stype: str) -> None:
    me = server_name("n1").removesuffix(".")  # the node's ad answers for this name, not the machine's
    directory = GatewayDirectory([me, "zq-nobody-here.local"], LO, gateway_ad(), service_type=stype)
    node = NodePresence(LO, service_type=stype)
    try:
        await directory.start()
        await node.start(node_ad("n1"))
        assert node.advertising and node.error is None
        assert await wait_for(lambda: "n1" in directory.discovered), directory.ignored
        found = directory.discovered["n1"]
        assert found.addresses == LO and found.ad == node_ad("n1")
        # A node started without --gateway finds the gateway's own ad (once it is registered).
        assert await find_gateway(DEADLINE_S, LO, service_type=stype) == ("127.0.0.1", 8101)
        assert set(directory.discovered) == {"n1"}, "gateways are not nodes"
        assert await wait_for(lambda: me in directory.resolved_hosts)
        assert directory.resolved_hosts == {me: "127.0.0.1"}  # the other name never answers
        assert directory.changed.is_set()
    finally:
        t0 = time.monotonic()
        await node.close()
        await directory.close()
        assert time.monotonic() - t0 < 8.0  # goodbyes and cancellations are bounded


async def test_update_is_cheap_and_reannounces_only_what_matters(stype: str) -> None:
    directory = GatewayDirectory([], LO, service_type=stype)
    node = NodePresence(LO, service_type=stype)
    try:
        await directory.start()
        await node.start(node_ad("n2"))
        assert await wait_for(lambda: "n2" in directory.discovered)
        t0 = time.monotonic()
        await node.update(node_ad("n2", free=12 * GIB - GIB // 4))  # 1.5% of total: not worth it
        assert node._announcing is None
        await node.update(node_ad("n2", free=4 * GIB))
        assert time.monotonic() - t0 < 0.05, "update must not wait on the network"
        assert node._announcing is not None
        await node.update(node_ad("n2", free=3 * GIB))  # one at a time: picked up by a later beat
        await asyncio.wait([node._announcing])
        assert await wait_for(lambda: directory.discovered["n2"].ad.mem_free == 4 * GIB)
        await node.update(node_ad("n2", free=3 * GIB))
        assert await wait_for(lambda: directory.discovered["n2"].ad.mem_free == 3 * GIB)
    finally:
        await node.close()
        await directory.close()
    assert node._announcing is None


async def test_advertising_failure_is_logged_not_fatal(stype: str) -> None:
    node = NodePresence(["203.0.113.9"], service_type=stype)  # not an address of this host
    await node.start(node_ad("n3"))
    assert not node.advertising
    assert "203.0.113.9" in (node.error or "")
    await node.update(node_ad("n3", free=GIB))  # a no-op, not an error
    assert node._announcing is None
    await node.close()
    with pytest.raises(DiscoveryError, match="cannot open mDNS sockets on 203.0.113.9"):
        await GatewayDirectory([], ["203.0.113.9"]).start()


async def test_a_second_node_with_the_same_id_is_refused(stype: str) -> None:
    first, twin = NodePresence(LO, service_type=stype), NodePresence(LO, service_type=stype)
    try:
        await first.start(node_ad("n4"))
        with pytest.raises(DuplicateNodeId, match="already advertises 'n4'"):
            await twin.start(replace(node_ad("n4"), data_port=8111))
    finally:
        await twin.close()
        await first.close()


async def test_find_gateway_says_what_to_do_when_none_answers(stype: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(DiscoveryError, match=r"no zmqinfer gateway answered over mDNS within 1s.*"
                                             r"Pass --gateway IP\[:PORT\]"):
        await find_gateway(1.0, LO, service_type=stype)
    assert time.monotonic() - t0 < 2.5


async def test_find_gateway_names_several_gateways(stype: str) -> None:
    a = GatewayDirectory([], LO, gateway_ad("gw-a", 8101), service_type=stype)
    b = GatewayDirectory([], LO, gateway_ad("gw-b", 9101), service_type=stype)
    try:
        await a.start()
        await b.start()
        # Both register in the background; wait until both are on the air.
        assert await wait_for(lambda: a._adv is not None and a._adv.ad is not None
                              and b._adv is not None and b._adv.ad is not None)
        with pytest.raises(DiscoveryError, match=r"several gateways advertise over mDNS \(gw-a at "
                                                 r"127\.0\.0\.1:8101, gw-b at 127\.0\.0\.1:9101\)"):
            await find_gateway(DEADLINE_S, LO, service_type=stype)
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_two_nodes_on_one_machine_each_answer_for_their_own_name(
        stype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One machine, one host name, two nodes (different ports): each ad carries its own server
    name, both found at this machine's address. Renaming the machine while they run changes
    neither name: a re-announcement keeps the node's identity."""
    monkeypatch.setattr("socket.gethostname", lambda: "raspberrypi")
    directory = GatewayDirectory([], LO, service_type=stype)
    a, b = NodePresence(LO, service_type=stype), NodePresence(LO, service_type=stype)
    try:
        await directory.start()
        await a.start(node_ad("pi-a"))
        await b.start(replace(node_ad("pi-b"), data_port=8111))
        assert await wait_for(lambda: {"pi-a", "pi-b"} <= set(directory.discovered)), directory.ignored
        found = {n: (d.host, d.addresses, d.ad.data_port) for n, d in directory.discovered.items()}
        assert found == {"pi-a": (server_name("pi-a"), LO, 8110), "pi-b": (server_name("pi-b"), LO, 8111)}
        monkeypatch.setattr("socket.gethostname", lambda: "renamed")
        await a.update(node_ad("pi-a", free=2 * GIB))  # worth re-announcing
        assert a._announcing is not None
        await asyncio.wait([a._announcing])
        assert await wait_for(lambda: directory.discovered["pi-a"].ad.mem_free == 2 * GIB)
        assert directory.discovered["pi-a"].host == server_name("pi-a") and a.error is None
    finally:
        await a.close()
        await b.close()
        await directory.close()
