"""The benchmark runs end to end at toy sizes, so it cannot rot between real measurements.

Sizes are tiny and the machine is shared: this checks that every section is there and sane,
never how fast anything is (the targets are read from a real run, not asserted here). The model
is a toy too: a 4-layer, 64-wide random llama with the embedded model's tokenizer, so that the
run (two rings, three baselines, one of them pinned) costs process start-ups, not inference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import with_real_tokenizer


@pytest.fixture(scope="module")
def toy_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights, real tokenizer (chat template, EOS ids) from the embedded model."""
    return with_real_tokenizer(tmp_path_factory.mktemp("toy"), model_dir, n_layers=4, hidden=64)


def test_bench_smoke(tmp_path: Path, toy_model: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "zmqinfer", "bench", "--model", str(toy_model),
                        "--nodes", "2", "--concurrency", "1,4",
                        "--tokens", "6", "--prompt-lengths", "16,64", "--reps", "1", "--pin",
                        "--level-timeout", "60", "--conversation-turns", "3", "--conversation-growth", "24",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    assert {"machine", "options", "wire", "baseline_before", "rings", "pinned", "baseline_after", "baseline",
            "targets", "phases", "server", "simulated"} <= set(rep)
    assert rep["machine"]["cpu"] and rep["machine"]["logical_cores"] >= 1 and rep["machine"]["blas"]["blas"]

    # Baselines and the ring: every measurement present and positive, none failed.
    setups = [rep["baseline_before"], *rep["rings"], rep["baseline_after"]]
    assert [x["setup"] for x in setups] == ["mlx-lm, single process", "ring, 2 nodes", "mlx-lm, single process"]
    for x in setups:
        assert "error" not in x, x.get("error")
        assert x["single"]["decode_tps"] > 0
        assert set(x["ttft"]) == {"16", "64"} and all(t["median_s"] > 0 for t in x["ttft"].values())
        assert set(x["batch"]) == {"1", "4"}
        for c, level in x["batch"].items():
            assert "error" not in level, level
            assert level["tps"] > 0 and 0 < level["tokens"] <= int(c) * 6
    ring = rep["rings"][0]
    # The prefix cache's conversation: every turn timed both ways, the late ones compared.
    conv = ring["conversation"]
    assert "error" not in conv, conv.get("error")
    assert conv["turns"] == 3 and conv["prompt_tokens"][1] - conv["prompt_tokens"][0] == 24
    assert all(t > 0 for t in conv["with_cache_s"] + conv["without_cache_s"]) and conv["late_speedup"] > 0
    assert "Conversation (prefix cache)" in r.stdout
    # An enforced JSON schema's cost: the same stream with and without it, side by side.
    grammar = ring["structured"]
    assert "error" not in grammar, grammar.get("error")
    assert grammar["plain_tps"] > 0 and grammar["grammar_tps"] > 0 and len(grammar["grammar_runs"]) == 1
    assert "**Enforced JSON schema**" in r.stdout
    assert [n["layers"] for n in ring["per_node"]] == [[0, 2], [2, 4]]
    assert all(n["shard_bytes"] > 0 and n["rss_bytes"] > n["shard_bytes"] for n in ring["per_node"])
    assert 0 < ring["ping"]["ring_ms"] < 1000 and set(ring["ping"]["control_ms"]) == {"node0", "node1"}

    # One core per node: each node and the single process on one core, one BLAS thread.
    pinned = rep["pinned"]
    can_pin = hasattr(os, "sched_setaffinity")
    if not can_pin:  # macOS: no CPU affinity; the run says so and carries on
        assert "not supported" in pinned["error"]
    else:
        assert pinned["concurrency"] == "4"
        base, pring = pinned["baseline"], pinned["ring"]
        assert "error" not in base and "error" not in pring
        usable = sorted(os.sched_getaffinity(0))
        assert base["process"]["affinity"] == usable[:1]
        assert base["process"]["openblas_num_threads"] == "1"
        cores = [n["process"]["affinity"] for n in pring["per_node"]]
        assert cores == [usable[:1], usable[1 % len(usable):][:1]]
        assert all(n["process"]["openblas_num_threads"] == "1" for n in pring["per_node"])
        assert pring["gateway"]["affinity"] == usable  # the gateway is not pinned
        assert pring["batch"]["4"]["tps"] > 0 and base["batch"]["4"]["tps"] > 0

    # Wire bytes from the real encoder: a decode step carries the hidden state and little else.
    hop = next(h for h in rep["wire"]["hops"] if h["hop"] == "node -> node" and h["measured_dtype"])
    hidden, size = rep["wire"]["hidden_size"], {"float32": 4, "bfloat16": 2, "float16": 2}[rep["wire"]["dtype"]]
    assert hidden * size < hop["b1_bytes"] < hidden * size + 512
    assert hidden * size <= hop["per_seq_bytes"] < hidden * size + 128

    # mlx_lm.server, fed the same requests; the simulated devices (3 at 10 ms: as specified).
    assert rep["server"]["setup"] == "mlx_lm.server, single process" and "error" not in rep["server"]
    assert all(rep["server"]["batch"][c]["tps"] > 0 for c in ("1", "4")), rep["server"]
    talk = rep["server"]["conversation"]  # the same conversation, on its own prompt cache
    assert "error" not in talk and talk["prompt_tokens"] == conv["prompt_tokens"], talk
    assert all(t > 0 for t in talk["with_cache_s"])
    sim = rep["simulated"]
    assert "error" not in sim and (sim["stages"], sim["devices"], sim["concurrency"]) == (3, 3, 16)

    # Every target is computed (issue 3's from stand-in settings at these sizes, and saying so);
    # issue 13's need 1- and 3-node rings, which this run has not: "not measured", but the
    # simulated ones are measured as specified.
    assert [t["id"] for t in rep["targets"]] == list(range(1, 15))
    measured = [t for t in rep["targets"] if (can_pin or t["id"] not in (2, 4)) and t["id"] not in (6, 7, 8, 9)]
    assert all(t["status"] in ("met", "missed") and t["measured"] is not None for t in measured)
    assert all(t["status"] == "not measured" for t in rep["targets"] if t["id"] in (6, 7, 8, 9))
    assert not rep["targets"][0]["as_specified"]  # 2 nodes stand in for 3
    assert not any(t["as_specified"] for t in rep["targets"] if t["id"] in (13, 14))  # and 3 turns for 10
    assert all(t["as_specified"] for t in rep["targets"] if t["id"] in (10, 11, 12))

    for title in ("**Single stream**", "**Aggregate tokens/s**", "**One core per node**", "**Per hop**",
                  "**Bytes on the wire", "**Memory**", "**BLAS per process**", "**Targets**",
                  "**Simulated devices**"):
        assert title in r.stdout
    assert "| ring, 2 nodes |" in r.stdout and "| mlx_lm.server, single process |" in r.stdout
    assert r.stdout.count("| mlx_lm.server, single process | 3 turns") == 1  # its conversation's row


def test_bench_rejects_nonsense_sizes() -> None:
    r = subprocess.run([sys.executable, "-m", "zmqinfer", "bench", "--concurrency", "0,4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--concurrency" in r.stderr


def test_simulated_devices_bench(tmp_path: Path) -> None:
    """`bench --simulate`: the report's shape, and what physics allows: sleeping devices cannot
    beat the ideal pipeline, every node did work, and each was busy at most all the time."""
    out = tmp_path / "sim.json"
    r = subprocess.run([sys.executable, "-m", "zmqinfer", "bench", "--simulate", "--stages", "2",
                        "--step-ms", "5", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    sim = json.loads(out.read_text())["simulate"]
    assert (sim["stages"], sim["step_ms"], sim["concurrency"], sim["devices"]) == (2, 5.0, 16, 2)
    assert sim["ideal_ms_per_token"] == 10.0 and sim["ideal_steps_per_s"] == 200.0
    assert sim["single_stream_ms_per_token"] >= 0.95 * sim["ideal_ms_per_token"]
    assert 0 < sim["aggregate_steps_per_s"] <= 1.05 * sim["ideal_steps_per_s"]
    assert set(sim["busy"]) == {"node0", "node1"} and all(0 < b <= 1.1 for b in sim["busy"].values())


def test_floor_bench(tmp_path: Path) -> None:
    """`bench --floor`: every relay mode and the simulated ring measured; a ring that does more
    than bare relays over as many hops cannot be faster than them."""
    out = tmp_path / "floor.json"
    r = subprocess.run([sys.executable, "-m", "zmqinfer", "bench", "--floor", "--nodes", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "| 1 (2) |" in r.stdout
    row = json.loads(out.read_text())["stages"]["1"]
    assert set(row) == {"sync", "asyncio", "thread", "mlx", "ring"}
    assert all(v > 0 for v in row.values()), row
    assert row["ring"] > row["sync"], row


def test_floor_refuses_an_unknown_mode() -> None:
    from zmqinfer.bench import floor

    with pytest.raises(ValueError, match="one of"):
        floor.relay_ms(1, "carrier-pigeon")
