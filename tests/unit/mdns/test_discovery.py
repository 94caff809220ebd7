"""Discovery without sockets: the TXT codec, re-announce rule, address choice, the browser's
table bookkeeping, membership merging and refusals. Real multicast is in tests/netns."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from zeroconf import ServiceStateChange

from zmqinfer.config import LOCAL_HOST, NodeSpec
from zmqinfer.gateway.membership import merge_members
from zmqinfer.mdns import discovery
from zmqinfer.mdns.adverts import (
    MAX_TXT_BYTES,
    PROTOCOL,
    AdError,
    NodeAd,
    refusal,
    server_name,
    worth_reannouncing,
)
from zmqinfer.mdns.discovery import (
    Advertiser,
    Browser,
    Discovered,
    DiscoveryError,
    resolve_local_name,
)
from zmqinfer.protocol.wire import NodeId

GIB = 1 << 30
KEY = "rq:rA]ez#iRz!l4o^X8Dw6G@dm*NYI!mEXK+/E4a"  # a Z85 CurveZMQ public key (40 chars)
AD = NodeAd(NodeId("mini2"), 8110, 16 * GIB, 12 * GIB, "gpu (Darwin arm64, 10 cores)",
            fingerprint="0123456789abcdef")


def raw(props: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in props.items()}


def test_ad_round_trips_through_txt() -> None:
    for ad in (AD, replace(AD, pubkey=KEY), replace(AD, role="gateway", control_port=8101),
               replace(AD, fingerprint="", node_id=NodeId("mini2.local"))):
        txt = ad.to_txt()
        assert all(isinstance(v, str) for v in txt.values())
        assert NodeAd.from_txt(raw(txt)) == ad
    assert AD.to_txt()["proto"] == PROTOCOL == "zmqinfer/5"


def test_the_ads_server_name_is_the_node_ids_not_the_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Machines cloned from one image share a host name; an SRV target taken from it made every
    node's A records answer for one name (all nodes found at one address). The target is
    derived from the node id only: valid, unique per id, stable, blind to the host name."""
    monkeypatch.setattr("socket.gethostname", lambda: "raspberrypi")
    assert server_name("n1") == "zq-n1-676b8bb8.local."  # the format is what users see in discover
    ids = ["n1", "n2", "n3", "N1", "a.b", "a_b", "a-b", "mini2.local", "x" * 63, "-_-", "9"]
    names = [server_name(i) for i in ids]
    assert len(set(names)) == len(ids), names  # ids that slug alike still differ by digest
    for name in names:
        assert LOCAL_HOST.fullmatch(name.removesuffix(".")) and len(name.split(".")[0]) <= 63, name
    monkeypatch.setattr("socket.gethostname", lambda: "renamed-while-running")
    assert [server_name(i) for i in ids] == names
    assert all("raspberrypi" not in n for n in names)


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    assert NodeAd.from_txt(raw({**AD.to_txt(), "future": "x", "gpu": "M5"})) == AD
    assert NodeAd.from_txt({**raw(AD.to_txt()), b"flag": None}) == AD


@pytest.mark.parametrize("change,match", [
    ({"id": None}, "not a zmqinfer ad"),
    ({"proto": None}, "not a zmqinfer ad"),
    ({"id": "bad id!"}, "id='bad id!'"),
    ({"id": "x" * 64}, "id="),
    ({"dport": "0"}, "dport='0'"),
    ({"dport": "70000"}, "dport"),
    ({"dport": None}, "dport=None"),
    ({"dport": "-5"}, "dport"),
    ({"mem": "lots"}, "mem="),
    ({"free": str(17 * GIB)}, "exceeds total"),
    ({"fp": "XYZ"}, "fp="),
    ({"pk": "short"}, "pk="),
    ({"role": "admin"}, "role="),
    ({"dev": "tab\there"}, "dev="),
    ({"cport": "x"}, "cport="),
])
def test_malformed_ads_are_refused_with_the_reason(change, match) -> None:
    props = {k: v for k, v in {**AD.to_txt(), **change}.items() if v is not None}
    with pytest.raises(AdError, match=match):
        NodeAd.from_txt(raw(props))


def test_size_and_encoding_limits() -> None:
    with pytest.raises(AdError, match=f"exceeds {MAX_TXT_BYTES}"):
        NodeAd.from_txt(raw({**AD.to_txt(), **{f"k{i}": "v" * 200 for i in range(6)}}))
    with pytest.raises(AdError, match="not ASCII"):
        NodeAd.from_txt({**raw(AD.to_txt()), b"dev": "Gerät".encode()})
    # An over-long value cannot be a DNS character-string we sent: skipped, then missing.
    with pytest.raises(AdError, match="not a zmqinfer ad"):
        NodeAd.from_txt({**raw(AD.to_txt()), b"id": b"a" * 300})


def test_a_node_cannot_advertise_an_invalid_ad() -> None:
    with pytest.raises(AdError):
        replace(AD, device="x" * 200).to_txt()
    with pytest.raises(AdError):
        replace(AD, data_port=0).to_txt()


def test_reannounce_only_when_it_matters() -> None:
    assert not worth_reannouncing(AD, AD)
    assert not worth_reannouncing(AD, replace(AD, mem_free=AD.mem_free - GIB // 2))  # 3% of 16 GiB
    assert worth_reannouncing(AD, replace(AD, mem_free=AD.mem_free - GIB))  # 6%
    assert worth_reannouncing(AD, replace(AD, fingerprint=""))
    assert worth_reannouncing(AD, replace(AD, data_port=8111))
    assert worth_reannouncing(AD, replace(AD, pubkey=KEY))


def test_addresses_are_literals_nearest_first() -> None:
    import ipaddress

    pick = discovery._ipv4s
    near = [ipaddress.IPv4Network("10.0.0.0/16")]
    assert pick(["192.168.1.12", "10.0.7.5"], near) == ("10.0.7.5", "192.168.1.12")
    assert pick(["127.0.0.1", "169.254.3.3", "192.168.1.12"]) == ("192.168.1.12", "127.0.0.1", "169.254.3.3")
    assert pick(["mini2.local", "fe80::1", "10.0.0.5", "10.0.0.5"]) == ("10.0.0.5",)


async def test_local_names_only_and_never_the_system_resolver() -> None:
    # Rejected before any socket exists: a non-.local name is never looked up anywhere.
    for name in ("example.com", "mini2", "10.0.0.1", "bad_name.local", ".local"):
        with pytest.raises(ValueError, match="not a .local host name"):
            await resolve_local_name(None, name, 0.1)  # type: ignore[arg-type]


async def test_advertiser_refuses_bad_input_before_opening_sockets() -> None:
    adv = Advertiser()
    with pytest.raises(DiscoveryError, match="IPv4 literals"):
        await adv.start(AD, ["mini2.local"])
    assert adv.aiozc is None
    with pytest.raises(DiscoveryError, match="before start"):
        await adv.update(AD)
    await adv.close()  # closing what never started is fine


async def test_browser_table_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state machine around resolves, with the resolve itself stubbed: Added -> resolve ->
    table; Updated -> re-resolve; a malformed ad -> ignored with a reason; Removed -> gone."""
    answers: dict[str, NodeAd | str] = {}

    async def fake_resolve(self: Browser, name: str) -> None:
        await asyncio.sleep(0)
        a = answers[name]
        if isinstance(a, str):
            return self._ignore(name, a)
        self._ids[name] = a.node_id
        self.table[a.node_id] = Discovered(a, ("10.0.0.2",), 0.0, name)
        self._changed()

    monkeypatch.setattr(Browser, "_resolve", fake_resolve)
    changes: list[int] = []
    b = Browser(on_change=lambda: changes.append(len(b.table)))
    st = ServiceStateChange

    def event(name: str, change: ServiceStateChange) -> None:
        b._on_state_change(zeroconf=None, service_type=discovery.SERVICE_TYPE, name=name,  # type: ignore[arg-type]
                           state_change=change)

    answers["mini2._zmqinfer._tcp.local."] = AD
    answers["junk._zmqinfer._tcp.local."] = "malformed ad: id='bad id!'"
    event("mini2._zmqinfer._tcp.local.", st.Added)
    event("junk._zmqinfer._tcp.local.", st.Added)
    assert await b.wait_until(lambda t: "mini2" in t, 1.0)
    await asyncio.sleep(0.01)
    assert b.ignored == {"junk._zmqinfer._tcp.local.": "malformed ad: id='bad id!'"}
    answers["mini2._zmqinfer._tcp.local."] = replace(AD, mem_free=GIB)
    event("mini2._zmqinfer._tcp.local.", st.Updated)
    assert await b.wait_until(lambda t: t["mini2"].ad.mem_free == GIB, 1.0)
    event("mini2._zmqinfer._tcp.local.", st.Removed)
    event("junk._zmqinfer._tcp.local.", st.Removed)
    assert b.table == {} and b.ignored == {}
    assert changes == [1, 1, 0]
    assert not await b.wait_until(lambda t: "mini2" in t, 0.05)  # the deadline holds
    await b.close()
    assert b._tasks == {}


def test_refusal_reasons() -> None:
    assert refusal(AD, PROTOCOL, "0123456789abcdef") is None
    assert refusal(AD, PROTOCOL, "") is None  # the gateway does not know yet
    assert refusal(replace(AD, fingerprint=""), PROTOCOL, "ffff") is None  # nothing loaded yet
    assert "protocol 'zmqinfer/1'" in (refusal(replace(AD, protocol="zmqinfer/1")) or "")
    assert "serves model 0123456789abcdef" in (refusal(AD, PROTOCOL, "ffff") or "")


def found(ad: NodeAd, ip: str) -> Discovered:
    return Discovered(ad, (ip,), 0.0, f"{ad.node_id}.{discovery.SERVICE_TYPE}")


def test_merge_static_and_discovered_into_one_table() -> None:
    static = [NodeSpec(NodeId("mini1"), "192.168.1.11"),  # listed with an address, also advertises
              NodeSpec(NodeId("mini4"), "192.168.9.14", port=8114),  # multicast blocked
              NodeSpec(NodeId("mini2.local"), host="mini2.local"),  # a .local name, resolved
              NodeSpec(NodeId("mini5"), host="mini5.local"),  # not resolved (yet)
              NodeSpec(NodeId("mini6"))]  # address from its control connection
    seen = {NodeId("mini1"): found(replace(AD, node_id=NodeId("mini1")), "192.168.1.21"),
            NodeId("mini3"): found(replace(AD, node_id=NodeId("mini3")), "192.168.1.13"),
            NodeId("old"): found(replace(AD, node_id=NodeId("old"), protocol="zmqinfer/0"), "192.168.1.30"),
            NodeId("gw"): found(replace(AD, node_id=NodeId("gw"), role="gateway"), "192.168.1.10")}
    rows = merge_members(static, seen, resolved_hosts={"mini2.local": "192.168.1.12"})
    table = {r.name: (r.address, r.data_port, r.found_by, r.listed, r.refused is None) for r in rows}
    assert [r.name for r in rows] == ["mini1", "mini4", "mini2.local", "mini5", "mini6", "mini3", "old"]
    assert table == {
        "mini1": ("192.168.1.21", 8110, "mdns", True, True),  # its fresh ad beats the file
        "mini4": ("192.168.9.14", 8114, "static", True, True),
        "mini2.local": ("192.168.1.12", 8110, "mdns", True, True),
        "mini5": (None, 8110, "static", True, True),
        "mini6": (None, 8110, "static", True, True),
        "mini3": ("192.168.1.13", 8110, "mdns", False, True),
        "old": ("192.168.1.30", 8110, "mdns", False, False),
    }
    details = {r.name: r.detail for r in rows}
    assert details["mini2.local"] == "mini2.local via mdns"
    assert details["mini5"] == "mini5.local not resolved yet"
    assert "protocol" in (next(r for r in rows if r.name == "old").refused or "")
