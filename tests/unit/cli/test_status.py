"""The CLI's discovery flags and tables: --memory-limit sizes, `status`'s found column (and an
older gateway's rows without it), `discover`'s rows and hint. Pure functions fed dicts."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from rich.console import Console

from zmqinfer.cli.main import main
from zmqinfer.cli.status import discover_rows, discover_view, status_view
from zmqinfer.config import ConfigError, parse_size
from zmqinfer.mdns.adverts import NodeAd
from zmqinfer.mdns.discovery import Discovered
from zmqinfer.protocol.wire import NodeId

GIB, MIB = 1 << 30, 1 << 20


def text(renderable, width: int = 240) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def by_first_cell(out: str) -> dict[str, str]:
    """Table lines keyed by their first cell, box drawing removed."""
    lines = [" ".join(line.translate({ord(c): " " for c in "│┃"}).split()) for line in out.splitlines()]
    return {line.split()[0]: line for line in lines if line}


@pytest.mark.parametrize("given,expected", [
    ("1048576", MIB), ("450M", 450 * MIB), ("450m", 450 * MIB), ("1.5G", 3 * GIB // 2),
    ("512MiB", 512 * MIB), ("2GB", 2 * 10**9), ("64k", 64 << 10), ("1 GiB", GIB), ("1T", 1 << 40),
    ("100b", 100),
])
def test_sizes(given: str, expected: int) -> None:
    assert parse_size(given, "--memory-limit") == expected


@pytest.mark.parametrize("bad", ["", "lots", "1.5X", "G", "-1G", "0", "0.1", "1iB", "12 MiBs"])
def test_bad_sizes_name_the_flag(bad: str) -> None:
    with pytest.raises(ConfigError, match="--memory-limit"):
        parse_size(bad, "--memory-limit")


def test_a_bad_flag_value_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--name", "n1", "--gateway", "10.0.0.1", "--memory-limit", "lots"]) == 2
    assert "--memory-limit 'lots'" in capsys.readouterr().err
    assert main(["node", "--name", "n1", "--gateway", "10.0.0.1", "--interface", "eth0"]) == 2
    assert "--interface 'eth0' is not an IP address" in capsys.readouterr().err


STATUS = {"model": "m", "n_layers": 30, "epoch": 3, "ready": True, "nodes": [
    {"name": "n1", "address": "10.0.0.2", "data_port": 8110, "layers": [0, 15], "health": "ok",
     "last_heartbeat_s": 0.2, "device": "cpu (Linux x86_64, 2 cores)", "rss_bytes": 300 * MIB,
     "shard_bytes": 200 * MIB, "busy_fraction": 0.5, "found_by": "mdns", "detail": "mdns ad"},
    {"name": "n4", "address": "10.1.0.2", "data_port": 8110, "layers": [15, 30], "health": "ok",
     "last_heartbeat_s": 0.1, "found_by": "static", "detail": "nodes.toml address"},
    {"name": "old", "address": "10.0.0.9", "data_port": 8110, "layers": None, "health": "idle",
     "found_by": "mdns", "detail": "mdns ad", "refused": "speaks protocol 'zmqinfer/0', this gateway speaks 'zmqinfer/5'"},
]}


def test_status_shows_how_each_node_was_found() -> None:
    rows = by_first_cell(text(status_view(STATUS)))
    assert "found" in rows["node"]
    assert " mdns " in rows["n1"] and "[0,15)" in rows["n1"] and "10.0.0.2:8110" in rows["n1"]
    assert "static (nodes.toml address)" in rows["n4"] and "[15,30)" in rows["n4"]
    assert "refused: speaks protocol 'zmqinfer/0'" in rows["old"]


def test_an_80_column_terminal_still_shows_each_nodes_health() -> None:
    out = text(status_view(STATUS), width=80)
    assert max(len(line) for line in out.splitlines()) <= 80
    n4 = by_first_cell(out)["n4"]
    assert "[15,30)" in n4 and " ok " in n4  # not squeezed out by the wide columns
    assert "refused:" in by_first_cell(out)["old"]


def test_status_of_an_older_gateway_still_renders() -> None:
    old = {"model": "m", "n_layers": 30, "epoch": 1, "ready": False, "reason": "waiting",
           "nodes": [{"name": "n1", "address": "10.0.0.2", "data_port": 8110, "layers": [0, 30],
                      "health": "ok", "last_heartbeat_s": 0.3, "busy_fraction": 0.0}]}
    out = text(status_view(old))
    assert "not ready: waiting" in out
    n1 = by_first_cell(out)["n1"]
    assert "[0,30)" in n1 and " - " in n1


AD = NodeAd(NodeId("n1"), 8110, 16 * GIB, 12 * GIB, "cpu (Linux x86_64, 2 cores)", fingerprint="ab" * 8)


def test_discover_lists_nodes_and_gateways_and_refusals() -> None:
    found = [Discovered(AD, ("10.0.0.2",), 0.0, "n1._zmqinfer._tcp.local.", "h1.local."),
             Discovered(replace(AD, node_id=NodeId("gw"), role="gateway", control_port=8101,
                                data_port=8102, fingerprint=""), ("10.0.0.1",), 0.0),
             Discovered(replace(AD, node_id=NodeId("old"), protocol="zmqinfer/0"), ("10.0.0.9",), 0.0)]
    rows = discover_rows(found)
    assert rows[0] == {"id": "n1", "role": "node", "addresses": ["10.0.0.2"], "data_port": 8110,
                       "control_port": None, "mem_total": 16 * GIB, "mem_free": 12 * GIB,
                       "device": "cpu (Linux x86_64, 2 cores)", "fingerprint": "ab" * 8,
                       "protocol": "zmqinfer/5", "host": "h1.local.", "refused": None}
    assert rows[1]["role"] == "gateway" and rows[1]["control_port"] == 8101
    assert "protocol 'zmqinfer/0'" in rows[2]["refused"]
    out = text(discover_view(rows, {"junk._zmqinfer._tcp.local.": "malformed ad: id='x y'"}, 3))
    lines = by_first_cell(out)
    assert "10.0.0.2" in lines["n1"] and "12.0 GiB / 16.0 GiB" in lines["n1"] and "abababababab" in lines["n1"]
    assert "data 8102, control 8101" in lines["gw"]
    assert "refused, speaks protocol 'zmqinfer/0'" in lines["old"]
    assert "ignored junk._zmqinfer._tcp.local.: malformed ad: id='x y'" in out
    # Text from the LAN is shown as sent, never interpreted as markup.
    evil = discover_rows([Discovered(replace(AD, device="[bold]x[/bold]"), ("10.0.0.3",), 0.0)])
    assert "[bold]x[/bold]" in text(discover_view(evil, {}, 3))


def test_discover_with_nothing_found_says_what_to_check() -> None:
    out = " ".join(text(discover_view([], {}, 3)).split())
    assert "Nothing advertises _zmqinfer._tcp here (browsed 3s)" in out
    assert "multicast" in out and "firewall" in out and 'address = "IP"' in out
