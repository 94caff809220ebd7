"""The shape of `/cluster/status` and `/cluster/ping`: the gateway fills these, the API serialises
them as JSON, and `zmqinfer status` / `ping` read them. One definition, so the three agree."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict


class NodeStatus(TypedDict):
    name: str
    address: str | None  # an IP literal, or None while unknown
    found_by: Literal["mdns", "static"]
    detail: str  # how `address` was found, e.g. "nodes.toml address", "mdns ad"
    refused: str | None  # why it may not join (protocol or model mismatch); None = may join
    data_port: int | None
    layers: list[int] | None  # [start, end) in the current ring, None when it holds none
    alive: bool  # heard from lately and not gone (a refused node may be alive)
    health: str  # "ok", "loading", or what is wrong, in words
    last_heartbeat_s: float | None
    device: str | None
    pid: int | None
    rss_bytes: int | None
    shard_bytes: int | None
    mem_total: int | None
    mem_free: int | None
    busy_fraction: float  # time computing / wall time between its last two beats
    sequences: int  # KV caches it holds
    excluded: NotRequired[str]  # left out of the current ring by placement, and why
    refused_by_node: NotRequired[int]  # handshakes and data messages the node refused (keys.py)


class Replan(TypedDict):
    epoch: int
    at: float  # wall-clock seconds
    layers: dict[str, list[int]]
    resumed_requests: int
    reason: NotRequired[str]  # why the ring before it went down (absent for the first ring)
    silent_s: NotRequired[dict[str, float]]  # how long each lost node had been silent
    down_s: NotRequired[float]  # ring down -> this ring ready


class ApiAuthStatus(TypedDict):
    mode: Literal["keys", "protected", "open"]  # keys; loopback only (no keys); --no-auth
    keys: list[str]  # the keys' names (never the keys)
    metrics_open: bool
    refused: int  # requests answered 401/403


class SecurityStatus(TypedDict):
    curve: bool  # CurveZMQ on every ZeroMQ socket
    trusted: list[str]  # names in the cluster directory's public_keys/
    refused_handshakes: int  # CURVE handshakes with a key not in the directory
    refused_messages: int  # messages whose key is not the one their role needs
    refused_peers: dict[str, str]  # the first few refused peers, and why
    api: NotRequired[ApiAuthStatus]


class ClusterStatus(TypedDict):
    ready: bool
    reason: str  # "" when ready
    model: str
    n_layers: int
    epoch: int
    active_requests: int
    replans: list[Replan]  # the latest few
    nodes: list[NodeStatus]  # ring order first, then the others
    security: NotRequired[SecurityStatus]


class NodePing(TypedDict):
    name: str
    address: str | None
    control_ms: NotRequired[float]
    error: NotRequired[str]


class ClusterPing(TypedDict):
    nodes: list[NodePing]
    ring_ms: float | None
    ring_error: NotRequired[str]
