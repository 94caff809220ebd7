"""Start and stop a whole local cluster (`zmqinfer up` in a subprocess) from Python.

Used by the benchmark and the loopback tests, so both drive exactly what a user runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 180.0  # first run converts the embedded model; later runs take seconds
STOP_TIMEOUT_S = 15.0


@dataclass
class LocalCluster:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict:
        with urllib.request.urlopen(self.url + "/cluster/status", timeout=5) as r:
            return json.loads(r.read())

    def node_pids(self) -> dict[str, int]:
        return {n["name"]: n["pid"] for n in self.status()["nodes"]}

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port_block(n: int = 16) -> int:
    """A base port with `n` free ports above it (API, control, results, node data ports)."""
    for base in range(21000 + (os.getpid() % 200) * 100, 60000, 97):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports on 127.0.0.1")


def start(log_dir: Path, nodes: int = 3, extra: list[str] | None = None,
          env: dict[str, str] | None = None) -> LocalCluster:
    """`zmqinfer up` on free ports; returns once the ring serves (or raises with its log)."""
    port = free_port_block()
    log = log_dir / f"cluster-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zmqinfer", "up", "--nodes", str(nodes), "--port", str(port), *(extra or [])],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **(env or {})})
    c = LocalCluster(port, proc, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zmqinfer up exited with {proc.returncode}:\n{c.output()[-4000:]}")
        try:
            if c.status()["ready"]:
                return c
        except OSError:
            pass
        time.sleep(0.25)
    stop(c)
    raise RuntimeError(f"cluster not ready within {STARTUP_TIMEOUT_S:.0f}s:\n{c.output()[-4000:]}")


def stop(c: LocalCluster) -> None:
    pids: list[int] = []
    try:
        pids = [p for p in c.node_pids().values() if p]
    except OSError:
        pass
    if c.proc.poll() is None:
        c.proc.send_signal(signal.SIGINT)
        try:
            c.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
    for pid in pids:  # never leave a node behind, whatever happened to `up`
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
