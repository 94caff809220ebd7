"""Real clusters on 127.0.0.1: `zmqinfer up` as a subprocess, the embedded model, real sockets.

`cluster` is one 3-node ring shared by the whole session (starting one costs seconds); tests
that break a ring start their own with `start_cluster`. `reference` is single-process mlx-lm
greedy generation of the same model: what the ring must reproduce token for token.
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
from typing import Iterator

import pytest

STARTUP_TIMEOUT_S = 180.0  # first run converts the embedded model; later runs take seconds


@dataclass
class Cluster:
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
    raise RuntimeError("no free port block")


def start_cluster(tmp: Path, nodes: int = 3, extra: list[str] | None = None) -> Cluster:
    port = free_port_block()
    log = tmp / f"cluster-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zmqinfer", "up", "--nodes", str(nodes), "--port", str(port), *(extra or [])],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    c = Cluster(port, proc, log)
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
    stop_cluster(c)
    raise RuntimeError(f"cluster not ready within {STARTUP_TIMEOUT_S}s:\n{c.output()[-4000:]}")


def stop_cluster(c: Cluster) -> None:
    pids = []
    try:
        pids = list(c.node_pids().values())
    except OSError:
        pass
    if c.proc.poll() is None:
        c.proc.send_signal(signal.SIGINT)
        try:
            c.proc.wait(15)
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
    for pid in pids:  # never leave a node behind, whatever happened to `up`
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from zmqinfer.model import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        stop_cluster(c)


class Reference:
    """Single-process mlx-lm greedy generation: the ground truth for token-exactness."""

    def __init__(self, model_dir: Path) -> None:
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_dir))

    def chat_ids(self, content: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                 add_generation_prompt=True)
        return list(ids)

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        out = []
        for tok, _ in generate_step(mx.array(prompt), self.model, max_tokens=max_tokens):
            out.append(int(tok))
            if out[-1] in self.tokenizer.eos_token_ids:
                break
        return out

    def text(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.tokenizer.eos_token_ids]
        return self.tokenizer.decode(ids)


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)
