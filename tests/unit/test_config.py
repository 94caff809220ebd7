"""nodes.toml validation: every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from zmqinfer.config import ConfigError, load_cluster, parse_cluster, parse_layer_counts

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_nodes_toml_is_valid() -> None:
    cfg = load_cluster(ROOT / "nodes.toml")
    assert [n.name for n in cfg.nodes] == ["mini1", "mini2", "mini3"]
    assert [n.layers for n in cfg.nodes] == [10, 9, 9]
    assert cfg.model == "mlx-community/Qwen3-1.7B-8bit"
    assert cfg.gateway.port == 8100


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_cluster({"node": [{"name": "a", "address": "10.0.0.2"}]}, "t.toml")
    assert cfg.nodes[0].port == 8110 and cfg.nodes[0].layers is None
    assert cfg.gateway.control_endpoint == "tcp://127.0.0.1:8101"


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
    ({"model": 5}, "model must be str"),
])
def test_mistakes_name_file_and_key(data, match) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_cluster(data, "t.toml")


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
