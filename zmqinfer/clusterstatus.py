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


class Replan(TypedDict):
    epoch: int
    at: float  # wall-clock seconds
    layers: dict[str, list[int]]
    resumed_requests: int
    reason: NotRequired[str]  # why the ring before it went down (absent for the first ring)
    silent_s: NotRequired[dict[str, float]]  # how long each lost node had been silent
    down_s: NotRequired[float]  # ring down -> this ring ready


class ClusterStatus(TypedDict):
    ready: bool
    reason: str  # "" when ready
    model: str
    n_layers: int
    epoch: int
    active_requests: int
    queued_requests: int  # admitted, waiting for KV room in the ring
    kv_tokens: int | None  # KV cache the ring holds (prompt + max_tokens per request, padded)
    replans: list[Replan]  # the latest few
    nodes: list[NodeStatus]  # ring order first, then the others


class NodePing(TypedDict):
    name: str
    address: str | None
    control_ms: NotRequired[float]
    error: NotRequired[str]


class ClusterPing(TypedDict):
    nodes: list[NodePing]
    ring_ms: float | None
    ring_error: NotRequired[str]
