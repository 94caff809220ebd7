"""The gateway's membership table: who may join (nodes.toml, mDNS, refusals), who is alive (beats,
Bye), what each offers a plan (capacity, pins), and what /cluster/status shows."""

from __future__ import annotations

import dataclasses

import pytest

from zmqinfer.config import NodeSpec
from zmqinfer.gateway.membership import MEMORY_QUANTUM, Membership
from zmqinfer.gateway.placement import NodeCapacity, Placement
from zmqinfer.liveness import Liveness
from zmqinfer.mdns.adverts import NodeAd
from zmqinfer.mdns.discovery import Discovered
from zmqinfer.protocol.wire import Epoch, Heartbeat, Loaded, NodeId

FP = "ab" * 8
MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Tests about other things beat from a host holding every address they use, so that none is
# refused for its address; the address cross-check has tests of its own below.
EVERY_ADDRESS = tuple(f"10.0.0.{i}" for i in range(1, 12))


def beat(name: str, *, free: int = 256 * MIB, pid: int = 100, epoch: int = 0, loaded: bool = False,
         busy: float = 0.0, port: int = 9000, addresses: tuple[str, ...] = EVERY_ADDRESS) -> Heartbeat:
    return Heartbeat(NodeId(name), port, 1 << 30, free, "cpu", pid, Epoch(epoch), loaded, 64 * MIB, busy, 0,
                     addresses)


def ad(name: str, *, fp: str = FP, protocol: str | None = None, role: str = "node",
       port: int = 9100) -> NodeAd:
    a = NodeAd(NodeId(name), port, 1 << 30, 512 * MIB, "gpu", fp, role=role)  # type: ignore[arg-type]
    return dataclasses.replace(a, protocol=protocol) if protocol is not None else a


def found(a: NodeAd, ip: str) -> Discovered:
    return Discovered(a, (ip,), 0.0, f"{a.node_id}._zmqinfer._tcp.local.")


def table(*specs: NodeSpec, counts=None) -> tuple[Membership, Clock]:
    clock = Clock()
    return Membership(list(specs), Liveness(2.0, clock), counts), clock


def spec(name: str, address: str | None = "10.0.0.1", **kw) -> NodeSpec:
    return NodeSpec(NodeId(name), address, **kw)


def test_static_nodes_in_file_order_then_mdns_only_nodes_by_name() -> None:
    mem, _ = table(spec("zeta"), spec("alpha", None))
    assert mem.order == ["zeta", "alpha"]
    mem.merge({NodeId("mike"): found(ad("mike"), "10.0.0.7"),
               NodeId("bravo"): found(ad("bravo"), "10.0.0.8"),
               NodeId("alpha"): found(ad("alpha"), "10.0.0.9"),
               NodeId("gw"): found(ad("gw", role="gateway"), "10.0.0.10")}, {}, FP)
    assert mem.order == ["zeta", "alpha", "bravo", "mike"]  # gateways are not members
    assert mem.members[NodeId("alpha")].address == "10.0.0.9"  # its own ad beats no address
    assert mem.members[NodeId("alpha")].found_by == "mdns"
    assert mem.members[NodeId("zeta")].found_by == "static"
    assert mem.members[NodeId("bravo")].spec is None
    # Merging again (a node found later) appends; nothing already known moves.
    mem.merge({NodeId("aardvark"): found(ad("aardvark"), "10.0.0.11")}, {}, FP)
    assert mem.order == ["zeta", "alpha", "bravo", "mike", "aardvark"]
    # An mDNS-only node no longer advertised keeps its row and its last address.
    assert mem.members[NodeId("mike")].address == "10.0.0.7"
    assert [m.name for m in mem.expected()] == ["zeta", "alpha", "bravo", "mike", "aardvark"]


def test_a_node_neither_listed_nor_discovered_is_ignored() -> None:
    mem, _ = table(spec("a"))
    assert mem.on_beat(NodeId("stranger"), beat("stranger"), "10.9.9.9") is None
    assert "stranger" not in mem.members
    assert not mem.live.alive(NodeId("stranger"))
    assert [r["name"] for r in mem.rows([], Epoch(0))] == ["a"]


def test_a_discovered_node_may_register() -> None:
    mem, _ = table(spec("a"))
    mem.merge({NodeId("m"): found(ad("m"), "10.0.0.7")}, {}, FP)
    m = mem.on_beat(NodeId("m"), beat("m"), "10.0.0.7")
    assert m is not None and m.name == "m"
    assert [u.name for u in mem.usable()] == ["m"]


def test_refused_ads_are_not_usable_and_say_why() -> None:
    mem, _ = table(spec("a"))
    mem.merge({NodeId("old"): found(ad("old", protocol="zmqinfer/0"), "10.0.0.7"),
               NodeId("other"): found(ad("other", fp="cd" * 8), "10.0.0.8"),
               NodeId("a"): found(ad("a", fp="ef" * 8), "10.0.0.9"),  # listed, but another model
               NodeId("fresh"): found(ad("fresh", fp=""), "10.0.0.10")}, {}, FP)  # no model yet: fine
    for name in ("old", "other", "a", "fresh"):
        assert mem.on_beat(NodeId(name), beat(name), None) is not None
    assert [m.name for m in mem.usable()] == ["fresh"]
    assert [m.name for m in mem.expected()] == ["fresh"]  # a first plan does not wait for them
    health = {r["name"]: r["health"] for r in mem.rows([], Epoch(0))}
    assert health["old"].startswith("refused: speaks protocol 'zmqinfer/0'")
    assert health["other"].startswith("refused: serves model " + "cd" * 8)
    assert health["a"].startswith("refused: serves model " + "ef" * 8)
    refused = {r["name"]: r["refused"] for r in mem.rows([], Epoch(0))}
    assert refused["fresh"] is None and refused["old"] is not None
    # Refused is not dead: they beat (alive), and the row says why they get no layers.
    assert all(r["alive"] for r in mem.rows([], Epoch(0)) if r["refused"])


def test_capacity_is_free_plus_shard_rounded_down_to_the_quantum() -> None:
    mem, _ = table(spec("a"), spec("b"))
    a = mem.on_beat(NodeId("a"), beat("a", free=100 * MIB + 12345), None)
    b = mem.on_beat(NodeId("b"), beat("b", free=5 * MEMORY_QUANTUM - 1), None)
    assert a is not None and b is not None
    mem.on_loaded(a, Loaded(Epoch(7), NodeId("a"), True, "", FP, 30 * MIB, 0, 0.1))
    assert a.shard_bytes == 30 * MIB
    caps = mem.capacity(mem.usable())
    assert caps == [NodeCapacity(NodeId("a"), 128 * MIB, None),  # 130 MiB + 12345 -> 128 MiB
                    NodeCapacity(NodeId("b"), 4 * MEMORY_QUANTUM, None)]
    assert all(c.free_bytes % MEMORY_QUANTUM == 0 for c in caps)


def test_a_failed_load_holds_nothing() -> None:
    mem, _ = table(spec("a"))
    a = mem.on_beat(NodeId("a"), beat("a"), None)
    assert a is not None
    mem.on_loaded(a, Loaded(Epoch(7), NodeId("a"), True, "", FP, 30 * MIB, 0, 0.1))
    mem.on_loaded(a, Loaded(Epoch(8), NodeId("a"), False, "out of memory", FP, 30 * MIB, 0, 0.1))
    assert a.shard_bytes == 0
    assert a.beat is not None and a.beat.epoch == 8 and not a.beat.loaded


def test_pins_hold_only_while_every_pinned_node_is_in_the_set() -> None:
    mem, _ = table(spec("a", layers=2), spec("b"), spec("c", layer_range=(4, 6), layers=2))
    for n in "abc":
        mem.on_beat(NodeId(n), beat(n), None)
    every = mem.capacity(mem.usable())
    assert [c.pinned for c in every] == [2, None, (4, 6)]
    without_b = mem.capacity([m for m in mem.usable() if m.name != "b"])
    assert [c.pinned for c in without_b] == [2, (4, 6)]  # b was not pinned: pins stay
    without_c = mem.capacity([m for m in mem.usable() if m.name != "c"])
    assert [c.pinned for c in without_c] == [None, None]  # a pinned node is missing: all free


def test_counts_override_nodes_toml_pins() -> None:
    mem, _ = table(spec("a", layers=2), spec("b"), counts=[None, 3])
    for n in "ab":
        mem.on_beat(NodeId(n), beat(n), None)
    assert [c.pinned for c in mem.capacity(mem.usable())] == [2, 3]


def test_a_new_process_or_an_unassigned_beat_holds_no_shard() -> None:
    mem, clock = table(spec("a"))
    a = mem.on_beat(NodeId("a"), beat("a", pid=100), None)
    assert a is not None
    mem.on_loaded(a, Loaded(Epoch(7), NodeId("a"), True, "", FP, 30 * MIB, 0, 0.1))
    mem.on_beat(NodeId("a"), beat("a", pid=100, epoch=7, loaded=True), None)
    assert a.shard_bytes == 30 * MIB  # same process, still serving: keeps it
    mem.on_beat(NodeId("a"), beat("a", pid=101, epoch=7, loaded=True), None)
    assert a.shard_bytes == 0  # a restarted process holds nothing yet
    mem.on_loaded(a, Loaded(Epoch(8), NodeId("a"), True, "", FP, 30 * MIB, 0, 0.1))
    assert a.shard_bytes == 30 * MIB
    mem.on_beat(NodeId("a"), beat("a", pid=101, epoch=0), None)
    assert a.shard_bytes == 0  # serves no epoch: dropped its stage


def test_busy_fraction_from_consecutive_beats_of_one_process() -> None:
    mem, clock = table(spec("a"))
    mem.on_beat(NodeId("a"), beat("a", busy=10.0), None)
    clock.now += 1.0
    a = mem.on_beat(NodeId("a"), beat("a", busy=10.25), None)
    assert a is not None and a.busy_fraction == 0.25
    clock.now += 1.0
    mem.on_beat(NodeId("a"), beat("a", busy=99.0), None)
    assert a.busy_fraction == 1.0  # clamped
    clock.now += 1.0
    mem.on_beat(NodeId("a"), beat("a", pid=5, busy=0.0), None)
    assert a.busy_fraction == 1.0  # another process: no difference taken across it


def test_bye_without_draining_is_dead_at_once_and_a_beat_brings_it_back() -> None:
    mem, clock = table(spec("a"), spec("b"))
    a = mem.on_beat(NodeId("a"), beat("a"), None)
    mem.on_beat(NodeId("b"), beat("b"), None)
    assert a is not None
    mem.on_bye(a, "shutdown", draining=False)
    assert not mem.live.alive(NodeId("a")) and not mem.alive(a)
    assert [m.name for m in mem.usable()] == ["b"]
    assert mem.health(a, Epoch(0)) == "left (shutdown)"
    clock.now += 0.5
    mem.on_beat(NodeId("a"), beat("a", pid=200), None)  # restarted: a member again
    assert a.left is None and mem.alive(a)
    assert [m.name for m in mem.usable()] == ["a", "b"]


def test_bye_draining_stays_alive_but_is_not_usable() -> None:
    mem, clock = table(spec("a"), spec("b"))
    a = mem.on_beat(NodeId("a"), beat("a", epoch=5, loaded=True), None)
    mem.on_beat(NodeId("b"), beat("b", epoch=5, loaded=True), None)
    assert a is not None
    mem.on_bye(a, "SIGTERM", draining=True)
    assert mem.live.alive(NodeId("a"))  # keeps serving the old ring until re-planned
    assert not mem.alive(a)
    assert [m.name for m in mem.usable()] == ["b"]
    assert mem.health(a, Epoch(5)) == "draining (SIGTERM)"
    clock.now += 0.5
    mem.on_beat(NodeId("a"), beat("a", epoch=5, loaded=True), None)  # its beats go on
    assert a.left == "SIGTERM" and a.draining and not mem.alive(a)
    clock.now += 5.0  # then it goes
    assert mem.health(a, Epoch(5)) == "left (SIGTERM)"


def test_health_messages() -> None:
    mem, clock = table(spec("a"))
    a = mem.members[NodeId("a")]
    assert mem.health(a, Epoch(5)) == "has not registered (no heartbeat yet)"
    mem.on_beat(NodeId("a"), beat("a", epoch=0), None)
    assert mem.health(a, Epoch(5)) == "restarted (serves no epoch)"
    mem.on_beat(NodeId("a"), beat("a", epoch=4, loaded=True), None)
    assert mem.health(a, Epoch(5)) == "serves epoch 4"
    mem.on_beat(NodeId("a"), beat("a", epoch=5, loaded=False), None)
    assert mem.health(a, Epoch(5)) == "loading"
    mem.on_beat(NodeId("a"), beat("a", epoch=5, loaded=True), None)
    assert mem.health(a, Epoch(5)) == "ok"
    clock.now += 3.25
    assert mem.health(a, Epoch(5)) == "stopped sending heartbeats 3.2s ago"
    assert mem.describe([a], Epoch(5)) == "a (10.0.0.1) stopped sending heartbeats 3.2s ago"


def test_rows_for_cluster_status() -> None:
    mem, clock = table(spec("a", "10.0.0.1", port=9001), spec("b", None, port=9002))
    mem.merge({NodeId("m"): found(ad("m", port=9100), "10.0.0.7")}, {}, FP)
    a = mem.on_beat(NodeId("a"), beat("a", epoch=5, loaded=True, port=9001), "10.0.0.1")
    assert a is not None
    mem.on_loaded(a, Loaded(Epoch(5), NodeId("a"), True, "", FP, 48 * MIB, 0, 0.1))
    mem.on_beat(NodeId("m"), beat("m", epoch=5, loaded=True, port=9100), "10.0.0.7")
    clock.now += 0.5
    rows = {r["name"]: r for r in mem.rows([Placement(NodeId("a"), 0, 3), Placement(NodeId("m"), 3, 6)],
                                           Epoch(5))}
    assert list(rows) == ["a", "b", "m"]
    ra, rb, rm = rows["a"], rows["b"], rows["m"]
    assert (ra["found_by"], ra["detail"], ra["refused"], ra["layers"], ra["alive"]) == \
        ("static", "nodes.toml address", None, [0, 3], True)
    assert ra["health"] == "ok" and ra["last_heartbeat_s"] == 0.5 and ra["shard_bytes"] == 48 * MIB
    assert ra["address"] == "10.0.0.1" and ra["data_port"] == 9001 and ra["pid"] == 100
    assert (rb["found_by"], rb["detail"], rb["layers"], rb["alive"]) == \
        ("static", "address of its control connection", None, False)
    assert rb["last_heartbeat_s"] is None and rb["data_port"] == 9002 and rb["pid"] is None
    assert rb["health"] == "has not registered (no heartbeat yet)" and rb["address"] is None
    assert (rm["found_by"], rm["detail"], rm["layers"], rm["alive"], rm["address"]) == \
        ("mdns", "mdns ad", [3, 6], True, "10.0.0.7")
    assert rm["shard_bytes"] is None  # nothing reported loaded
    # An address-less static node takes the address its control connection came from.
    mem.on_beat(NodeId("b"), beat("b"), "10.0.0.2")
    assert mem.rows([], Epoch(5))[1]["address"] == "10.0.0.2"


# ---- the data address must be one the node itself reports ------------------------------------

def test_nodes_mdns_puts_at_one_address_are_refused_but_the_one_that_is_there() -> None:
    """Issue 14: three machines with one host name; mDNS says n1, n2 and n3 are all at n1's IP.
    Each node's beat lists its own addresses: only n1 is confirmed; the others are refused with
    the reason in status, so the ring is never wired to the wrong machine."""
    mem, _ = table()
    mem.merge({NodeId(n): found(ad(n), "10.0.0.1") for n in ("n1", "n2", "n3")}, {}, FP)
    for i, n in enumerate(("n1", "n2", "n3"), start=1):
        assert mem.members[NodeId(n)].refused is None  # nothing to compare before a beat
        mem.on_beat(NodeId(n), beat(n, addresses=(f"10.0.0.{i}", "127.0.0.1")), f"10.0.0.{i}")
    assert [m.name for m in mem.usable()] == ["n1"]
    assert [m.name for m in mem.expected()] == ["n1"]  # a first plan does not wait for them
    rows = {r["name"]: r for r in mem.rows([], Epoch(0))}
    assert rows["n1"]["refused"] is None and rows["n1"]["address"] == "10.0.0.1"
    assert rows["n2"]["refused"] == ("cannot confirm its data address: mdns ad says 10.0.0.1, "
                                     "the node reports 10.0.0.2, 127.0.0.1")
    assert rows["n3"]["health"].startswith("refused: cannot confirm its data address")
    assert rows["n3"]["alive"]  # refused is not dead: it beats, and the row says why it is idle
    # Discovery corrected (unique server names): the same beats now confirm every node.
    mem.merge({NodeId(n): found(ad(n), f"10.0.0.{i}") for i, n in enumerate(("n1", "n2", "n3"), 1)}, {}, FP)
    assert [m.name for m in mem.usable()] == ["n1", "n2", "n3"]


def test_the_first_advertised_address_the_node_confirms_is_used() -> None:
    mem, _ = table()
    multi = Discovered(ad("m"), ("192.168.7.5", "10.0.0.2"), 0.0, "m._zmqinfer._tcp.local.")
    mem.merge({NodeId("m"): multi}, {}, FP)
    m = mem.on_beat(NodeId("m"), beat("m", addresses=("127.0.0.1", "10.0.0.2")), "10.0.0.2")
    assert m is not None and m.refused is None and m.address == "10.0.0.2"
    assert [u.name for u in mem.usable()] == ["m"]
    # It moves (DHCP): its next beat no longer lists any advertised address.
    mem.on_beat(NodeId("m"), beat("m", addresses=("10.0.0.9",)), "10.0.0.9")
    assert mem.usable() == [] and "says 192.168.7.5, 10.0.0.2" in (m.refused or "")


def test_two_nodes_on_one_machine_share_its_address() -> None:
    mem, _ = table()
    mem.merge({NodeId("a"): found(ad("a", port=9100), "10.0.0.4"),
               NodeId("b"): found(ad("b", port=9101), "10.0.0.4")}, {}, FP)
    mem.on_beat(NodeId("a"), beat("a", port=9100, addresses=("10.0.0.4",)), "10.0.0.4")
    mem.on_beat(NodeId("b"), beat("b", port=9101, addresses=("10.0.0.4",)), "10.0.0.4")
    rows = [(r["name"], r["address"], r["data_port"], r["refused"]) for r in mem.rows([], Epoch(0))]
    assert rows == [("a", "10.0.0.4", 9100, None), ("b", "10.0.0.4", 9101, None)]


def test_static_addresses_are_checked_too() -> None:
    mem, _ = table(spec("s", "10.0.0.5"), spec("p", None))
    mem.on_beat(NodeId("s"), beat("s", addresses=("10.0.0.6",)), "10.0.0.6")
    mem.on_beat(NodeId("p"), beat("p", addresses=("10.0.0.8",)), "10.0.0.8")  # its control peer
    s, p = mem.members[NodeId("s")], mem.members[NodeId("p")]
    assert s.refused == ("cannot confirm its data address: nodes.toml address says 10.0.0.5, "
                         "the node reports 10.0.0.6")
    assert p.refused is None and p.address == "10.0.0.8"
    assert [m.name for m in mem.usable()] == ["p"]
    mem.on_beat(NodeId("p"), beat("p", addresses=("10.0.0.9",)), "172.16.0.1")  # behind a NAT
    assert "address of its control connection says 172.16.0.1" in (p.refused or "")


def test_what_a_node_reports_is_bounded_in_the_reason() -> None:
    mem, _ = table(spec("s", "10.0.0.5"))
    junk = ("not-an-ip", "x" * 5000, *(f"10.1.0.{i}" for i in range(100)))
    mem.on_beat(NodeId("s"), beat("s", addresses=junk), None)
    reason = mem.members[NodeId("s")].refused or ""
    assert reason.endswith("the node reports " + ", ".join(f"10.1.0.{i}" for i in range(6)))
    assert "x" * 10 not in reason and "not-an-ip" not in reason and len(reason) < 300
    mem.on_beat(NodeId("s"), beat("s", addresses=()), None)
    assert (mem.members[NodeId("s")].refused or "").endswith("the node reports no address")


def test_token_rate_and_step_time_from_consecutive_beats() -> None:
    mem, clock = table(spec("a"))
    first = dataclasses.replace(beat("a", busy=10.0), steps=100, tokens=1000, kv_bytes=3 * MIB, layers=10)
    a = mem.on_beat(NodeId("a"), first, None)
    assert a is not None and a.tokens_per_s == 0.0 and a.step_s is None
    clock.now += 2.0
    mem.on_beat(NodeId("a"), dataclasses.replace(first, busy_seconds=10.5, steps=110, tokens=1060), None)
    assert a.tokens_per_s == 30.0 and a.step_s == pytest.approx(0.05)
    row = mem.rows([], Epoch(0))[0]
    assert (row["tokens_per_s"], row["step_s"], row["steps"], row["tokens"]) == (30.0, 0.05, 110, 1060)
    assert (row["kv_bytes"], row["layers_held"], row["gpu_utilization"], row["accel_memory_bytes"]) == \
        (3 * MIB, 10, None, None)  # no reading from its platform: absent, not 0
    clock.now += 1.0
    mem.on_beat(NodeId("a"), dataclasses.replace(first, busy_seconds=10.5, steps=110, tokens=1060), None)
    assert a.tokens_per_s == 0.0 and a.step_s is None  # idle: no step to time
