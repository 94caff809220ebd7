"""nodes.toml (and CLI overrides) -> frozen dataclasses. All validation lives here.

Every mistake is reported with the file and the key that holds it, before anything starts.
Addresses must be literal IPs: a host name would go to the system resolver, and `.local` names
in particular cannot be resolved there. A node's `host` (a `.local` name) is resolved by
zeroconf itself (mdns.discovery.resolve_local_name); its `address`, when given too, is the fallback.
A node's `layers` pins either a count or a `[start, end)` range; ranges are checked for overlap,
ring order and gaps here, coverage of the model's last layer when the model is known (gateway/placement.py).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zmqinfer.protocol.wire import NodeId

DEFAULT_API_PORT = 8100
DEFAULT_CONTROL_PORT = 8101
DEFAULT_RESULT_PORT = 8102
DEFAULT_DATA_PORT = 8110
# Node ids and mDNS host names, as nodes.toml, the command line and zeroconf ads accept them
# (always with fullmatch). A node id also names its mDNS service: 63 bytes is a DNS label's limit.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# A model alias ([gateway] aliases): a name a client hard-codes ("claude-sonnet-4-5") or a glob
# of them ("claude-*"), answered by the served model. Plain name characters, `*` and `?` only.
MODEL_ALIAS = re.compile(r"[A-Za-z0-9*?][A-Za-z0-9._:/*?-]{0,127}")
MAX_ALIASES = 64  # a table longer than this is a mistake, and each request scans it
LOCAL_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+local")  # no final dot


class ConfigError(ValueError):
    """A configuration mistake; the message names the file and key."""


@dataclass(frozen=True)
class GatewaySpec:
    address: str = "127.0.0.1"  # how nodes reach the gateway's control and result ports
    bind: str = "0.0.0.0"
    port: int = DEFAULT_API_PORT
    control_port: int = DEFAULT_CONTROL_PORT
    result_port: int = DEFAULT_RESULT_PORT
    aliases: tuple[str, ...] = ()  # model names (globs) answered by the served model
    prefix_cache: bool = True  # reuse cached prompt prefixes across requests (--no-prefix-cache)
    speculation: bool = True  # draft-free speculative decoding (--no-speculation)


@dataclass(frozen=True)
class NodeSpec:
    name: NodeId
    address: str | None = None  # None: take the address the node's control connection came from
    port: int = DEFAULT_DATA_PORT
    layers: int | None = None  # pinned layer count (also set for a range); None = placement decides
    host: str | None = None  # a `.local` name resolved through zeroconf, never the system resolver
    layer_range: tuple[int, int] | None = None  # pinned [start, end); `layers` is then end - start

    @property
    def pin(self) -> tuple[int, int] | int | None:
        """What placement.NodeCapacity.pinned takes: the range if pinned to one, else the count."""
        return self.layer_range if self.layer_range is not None else self.layers


@dataclass(frozen=True)
class ClusterConfig:
    model: str | None = None  # None: the embedded default
    gateway: GatewaySpec = field(default_factory=GatewaySpec)
    nodes: tuple[NodeSpec, ...] = ()
    api_keys: frozenset[str] = frozenset()
    api_key_file: Path | None = None  # [api] key_file, relative to nodes.toml's folder
    metrics_open: bool = False  # [api] metrics_open: /metrics without a key (a Prometheus scraper)
    cors_origins: tuple[str, ...] = ()  # [api] cors_origins: web pages allowed to call the API
    source: str = "<defaults>"

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"{self.source}: no [[node]] named {name!r} "
                          f"(known: {', '.join(n.name for n in self.nodes) or 'none'})")


def load_cluster(path: Path) -> ClusterConfig:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_cluster(data, str(path))


def parse_cluster(data: dict[str, Any], source: str) -> ClusterConfig:
    _only(data, {"model", "gateway", "node", "api"}, source, "")
    model = data.get("model")
    if model is not None:
        model = _typed(model, str, source, "model")
    gw = data.get("gateway", {})
    _typed(gw, dict, source, "gateway")
    _only(gw, {"address", "bind", "port", "control_port", "result_port", "aliases"}, source, "gateway.")
    gateway = GatewaySpec(
        address=_ip(gw.get("address", "127.0.0.1"), source, "gateway.address"),
        bind=_ip(gw.get("bind", "0.0.0.0"), source, "gateway.bind"),
        port=_port(gw.get("port", DEFAULT_API_PORT), source, "gateway.port"),
        control_port=_port(gw.get("control_port", DEFAULT_CONTROL_PORT), source, "gateway.control_port"),
        result_port=_port(gw.get("result_port", DEFAULT_RESULT_PORT), source, "gateway.result_port"),
        aliases=_aliases(gw.get("aliases", []), source),
    )
    if len({gateway.port, gateway.control_port, gateway.result_port}) != 3:
        raise ConfigError(f"{source}: gateway.port, control_port and result_port must differ")
    raw_nodes = data.get("node", [])
    _typed(raw_nodes, list, source, "node")
    nodes = []
    for i, n in enumerate(raw_nodes):
        where = f"node[{i}]."
        _typed(n, dict, source, where.rstrip("."))
        _only(n, {"name", "address", "host", "port", "layers"}, source, where)
        if "name" not in n:
            raise ConfigError(f"{source}: {where}name is required")
        name = _typed(n["name"], str, source, where + "name")
        if not NODE_NAME.fullmatch(name):
            raise ConfigError(f"{source}: {where}name {name!r}: use letters, digits, '.', '_', '-'")
        layers, layer_range = _layers(n.get("layers"), source, where + "layers")
        # A node named like a .local host is that host unless `host` says otherwise.
        host = n.get("host", name if name.endswith(".local") else None)
        nodes.append(NodeSpec(
            name=NodeId(name),
            address=_ip(n["address"], source, where + "address") if "address" in n else None,
            port=_port(n.get("port", DEFAULT_DATA_PORT), source, where + "port"),
            layers=layers,
            host=_local_host(host, source, where + "host") if host is not None else None,
            layer_range=layer_range,
        ))
    names = [n.name for n in nodes]
    dups = sorted({x for x in names if names.count(x) > 1})
    if dups:
        raise ConfigError(f"{source}: duplicate node name(s): {', '.join(dups)}")
    _check_ranges(nodes, source)
    api = data.get("api", {})
    _typed(api, dict, source, "api")
    _only(api, {"keys", "key_file", "metrics_open", "cors_origins"}, source, "api.")
    keys = api.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(f"{source}: api.keys must be a list of non-empty strings")
    key_file = api.get("key_file")
    if key_file is not None:
        key_file = Path(source).parent / Path(_typed(key_file, str, source, "api.key_file")).expanduser()
    metrics_open = _typed(api.get("metrics_open", False), bool, source, "api.metrics_open")
    origins = api.get("cors_origins", [])
    if not isinstance(origins, list) or not all(
            isinstance(o, str) and (o == "*" or o.startswith(("http://", "https://"))) for o in origins):
        raise ConfigError(f"{source}: api.cors_origins must be a list of origins like"
                          " \"https://app.example.com\" (or \"*\" for any)")
    return ClusterConfig(model=model, gateway=gateway, nodes=tuple(nodes), api_keys=frozenset(keys),
                         api_key_file=key_file, metrics_open=metrics_open, source=source,
                         cors_origins=tuple(o.rstrip("/") for o in origins))


def _layers(value: Any, source: str, key: str) -> tuple[int | None, tuple[int, int] | None]:
    """`layers = 9` (a count) or `layers = [0, 10]` (the range [0, 10): layers 0..9)."""
    if value is None:
        return None, None
    if isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{source}: {key} must be a count or [start, end], got {value!r}")
        start, end = value
        if not 0 <= start < end:
            raise ConfigError(f"{source}: {key} [{start}, {end}] is empty or negative: [start, end) "
                              "holds layers start..end-1, so end must be greater than start")
        return end - start, (start, end)
    if _typed(value, int, source, key) < 1:
        raise ConfigError(f"{source}: {key} must be at least 1, got {value}")
    return value, None


def _check_ranges(nodes: list[NodeSpec], source: str) -> None:
    """Pinned ranges must not overlap, must ascend in ring (file) order, and every gap before or
    between them needs unpinned or count-pinned nodes in that stretch of the ring to fill it."""
    ranged = [(i, n) for i, n in enumerate(nodes) if n.layer_range is not None]
    for a, (i, x) in enumerate(ranged):
        for j, y in ranged[a + 1:]:
            (s1, e1), (s2, e2) = x.layer_range, y.layer_range  # type: ignore[misc]
            if s1 < e2 and s2 < e1:
                raise ConfigError(f"{source}: node[{i}].layers [{s1}, {e1}] and node[{j}].layers "
                                  f"[{s2}, {e2}] overlap (ranges are [start, end): end excluded)")
    cursor, prev, between = 0, "the start of the model", list[NodeSpec]()
    for i, n in enumerate(nodes):
        if n.layer_range is None:
            between.append(n)  # unranged nodes fill the stretch before the next range
            continue
        start, end = n.layer_range
        if start < cursor:
            raise ConfigError(f"{source}: node[{i}].layers [{start}, {end}] comes after "
                              f"{prev} in ring order but starts before it ends ({cursor})")
        gap, counts = start - cursor, [m.layers for m in between if m.layers is not None]
        if gap and not between:
            raise ConfigError(f"{source}: layers [{cursor}, {start}) are held by no node: "
                              f"nothing sits between {prev} and node[{i}].layers in ring order")
        if sum(counts) > gap or (between and len(counts) == len(between) and sum(counts) != gap):
            raise ConfigError(f"{source}: the layer counts {counts} of the nodes between {prev} and "
                              f"node[{i}] must fill the {gap} layer(s) [{cursor}, {start})")
        cursor, prev, between = end, f"node[{i}].layers [{start}, {end}]", []


def parse_layer_counts(text: str, n_nodes: int) -> list[int]:
    """`--layers 10,10,10` -> [10, 10, 10], one count per node."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected comma-separated layer counts, e.g. 10,9,9") from None
    if len(counts) != n_nodes:
        raise ConfigError(f"--layers {text!r}: {len(counts)} counts for {n_nodes} nodes")
    if any(c < 1 for c in counts):
        raise ConfigError(f"--layers {text!r}: every node needs at least one layer")
    return counts


def _aliases(value: Any, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_ALIASES:
        raise ConfigError(f"{source}: gateway.aliases must be a list of at most {MAX_ALIASES} model"
                          " names or globs, e.g. [\"claude-*\"]")
    for i, a in enumerate(value):
        if not isinstance(a, str) or not MODEL_ALIAS.fullmatch(a):
            raise ConfigError(f"{source}: gateway.aliases[{i}] must be a model name or glob (letters,"
                              f" digits, . _ : / - and * ?; at most 128 characters), got {str(a)[:40]!r}")
    return tuple(dict.fromkeys(value))


def _only(d: dict[str, Any], allowed: set[str], source: str, prefix: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)} "
                          f"(allowed: {', '.join(sorted(prefix + a for a in allowed))})")


def _typed(value: Any, tp: type, source: str, key: str) -> Any:
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {tp.__name__}, got {value!r}")
    return value


def _port(value: Any, source: str, key: str) -> int:
    _typed(value, int, source, key)
    if not 1 <= value <= 65535:
        raise ConfigError(f"{source}: {key} {value} is not a TCP port (1-65535)")
    return value


def _local_host(value: Any, source: str, key: str) -> str:
    _typed(value, str, source, key)
    host = value.rstrip(".")
    if not LOCAL_HOST.fullmatch(host):
        raise ConfigError(f"{source}: {key} {value!r} is not a .local host name (e.g. \"mini2.local\"); "
                          "other names would need the system resolver, which zmqinfer never uses")
    return host


def _ip(value: Any, source: str, key: str) -> str:
    _typed(value, str, source, key)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        hint = (" (.local names are resolved by zeroconf discovery, never here)"
                if value.endswith(".local") else "")
        raise ConfigError(f"{source}: {key} {value!r} is not an IP address{hint}") from None


# ---- command-line values ------------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(iB|B)?|B)?", re.IGNORECASE)


def parse_size(text: str, flag: str) -> int:
    """Bytes from "450M", "1.5G", "512MiB", "2GB" or digits; see `node --memory-limit`'s help."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"{flag} {text!r}: expected bytes or a size like 450M, 1.5G, 512MiB")
    base = 1000 if (m[3] or "").lower() == "b" else 1024
    value = int(float(m[1]) * base ** ("KMGT".index(m[2].upper()) + 1 if m[2] else 0))
    if value < 1:
        raise ConfigError(f"{flag} {text!r}: must be at least 1 byte")
    return value


def ip_literal(host: str, what: str) -> str:
    """A command-line address (--gateway, --interface, --host): an IP literal, never a name."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"{what} {host!r} is not an IP address (names are never handed to the "
                          "system resolver; mDNS finds the gateway when --gateway is left out)") from None
