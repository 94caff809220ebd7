"""Prometheus exposition of the gateway (`GET /metrics`), in vLLM's terms so dashboards port.

Names are vLLM's with the `zmqinfer_` prefix (Prometheus style, base units, `_total` counters),
with vLLM's meanings and histogram buckets (vllm/v1/metrics/loggers.py):

    request level, label model_name     observed by the API as each request runs (`RequestTimer`)
      zmqinfer_prompt_tokens_total, zmqinfer_generation_tokens_total,
      zmqinfer_request_success_total{finished_reason}, zmqinfer_time_to_first_token_seconds,
      zmqinfer_inter_token_latency_seconds, zmqinfer_e2e_request_latency_seconds,
      zmqinfer_request_queue_time_seconds, zmqinfer_request_prompt_tokens,
      zmqinfer_request_generation_tokens
    request level, labels model_name and api (the dialect: openai, anthropic, responses, ollama)
      zmqinfer_api_requests_total{api,finished_reason}: vLLM has no dialects, so its series stay
      as they are and this one says who asked
    live, read from /cluster/status at scrape time (`_Live`, a custom Collector)
      zmqinfer_num_requests_running / _waiting, zmqinfer_ring_* (epoch, re-plans, replays,
      micro-batches in flight, stale-epoch drops), zmqinfer_node_*{node} from the heartbeats,
      zmqinfer_spec_decode_* (speculation: drafts, draft and accepted tokens, acceptance rate,
      skipped steps by reason; vLLM's spec_decode names)
    zmqinfer_build_info{version,protocol}, process_* (this process)

One registry per `Metrics` (per gateway process, and per app in tests), never the global one.
A number a node's platform does not expose (GPU utilisation on a Linux CPU) is left out of the
exposition, not reported as 0.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from importlib.metadata import PackageNotFoundError, version
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from zmqinfer.clusterstatus import ClusterStatus, NodeStatus, Throughput
from zmqinfer.protocol.wire import PROTOCOL_VERSION, Sample

# vLLM's buckets, exactly, so its dashboards' bucket queries work unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort")  # vLLM's FinishReason; abort = client went away
APIS = ("openai", "anthropic", "responses", "ollama")  # the dialects the API speaks
# The dashboard's "now": tokens per second over this many seconds. Long enough to smooth one
# request's steps, short enough that `top` shows a burst ending within a few refreshes.
THROUGHPUT_WINDOW_S = 5.0

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_1_2_5_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(float(value))
        exponent += 1


def package_version() -> str:
    try:
        return version("zmqinfer")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


class _Window:
    """Sum and count of events over the last `span` whole seconds plus the current partial one,
    in 1 s bins (bounded memory). `rate` divides by exactly the time the bins cover."""

    def __init__(self, span: float = THROUGHPUT_WINDOW_S) -> None:
        self.span = int(span)
        self._bins: deque[list[float]] = deque()  # [second, sum, count]

    def add(self, value: float, now: float) -> None:
        sec = float(int(now))
        if self._bins and self._bins[-1][0] == sec:
            self._bins[-1][1] += value
            self._bins[-1][2] += 1
        else:
            self._bins.append([sec, value, 1])
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._bins and self._bins[0][0] < int(now) - self.span:
            self._bins.popleft()

    def sums(self, now: float) -> tuple[float, int]:
        self._trim(now)
        return sum(b[1] for b in self._bins), int(sum(b[2] for b in self._bins))

    def covered(self, now: float) -> float:
        return self.span + (now - int(now))


class Metrics:
    """Every series of one gateway: `timer()` per request, `on_queued` for the scheduler, and
    `exposition()` for the scrape. `status` is read at scrape time for the live series."""

    def __init__(self, model_name: str, status: Callable[[], ClusterStatus],
                 context_length: int = 4096) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter("zmqinfer_prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("zmqinfer_generation_tokens",
                                         "Number of generation tokens processed.", labels,
                                         registry=r).labels(model_name)
        success = Counter("zmqinfer_request_success", "Count of successfully processed requests.",
                          labels + ["finished_reason"], registry=r)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self.by_api = Counter("zmqinfer_api_requests", "Count of finished requests by API dialect.",
                              labels + ["api", "finished_reason"], registry=r)
        for api in APIS:  # every series exists from the start, at 0, as success's do
            for reason in FINISHED_REASONS:
                self.by_api.labels(model_name, api, reason)
        self.ttft = Histogram("zmqinfer_time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("zmqinfer_inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", labels,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("zmqinfer_e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", labels,
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram("zmqinfer_request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", labels,
                               buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(model_name)
        counts = build_1_2_5_buckets(context_length)
        self.prompt_hist = Histogram("zmqinfer_request_prompt_tokens",
                                     "Number of prefill tokens processed.", labels,
                                     buckets=counts, registry=r).labels(model_name)
        self.generation_hist = Histogram("zmqinfer_request_generation_tokens",
                                         "Number of generation tokens processed.", labels,
                                         buckets=counts, registry=r).labels(model_name)
        ProcessCollector(registry=r)  # the gateway's own CPU and memory (Linux /proc only)
        r.register(_Live(model_name, status))
        self._generated = _Window()
        self._prompted = _Window()
        self._ttfts = _Window()

    def timer(self, api: str = "openai") -> RequestTimer:
        """Start timing one request of dialect `api` (one of APIS) now (its arrival)."""
        return RequestTimer(self, api)

    def on_queued(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def first_token(self, prompt_tokens: int, ttft: float, now: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.prompt_hist.observe(prompt_tokens)
        self._prompted.add(prompt_tokens, now)
        self.ttft.observe(ttft)
        self._ttfts.add(ttft, now)
        self.token(now)

    def next_token(self, itl: float, now: float) -> None:
        self.itl.observe(itl)
        self.token(now)

    def token(self, now: float) -> None:
        self.generation_tokens.inc()
        self._generated.add(1, now)

    def throughput(self) -> Throughput:
        now = time.monotonic()
        generated, _ = self._generated.sums(now)
        prompted, _ = self._prompted.sums(now)
        ttft_sum, ttft_n = self._ttfts.sums(now)
        span = self._generated.covered(now)
        return {"window_s": round(span, 3), "generation_tokens_per_s": round(generated / span, 2),
                "prompt_tokens_per_s": round(prompted / span, 2),
                "ttft_s": round(ttft_sum / ttft_n, 4) if ttft_n else None}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


async def serve_metrics(request: web.Request) -> web.Response:
    """GET /metrics: the text exposition, read from the live state now."""
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE})


class RequestTimer:
    """One request's observations; the API wraps its sample stream with `stream()` and calls
    `finish()` exactly once, in a `finally`."""

    def __init__(self, metrics: Metrics, api: str = "openai") -> None:
        self._m = metrics
        self._api = api
        self.arrived = time.monotonic()
        self._last: float | None = None  # when the latest token came
        self.tokens = 0

    async def stream(self, samples: AsyncGenerator[Sample, None],
                     prompt_tokens: int) -> AsyncGenerator[Sample, None]:
        """`samples`, timed: TTFT on the first, inter-token latency on each later one. Closing
        this closes `samples` at once (its `finally` frees the sequence along the ring)."""
        async with contextlib.aclosing(samples):
            async for s in samples:
                now = time.monotonic()
                if self._last is None:  # its prompt counts once its prefill is done
                    self._m.first_token(prompt_tokens, now - self.arrived, now)
                else:
                    self._m.next_token(now - self._last, now)
                self._last = now
                self.tokens += 1
                yield s

    def finish(self, finish_reason: str | None, aborted: bool) -> None:
        """A finish reason: it succeeded; aborted: its client went away; neither: it failed (a
        ring error), which vLLM's success counter does not count either."""
        reason = finish_reason if finish_reason is not None else ("abort" if aborted else None)
        if reason == "tool_calls":  # vLLM's labels: a turn that ends in tool calls ended by stop
            reason = "stop"
        if reason is None:
            return
        m = self._m
        m.success[reason].inc()
        m.by_api.labels(m.model_name, self._api, reason).inc()
        m.e2e.observe(time.monotonic() - self.arrived)
        m.generation_hist.observe(self.tokens)


# ---- the live series: a Collector over /cluster/status ----------------------------------------


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    g.add_metric(list((labels or {}).values()), value)
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


# (field of NodeStatus, metric name, help, kind): one series per node that reports the field.
NODE_SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("busy_fraction", "zmqinfer_node_busy_ratio", "Time computing / wall time between its last two heartbeats.", "gauge"),
    ("busy_seconds", "zmqinfer_node_busy_seconds", "Time spent computing since the node started.", "counter"),
    ("steps", "zmqinfer_node_steps", "Forward steps computed since the node started.", "counter"),
    ("tokens", "zmqinfer_node_tokens", "Token rows computed (prefill and decode) since the node started.", "counter"),
    ("step_s", "zmqinfer_node_step_seconds", "Mean compute time per step between its last two heartbeats.", "gauge"),
    ("gpu_utilization", "zmqinfer_node_gpu_utilization_ratio", "Accelerator utilisation (device-wide, 0..1) where the platform exposes it.", "gauge"),
    ("rss_bytes", "zmqinfer_node_resident_memory_bytes", "Resident memory of the node process.", "gauge"),
    ("accel_memory_bytes", "zmqinfer_node_accelerator_memory_bytes", "Accelerator memory in use (device-wide) where the platform exposes it.", "gauge"),
    ("mem_total", "zmqinfer_node_memory_total_bytes", "Memory the node offers in total.", "gauge"),
    ("mem_free", "zmqinfer_node_memory_free_bytes", "Memory the node has free for layers.", "gauge"),
    ("shard_bytes", "zmqinfer_node_shard_bytes", "Bytes of weights the node holds.", "gauge"),
    ("kv_bytes", "zmqinfer_node_kv_cache_bytes", "Bytes held by the node's KV caches.", "gauge"),
    ("sequences", "zmqinfer_node_sequences", "Sequences (KV caches) the node holds.", "gauge"),
    ("layers_held", "zmqinfer_node_layers", "Transformer layers the node holds loaded.", "gauge"),
    ("hop_latency_s", "zmqinfer_node_hop_latency_seconds", "Control-plane round trip gateway -> node -> gateway.", "gauge"),
    ("last_heartbeat_s", "zmqinfer_node_heartbeat_age_seconds", "Seconds since the node's last heartbeat.", "gauge"),
    ("stale_drops", "zmqinfer_node_stale_epoch_drops", "Data messages of another epoch the node dropped unread.", "counter"),
)


class _Live(Collector):
    """Reads the gateway's state when scraped, so gauges are never stale copies."""

    def __init__(self, model_name: str, status: Callable[[], ClusterStatus]) -> None:
        self._model, self._status = model_name, status

    def collect(self) -> Iterable[Metric]:
        st = self._status()
        model = {"model_name": self._model}
        yield _gauge("zmqinfer_num_requests_running", "Number of requests in model execution batches.",
                     st.get("running_requests", 0), model)
        yield _gauge("zmqinfer_num_requests_waiting", "Number of requests waiting to be processed.",
                     st.get("waiting_requests", 0), model)
        yield _gauge("zmqinfer_build_info", "zmqinfer version and wire protocol.", 1,
                     {"version": package_version(), "protocol": PROTOCOL_VERSION.decode()})
        yield _gauge("zmqinfer_ring_ready", "1 when the ring serves requests.", int(bool(st.get("ready"))))
        yield _gauge("zmqinfer_ring_epoch", "The ring's current epoch (0 before the first).", st.get("epoch", 0))
        nodes = st.get("nodes", [])
        yield _gauge("zmqinfer_ring_stages", "Nodes in the current ring.",
                     sum(1 for n in nodes if n.get("layers")))
        ring = st.get("ring")
        if ring is not None:
            yield _counter("zmqinfer_ring_replans", "Rings built after the first (failover, joins, leaves).", ring["replans"])
            yield _counter("zmqinfer_ring_replayed_requests", "Requests resumed on a re-planned ring.",
                           ring["replayed_requests"])
            yield _gauge("zmqinfer_ring_micro_batches_in_flight", "Steps in the ring not yet answered.",
                         ring["micro_batches_in_flight"])
            yield _counter("zmqinfer_ring_stale_epoch_drops", "Results of an older epoch the gateway dropped.",
                           ring["stale_epoch_drops"])
        if (pc := st.get("prefix_cache")) is not None:  # gateway/prefixes.py
            yield _gauge("zmqinfer_prefix_cache_entries", "Cached prefixes the stages hold.", pc["entries"])
            yield _gauge("zmqinfer_prefix_cache_tokens", "Token positions the cached prefixes hold.", pc["tokens"])
            yield _gauge("zmqinfer_prefix_cache_bytes", "KV bytes of the cached prefixes, all stages.", pc["bytes"])
            yield _counter("zmqinfer_prefix_cache_lookups", "Requests that looked for a cached prefix.", pc["lookups"])
            yield _counter("zmqinfer_prefix_cache_hits", "Requests that started from a cached prefix.", pc["hits"])
            yield _counter("zmqinfer_prefix_cache_tokens_saved", "Prompt tokens not prefilled thanks to a hit.",
                           pc["tokens_saved"])
            yield _counter("zmqinfer_prefix_cache_evictions", "Cached prefixes evicted to make room.",
                           pc["evictions"])
        if (sp := st.get("speculation")) is not None:  # gateway/speculation.py, in vLLM's names
            yield _counter("zmqinfer_spec_decode_num_drafts", "Decode steps that carried drafted tokens.", sp["drafts"])
            yield _counter("zmqinfer_spec_decode_num_draft_tokens", "Tokens drafted (prompt lookup).",
                           sp["draft_tokens"])
            yield _counter("zmqinfer_spec_decode_num_accepted_tokens", "Drafted tokens the last stage accepted.",
                           sp["accepted_tokens"])
            yield _gauge("zmqinfer_spec_decode_draft_acceptance_rate", "Accepted over drafted tokens since start.",
                         sp["accepted_tokens"] / sp["draft_tokens"] if sp["draft_tokens"] else 0.0)
            skipped = CounterMetricFamily("zmqinfer_spec_decode_skipped_steps",
                                          "Decode steps that drafted nothing, by reason.", labels=["reason"])
            for reason, n in sp["skipped"].items():
                skipped.add_metric([reason], n)
            yield skipped
        yield from _node_series(nodes)


def _node_series(nodes: list[NodeStatus]) -> Iterator[Metric]:
    up = GaugeMetricFamily("zmqinfer_node_up", "1 when the node is alive (heard from lately, not gone).",
                           labels=["node"])
    for n in nodes:
        up.add_metric([n["name"]], int(bool(n.get("alive"))))
    yield up
    for key, name, doc, kind in NODE_SERIES:
        family: CounterMetricFamily | GaugeMetricFamily = (
            CounterMetricFamily(name, doc, labels=["node"]) if kind == "counter"
            else GaugeMetricFamily(name, doc, labels=["node"]))
        for n in nodes:
            value = cast(Mapping[str, Any], n).get(key)
            if value is None or n.get("pid") is None:
                continue  # not exposed by its platform, or never heard from: absent, not 0
            family.add_metric([n["name"]], float(value))
        yield family
