"""gateway/metrics.py: what /metrics exposes, read back with prometheus-client's own parser.

Request series through the real API (aiohttp server, `openai` client) over the scripted backend
of test_api; live series from /cluster/status documents; running / waiting / queue time from
the real scheduler over the in-memory ring of test_scheduler. The loopback test does the same
against a real ring (tests/loopback/test_observe.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.gateway.test_api_openai import (
    CHAT,
    ScriptedBackend,
    oai,
    script,
    serve,
    wait_for,
)
from tests.unit.gateway.test_scheduler import MemoryRing, running, settle
from zmqinfer.clusterstatus import ClusterStatus, NodeStatus
from zmqinfer.gateway import metrics
from zmqinfer.gateway.errors import RingUnavailable
from zmqinfer.gateway.metrics import (
    THROUGHPUT_WINDOW_S,
    Metrics,
    _Window,
    build_1_2_5_buckets,
)
from zmqinfer.gateway.scheduler import Scheduler
from zmqinfer.protocol.wire import SamplingParams

# vLLM's buckets, transcribed from vllm/v1/metrics/loggers.py (PrometheusStatLogger): the
# exposition must use exactly these, or vLLM dashboards' bucket queries silently break.
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
             10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0]
VLLM_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, parsed by prometheus-client: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


def buckets(parsed: dict, name: str) -> list[float]:
    return sorted(float(dict(lab)["le"]) for n, lab in parsed if n == name + "_bucket"
                  and dict(lab)["le"] != "+Inf")


async def scrape(client: Any) -> dict:
    r = await client.get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(await r.text())


async def test_counters_and_histograms_equal_what_the_responses_reported() -> None:
    backend = ScriptedBackend(script())
    m = "scripted-model"
    async with serve(backend) as client:
        c = oai(client, "unused")
        a = await c.chat.completions.create(**CHAT, max_tokens=3)  # type: ignore[call-overload]
        b = await c.chat.completions.create(**CHAT, max_tokens=50)  # type: ignore[call-overload]
        stream = await c.chat.completions.create(**CHAT, max_tokens=4, stream=True,  # type: ignore[call-overload]
                                                 stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
        usage = [a.usage, b.usage, chunks[-1].usage]
        reasons = [a.choices[0].finish_reason, b.choices[0].finish_reason,
                   next(ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason)]
        assert reasons == ["length", "stop", "length"]
        await wait_for(lambda: len(backend.endings) == 3)
        got = await scrape(client)
    assert value(got, "zmqinfer_prompt_tokens_total", model_name=m) == sum(u.prompt_tokens for u in usage)
    assert value(got, "zmqinfer_generation_tokens_total", model_name=m) == sum(u.completion_tokens for u in usage)
    assert value(got, "zmqinfer_request_success_total", model_name=m, finished_reason="length") == 2
    assert value(got, "zmqinfer_request_success_total", model_name=m, finished_reason="stop") == 1
    assert value(got, "zmqinfer_request_success_total", model_name=m, finished_reason="abort") == 0
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert value(got, f"zmqinfer_{name}_count", model_name=m) == 3, name
    # One inter-token gap per token after each request's first.
    assert value(got, "zmqinfer_inter_token_latency_seconds_count", model_name=m) == \
        sum(u.completion_tokens for u in usage) - 3
    assert value(got, "zmqinfer_request_generation_tokens_sum", model_name=m) == \
        sum(u.completion_tokens for u in usage)
    assert buckets(got, "zmqinfer_time_to_first_token_seconds") == VLLM_TTFT
    assert buckets(got, "zmqinfer_inter_token_latency_seconds") == VLLM_ITL
    assert buckets(got, "zmqinfer_e2e_request_latency_seconds") == VLLM_REQUEST
    assert buckets(got, "zmqinfer_request_queue_time_seconds") == VLLM_REQUEST
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)  # vLLM's docstring example
    assert buckets(got, "zmqinfer_request_prompt_tokens") == list(build_1_2_5_buckets(2048))  # context length
    assert value(got, "zmqinfer_build_info", version=metrics.package_version(), protocol="zmqinfer/5") == 1


async def test_a_client_that_leaves_is_an_abort_and_a_ring_error_no_success() -> None:
    backend = ScriptedBackend(script(), hang_at=2)
    async with serve(backend) as client:
        r = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        await r.content.readline()  # the stream started: first token sent
        await wait_for(backend.hanging.is_set)
        r.close()  # the client goes away mid-stream
        await wait_for(lambda: backend.endings == ["cancelled"])
        got = await scrape(client)
    assert value(got, "zmqinfer_request_success_total", model_name="scripted-model", finished_reason="abort") == 1
    assert value(got, "zmqinfer_time_to_first_token_seconds_count", model_name="scripted-model") == 1
    failing = ScriptedBackend(script(), error=RingUnavailable("node n2 died"), error_at=0)
    async with serve(failing) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status == 503
        got = await scrape(client)
    assert sum(v for (n, _), v in got.items() if n == "zmqinfer_request_success_total") == 0
    assert value(got, "zmqinfer_time_to_first_token_seconds_count", model_name="scripted-model") == 0


def node(name: str, **kw: Any) -> NodeStatus:
    row: dict[str, Any] = {
        "name": name, "address": "10.0.0.2", "found_by": "static", "detail": "nodes.toml address",
        "refused": None, "data_port": 8110, "layers": [0, 15], "alive": True, "health": "ok",
        "last_heartbeat_s": 0.4, "device": "cpu", "pid": 42, "rss_bytes": 400 << 20,
        "shard_bytes": 300 << 20, "mem_total": 16 << 30, "mem_free": 8 << 30, "busy_fraction": 0.5,
        "sequences": 2, "layers_held": 15, "kv_bytes": 3 << 20, "tokens_per_s": 30.0, "step_s": 0.02,
        "busy_seconds": 12.5, "steps": 600, "tokens": 9000, "gpu_utilization": None,
        "accel_memory_bytes": None, "hop_latency_s": 0.0011, "stale_drops": 1}
    row.update(kw)
    return row  # type: ignore[return-value]


def status(nodes: list[NodeStatus]) -> ClusterStatus:
    return {"ready": True, "reason": "", "model": "m", "n_layers": 30, "epoch": 7, "active_requests": 3,
            "running_requests": 2, "waiting_requests": 1,
            "ring": {"replans": 4, "replayed_requests": 9, "micro_batches_in_flight": 3, "stale_epoch_drops": 5},
            "throughput": {"window_s": 5.0, "generation_tokens_per_s": 0.0, "prompt_tokens_per_s": 0.0,
                           "ttft_s": None},
            "replans": [], "nodes": nodes}


def test_live_series_are_read_from_the_status_at_scrape_time() -> None:
    nodes = [node("cpu-box"), node("mac", gpu_utilization=0.23, accel_memory_bytes=1 << 30, layers=[15, 30]),
             node("never", pid=None, alive=False, layers=None, health="has not registered")]
    st = status(nodes)
    mx = Metrics("m", lambda: st)
    got = samples(mx.exposition().decode())
    assert value(got, "zmqinfer_num_requests_running", model_name="m") == 2
    assert value(got, "zmqinfer_num_requests_waiting", model_name="m") == 1
    assert value(got, "zmqinfer_ring_epoch") == 7 and value(got, "zmqinfer_ring_stages") == 2
    assert value(got, "zmqinfer_ring_replans_total") == 4
    assert value(got, "zmqinfer_ring_replayed_requests_total") == 9
    assert value(got, "zmqinfer_ring_micro_batches_in_flight") == 3
    assert value(got, "zmqinfer_ring_stale_epoch_drops_total") == 5
    for name, n in (("cpu-box", nodes[0]), ("mac", nodes[1])):
        assert value(got, "zmqinfer_node_up", node=name) == 1
        assert value(got, "zmqinfer_node_busy_ratio", node=name) == 0.5
        assert value(got, "zmqinfer_node_busy_seconds_total", node=name) == 12.5
        assert value(got, "zmqinfer_node_resident_memory_bytes", node=name) == n["rss_bytes"]
        assert value(got, "zmqinfer_node_kv_cache_bytes", node=name) == 3 << 20
        assert value(got, "zmqinfer_node_layers", node=name) == 15
        assert value(got, "zmqinfer_node_step_seconds", node=name) == 0.02
        assert value(got, "zmqinfer_node_hop_latency_seconds", node=name) == 0.0011
        assert value(got, "zmqinfer_node_stale_epoch_drops_total", node=name) == 1
    # Where the platform has no reading the series is absent, never 0.
    assert value(got, "zmqinfer_node_gpu_utilization_ratio", node="mac") == 0.23
    assert value(got, "zmqinfer_node_accelerator_memory_bytes", node="mac") == 1 << 30
    assert ("zmqinfer_node_gpu_utilization_ratio", frozenset({("node", "cpu-box")})) not in got
    assert ("zmqinfer_node_accelerator_memory_bytes", frozenset({("node", "cpu-box")})) not in got
    # A node never heard from is down, and nothing else is made up for it.
    assert value(got, "zmqinfer_node_up", node="never") == 0
    assert [k for k in got if dict(k[1]).get("node") == "never"] == [("zmqinfer_node_up", frozenset({("node", "never")}))]
    # Live: the next scrape sees the state as it is then.
    st["running_requests"], st["nodes"][0]["busy_fraction"] = 0, 0.75
    again = samples(mx.exposition().decode())
    assert value(again, "zmqinfer_num_requests_running", model_name="m") == 0
    assert value(again, "zmqinfer_node_busy_ratio", node="cpu-box") == 0.75


def test_throughput_window_forgets_what_is_older_than_the_window() -> None:
    w = _Window(THROUGHPUT_WINDOW_S)
    for i in range(50):  # 10 tokens a second for 5 s
        w.add(1, 1000.0 + i / 10)
    now = 1005.0
    total, n = w.sums(now)
    assert (total, n) == (50, 50) and w.covered(now) == THROUGHPUT_WINDOW_S
    assert total / w.covered(now) == pytest.approx(10.0)
    later = 1000.0 + THROUGHPUT_WINDOW_S + 1.0  # the first second has left the window
    assert w.sums(later) == (40, 40)
    assert w.sums(1000.0 + 3 * THROUGHPUT_WINDOW_S) == (0, 0)


async def test_running_waiting_and_queue_time_from_the_scheduler() -> None:
    ring = MemoryRing(n_stages=2)
    sched = Scheduler(ring, {0})
    queued: list[float] = []
    sched.on_queued = queued.append
    gate = asyncio.Event()

    async def wait_ready(timeout: float) -> None:
        await gate.wait()  # the ring is not ready yet: requests wait

    ring.wait_ready = wait_ready  # type: ignore[method-assign]
    params = SamplingParams()
    async with running(sched), asyncio.TaskGroup() as tg:
        gens = [sched.generate(list(range(1, 300)), params, 3) for _ in range(2)]
        tasks = [tg.create_task(anext(g)) for g in gens]
        await settle()
        assert (sched.waiting, sched.running) == (2, 0) and queued == []
        await asyncio.sleep(0.05)
        gate.set()
        await settle()
        # Both prompts (2 chunks each) are admitted: the first chunks go at once (credits).
        assert sched.running == 2 and sched.waiting == 0
        assert len(queued) == 2 and all(q >= 0.05 for q in queued)
        for _ in range(20):
            ring.answer(sched)
            await settle()
            if all(t.done() for t in tasks):
                break
        for g in gens:
            await g.aclose()
    assert (sched.running, sched.waiting) == (0, 0)
    assert len(queued) == 2  # a replay or a later step never counts queue time again
