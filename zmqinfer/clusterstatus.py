"""The shape of `/cluster/status` and `/cluster/ping`: the gateway fills these, the API serialises
them as JSON, and `zmqinfer status` / `ping` / `top`, the status page and `/metrics` read them.
One definition, so they all agree. Units are base units (bytes, seconds, ratios 0..1); a number
a platform does not expose is None (JSON null), never 0."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict


class NodeUsage(TypedDict):
    """What a node's heartbeats say about its work (node/usage.py); rates are between its last
    two beats."""

    layers_held: int  # layers it has loaded (0 until it loads what `layers` assigns)
    kv_bytes: int  # bytes its KV caches hold
    tokens_per_s: float  # token rows it computed per second (prefill and decode)
    step_s: float | None  # mean compute time per Forward; None when it ran none
    busy_seconds: float  # totals since the node process started: counters in /metrics
    steps: int
    tokens: int
    gpu_utilization: float | None  # 0..1, device-wide; None where the platform has no reading
    accel_memory_bytes: int | None  # accelerator memory in use, device-wide; None likewise
    hop_latency_s: float | None  # control-plane round trip gateway -> node -> gateway
    stale_drops: int  # data messages of another epoch it dropped unread


class NodeStatus(NodeUsage):
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
    busy_seconds: float  # time computing since the node started (its own clock)
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


class RingCounters(TypedDict):
    replans: int  # rings built after the first (failover, joins, leaves)
    replayed_requests: int  # requests resumed on a re-planned ring, summed over re-plans
    micro_batches_in_flight: int  # steps sent into the ring and not yet answered
    stale_epoch_drops: int  # results of an older epoch the gateway dropped (nodes count theirs)


class Throughput(TypedDict):
    """The whole ring, over the last `window_s` seconds."""

    window_s: float
    generation_tokens_per_s: float
    prompt_tokens_per_s: float
    ttft_s: float | None  # mean time to first token of the requests that got it in the window


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


class ModelInfo(TypedDict):
    """The served model (model/facts.py)."""

    family: str  # config.json's model_type
    quantization: str  # "8-bit, group 64", "4-bit, group 32 (mixed: 4, 8)", or the weights' dtype
    context_length: int | None
    params_total: int
    params_active: int | None  # per token, for a mixture of experts; None for a dense model
    batching: str  # "batched", or "one sequence at a time" for a family mlx-lm cannot batch


class PrefixCacheStatus(TypedDict):
    """The gateway's prefix cache (gateway/prefixes.py): what the stages hold for reuse."""

    enabled: bool
    exact: bool  # only whole prefixes serve: a stage's caches cannot be cut (gateway/prefixes.py)
    entries: int  # cached prefixes
    tokens: int  # token positions they hold (each stage, for its layers)
    bytes: int  # their KV over the whole model (all stages), estimated from the model's size
    lookups: int  # requests that looked for a prefix
    hits: int  # ... and started from one
    hit_rate: float  # hits / lookups (0 before any)
    tokens_saved: int  # prompt tokens not prefilled thanks to a hit
    evictions: int  # prefixes evicted (least recently used) to make room


class SpeculationStatus(TypedDict):
    """The gateway's draft-free speculation (gateway/speculation.py), counted since it started."""

    enabled: bool
    drafts: int  # decode steps that carried drafted tokens
    draft_tokens: int  # tokens drafted
    accepted_tokens: int  # drafted tokens the last stage accepted
    skipped: dict[str, int]  # decode steps that drafted nothing, by reason


class ClusterStatus(TypedDict):
    ready: bool
    reason: str  # "" when ready
    model: str
    n_layers: int
    epoch: int
    active_requests: int  # running + the parked/queued ones the scheduler holds
    running_requests: int  # with steps in the ring (vLLM's "running")
    waiting_requests: int  # admitted, nothing in the ring yet: waiting for a ring, queued, parked
    ring: RingCounters
    throughput: Throughput
    devices: int  # distinct devices among the stages: stages on one machine are one device
    groups: int  # micro-batch groups the scheduler keeps in the ring
    decode_steps: int  # group decode steps the ring has completed since the gateway started
    queued_requests: int  # admitted, waiting for KV room in the ring
    kv_tokens: int | None  # positions one sequence alone may hold (gateway/kvroom.py); None: no limit
    replans: list[Replan]  # the latest few
    nodes: list[NodeStatus]  # ring order first, then the others
    security: NotRequired[SecurityStatus]
    prefix_cache: NotRequired[PrefixCacheStatus]
    speculation: NotRequired[SpeculationStatus]
    model_info: NotRequired[ModelInfo]


class NodePing(TypedDict):
    name: str
    address: str | None
    control_ms: NotRequired[float]
    error: NotRequired[str]


class ClusterPing(TypedDict):
    nodes: list[NodePing]
    ring_ms: float | None
    ring_error: NotRequired[str]
