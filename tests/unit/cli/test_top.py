"""cli/top.py without a terminal: the picture it draws for a status document, a gateway that is
gone, and refusing to start without a terminal. The real-terminal run (tmux, a real ring, `q`)
is tests/loopback/test_observe.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from rich.console import Console

from tests.unit.gateway.test_metrics import node, status
from zmqinfer.cli.top import Poll, fetch_status, view


def text(renderable: object) -> str:
    console = Console(width=160, record=True, force_terminal=False, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_one_row_per_node_in_ring_order_with_its_numbers() -> None:
    st = status([node("b", layers=[15, 30], busy_fraction=0.8, gpu_utilization=0.42, accel_memory_bytes=2 << 30),
                 node("a", layers=[0, 15], busy_fraction=0.25),
                 node("spare", layers=None, health="stopped sending heartbeats 9.0s ago")])
    st["throughput"] = {"window_s": 5.0, "generation_tokens_per_s": 31.5, "prompt_tokens_per_s": 120.0,
                        "ttft_s": 0.42}
    out = text(view("http://gw:8100", Poll(st, None, time.monotonic()), 1.0))
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["a", "b", "spare"]  # ring order, then the rest
    a, b, spare = rows
    assert "[0,15)" in a and "25%" in a and "n/a" in a  # no GPU reading: n/a, not 0%
    assert "[15,30)" in b and "80%" in b and "42%" in b and "2048 MiB" in b
    assert "stopped sending heartbeats" in spare and "-" in spare.split("│")[2]
    assert "31.5 tok/s generated" in out and "TTFT 0.42s" in out and "1 waiting, 2 running" in out
    assert "ready" in out and "epoch 7" in out


def test_a_gateway_that_is_gone_is_shown_not_raised() -> None:
    st = status([node("a")])
    out = text(view("http://gw:8100", Poll(st, "no gateway at http://gw:8100 (Connection refused)",
                                            time.monotonic() - 12), 1.0))
    assert "gateway unreachable" in out and "Connection refused" in out
    assert "showing what it said 12s ago" in out and "│ a" in out
    first = text(view("http://gw:8100", Poll(None, "no gateway at http://gw:8100 (refused)"), 1.0))
    assert "gateway unreachable" in first and "│" not in first


def test_fetch_names_what_is_missing_within_the_deadline() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(OSError, match=f"no gateway at http://127.0.0.1:{port}"):
        fetch_status(f"http://127.0.0.1:{port}", None, timeout=1.0)
    assert time.monotonic() - t0 < 5


def test_top_refuses_to_run_without_a_terminal() -> None:
    r = subprocess.run([sys.executable, "-m", "zmqinfer", "top", "--url", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "needs a terminal" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "zmqinfer", "top", "--interval", "0.01"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--interval 0.01" in r.stderr
