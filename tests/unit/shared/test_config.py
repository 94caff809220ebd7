"""nodes.toml validation: every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from zmqinfer.config import ConfigError, load_cluster, parse_cluster, parse_layer_counts

ROOT = Path(__file__).resolve().parents[3]


def test_shipped_nodes_toml_is_valid() -> None:
    cfg = load_cluster(ROOT / "nodes.toml")
    assert [n.name for n in cfg.nodes] == ["mini1", "mini2", "mini3"]
    assert [n.layers for n in cfg.nodes] == [10, 9, 9]
    assert cfg.model == "mlx-community/Qwen3-1.7B-8bit"
    assert cfg.gateway.port == 8100 and cfg.gateway.aliases == ("claude-*",)


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_cluster({"node": [{"name": "a", "address": "10.0.0.2"}]}, "t.toml")
    assert cfg.nodes[0].port == 8110 and cfg.nodes[0].layers is None
    assert (cfg.gateway.address, cfg.gateway.control_port) == ("127.0.0.1", 8101)


@pytest.mark.parametrize("data,match", [
    ({"nodes": []}, r"t.toml: unknown key\(s\) nodes"),
    ({"node": [{"name": "a", "adress": "1.2.3.4"}]}, r"unknown key\(s\) node\[0\].adress"),
    ({"node": [{"address": "1.2.3.4"}]}, r"node\[0\].name is required"),
    ({"node": [{"name": "a", "address": "mini2.local"}]}, "not an IP address .*zeroconf"),
    ({"node": [{"name": "a", "address": "example.com"}]}, "node\\[0\\].address 'example.com' is not an IP"),
    ({"node": [{"name": "a", "port": 70000}]}, "node\\[0\\].port 70000 is not a TCP port"),
    ({"node": [{"name": "a", "layers": 0}]}, "layers must be at least 1"),
    ({"node": [{"name": "a", "layers": "10"}]}, "layers must be int"),
    ({"node": [{"name": "a"}, {"name": "a"}]}, "duplicate node name"),
    ({"node": [{"name": "a b"}]}, "use letters"),
    ({"gateway": {"port": 8100, "control_port": 8100}}, "must differ"),
    ({"gateway": {"adress": "1.2.3.4"}}, r"gateway.adress"),
    ({"api": {"keys": [""]}}, "api.keys"),
    # model aliases: a list of names or globs, each checked, and not too many
    ({"gateway": {"aliases": "claude-*"}}, r"gateway.aliases must be a list"),
    ({"gateway": {"aliases": ["claude-*", "bad name"]}}, r"gateway.aliases\[1\] must be a model name"),
    ({"gateway": {"aliases": [5]}}, r"gateway.aliases\[0\]"),
    ({"gateway": {"aliases": ["x" * 129]}}, r"gateway.aliases\[0\]"),
    ({"gateway": {"aliases": [f"m{i}" for i in range(65)]}}, r"at most 64"),
    ({"api": {"cors_origins": "https://a.example"}}, "api.cors_origins must be a list"),
    ({"api": {"cors_origins": ["a.example"]}}, "api.cors_origins"),
    ({"model": 5}, "model must be str"),
    # host: a .local name for zeroconf, never anything the system resolver would need
    ({"node": [{"name": "a", "host": "mini2.example.com"}]}, r"node\[0\].host 'mini2.example.com' is not a .local"),
    ({"node": [{"name": "a", "host": "mini2"}]}, r"node\[0\].host"),
    ({"node": [{"name": "a", "host": "bad_name.local"}]}, r"node\[0\].host"),
    ({"node": [{"name": "a", "host": 5}]}, r"node\[0\].host must be str"),
    # layers as a [start, end) range
    ({"node": [{"name": "a", "layers": [0]}]}, r"node\[0\].layers must be a count or \[start, end\]"),
    ({"node": [{"name": "a", "layers": [0, "9"]}]}, r"node\[0\].layers must be a count"),
    ({"node": [{"name": "a", "layers": [5, 5]}]}, r"node\[0\].layers \[5, 5\] is empty"),
    ({"node": [{"name": "a", "layers": [-1, 5]}]}, r"node\[0\].layers \[-1, 5\]"),
    ({"node": [{"name": "a", "layers": [0, 10]}, {"name": "b", "layers": [9, 19]}]},
     r"t.toml: node\[0\].layers \[0, 10\] and node\[1\].layers \[9, 19\] overlap"),
    ({"node": [{"name": "a", "layers": [0, 10]}, {"name": "b", "layers": [12, 19]}]},
     r"t.toml: layers \[10, 12\) are held by no node: nothing sits between node\[0\].layers"),
    ({"node": [{"name": "a", "layers": [2, 10]}]}, r"layers \[0, 2\) are held by no node"),
    ({"node": [{"name": "z"}, {"name": "a", "layers": [10, 19]}, {"name": "b", "layers": [0, 10]}]},
     r"node\[2\].layers \[0, 10\] comes after node\[1\].layers \[10, 19\] in ring order"),
    ({"node": [{"name": "a", "layers": [0, 10]}, {"name": "b", "layers": 3}, {"name": "c", "layers": [12, 19]}]},
     r"layer counts \[3\] of the nodes between node\[0\].layers \[0, 10\] and node\[2\] must fill the 2"),
    ({"node": [{"name": "a", "layers": 1}, {"name": "b", "layers": [3, 19]}]}, r"must fill the 3 layer"),
])
def test_mistakes_name_file_and_key(data, match) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_cluster(data, "t.toml")


def test_ranges_counts_and_hosts_parse() -> None:
    cfg = parse_cluster({"node": [
        {"name": "mini1", "layers": [0, 10], "address": "192.168.1.11"},
        {"name": "mini2.local", "port": 8111},  # named like a .local host: that is its host
        {"name": "mini3", "host": "mini3.local.", "address": "192.168.1.13", "layers": 2},
        {"name": "mini4", "layers": [19, 28], "host": "studio.local"},
        {"name": "mini5"},
    ]}, "t.toml")
    by = {n.name: n for n in cfg.nodes}
    assert by["mini1"].layer_range == (0, 10) and by["mini1"].layers == 10 and by["mini1"].host is None
    assert by["mini1"].pin == (0, 10)
    assert by["mini2.local"].host == "mini2.local" and by["mini2.local"].pin is None
    assert by["mini3"].host == "mini3.local" and by["mini3"].address == "192.168.1.13"
    assert by["mini3"].pin == 2 and by["mini3"].layer_range is None
    assert by["mini4"].pin == (19, 28) and by["mini4"].host == "studio.local"
    assert by["mini5"].pin is None and by["mini5"].host is None


def test_cors_origins_parse() -> None:
    cfg = parse_cluster({"api": {"cors_origins": ["https://app.example.com/", "*"]}}, "t.toml")
    assert cfg.cors_origins == ("https://app.example.com", "*")
    assert parse_cluster({}, "t.toml").cors_origins == ()


def test_adjacent_ranges_do_not_overlap() -> None:
    cfg = parse_cluster({"node": [{"name": "a", "layers": [0, 10]}, {"name": "b", "layers": [10, 19]},
                                  {"name": "c", "layers": [19, 28]}]}, "t.toml")
    assert [n.layer_range for n in cfg.nodes] == [(0, 10), (10, 19), (19, 28)]


def test_shipped_nodes_toml_documents_every_key() -> None:
    text = (ROOT / "nodes.toml").read_text()
    for key in ("name", "address", "host", "port", "layers", "[start, end]"):
        assert key in text, key


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_cluster(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_cluster(tmp_path / "nope.toml")


def test_layer_counts() -> None:
    assert parse_layer_counts("10,9,9", 3) == [10, 9, 9]
    for text, n, match in [("10,x", 2, "comma-separated"), ("10,10", 3, "2 counts for 3"), ("0,5", 2, "at least one")]:
        with pytest.raises(ConfigError, match=match):
            parse_layer_counts(text, n)
