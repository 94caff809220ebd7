"""A ring on one machine — `zmqinfer up`, the benchmark, the loopback tests — laid out one way
(its ports, the node command line, the environment of nodes that share cores), and started and
stopped from Python as real processes.

`start`/`stop`: a whole cluster (`zmqinfer up` in a subprocess). `start_node`, `start_gateway`
and `write_config`: lone `zmqinfer node` / `zmqinfer gateway` processes, as on separate
machines; `restart_up_node` brings back a node of an `up` cluster under its old name and port.
`signal_pid`, `wait_exit` and `wait_status` are the fault-injection and waiting primitives.
Used by `up`, the benchmark and the loopback tests, so all drive exactly what a user runs. Every
wait here has a deadline.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zmqinfer.config import GatewaySpec, NodeSpec
from zmqinfer.protocol.wire import NodeId

# `up --port P`: the API on P, control P+1, results P+2, node i's data port P+10+i.
CONTROL_OFFSET, RESULT_OFFSET, DATA_OFFSET = 1, 2, 10
# Nodes that share cores: OpenBLAS's idle threads spin by default and starve the stage that is
# computing; 2^4 cycles is the shortest spin OpenBLAS accepts (README, "Why these settings").
SHARED_CORES_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}
# One BLAS thread per process (pinned runs): OpenBLAS's pthreads build reads the first, its
# OpenMP build the second, each once when the library loads, so they must be in the environment
# a process starts with.
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def local_gateway(port: int, bind: str = "127.0.0.1") -> GatewaySpec:
    return GatewaySpec(address="127.0.0.1", bind=bind, port=port, control_port=port + CONTROL_OFFSET,
                       result_port=port + RESULT_OFFSET)


def local_node(port: int, index: int) -> NodeSpec:
    return NodeSpec(NodeId(f"node{index}"), "127.0.0.1", port + DATA_OFFSET + index)


def node_command(name: str, gateway_control: str, data_port: int, extra: Sequence[str] = ()) -> list[str]:
    """`zmqinfer node` on 127.0.0.1 with mDNS off: a local ring stays off the LAN (several on one
    machine would all advertise node0, node1...)."""
    return [sys.executable, "-m", "zmqinfer", "node", "--name", name, "--bind", "127.0.0.1",
            "--gateway", gateway_control, "--port", str(data_port), "--no-advertise", *extra]


# Where `up` reads API keys from (gateway/api/auth.py's ENV_KEYS; shared code imports no role).
API_KEY_ENV = "ZMQINFER_API_KEY"
STARTUP_TIMEOUT_S = 180.0  # first run converts the embedded model; later runs take seconds
STOP_TIMEOUT_S = 15.0
NODE_STOP_TIMEOUT_S = 10.0  # a node's own SIGTERM path: say bye, close sockets, exit


@dataclass
class LocalCluster:
    port: int
    proc: subprocess.Popen
    log: Path
    keys: Path | None = None  # the cluster directory of an `up` ring (Curve), None: plaintext
    api_key: str | None = None  # the ring's API key, when it has one (else protected mode)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self, timeout: float = 5.0) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        request = urllib.request.Request(self.url + "/cluster/status", headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as r:
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
          env: dict[str, str] | None = None, api_key: str | None = None) -> LocalCluster:
    """`zmqinfer up` on free ports; returns once the ring serves (or raises with its log).
    `api_key`: the API requires it (as $ZMQINFER_API_KEY), and the status polls here send it."""
    port = free_port_block()
    log = log_dir / f"cluster-{port}.log"
    # Curve as `up` does it by default, in a directory we know: restart_up_node needs its keys.
    keys = None if "--no-curve" in (extra or []) else log_dir / f"cluster-{port}-keys"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zmqinfer", "up", "--nodes", str(nodes), "--port", str(port),
         *(["--keys", str(keys)] if keys else []), *(extra or [])],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **(env or {}), **({API_KEY_ENV: api_key} if api_key else {})})
    c = LocalCluster(port, proc, log, keys, api_key)
    try:
        wait_ready(c, STARTUP_TIMEOUT_S)
    except RuntimeError:
        stop(c)
        raise
    return c


def wait_ready(c: LocalCluster, timeout: float) -> dict:
    """Wait until the gateway says the ring serves; its status then. Raises RuntimeError (with
    the gateway's log) if its process exits or the deadline passes."""
    return wait_status(c, lambda st: bool(st["ready"]), timeout, "the ring to be ready")


def wait_status(c: LocalCluster, ok: Callable[[dict], bool], timeout: float, what: str,
                every: float = 0.25, nodes: Sequence[NodeProcess] = ()) -> dict:
    """Poll /cluster/status until `ok(status)`; that status. An unreachable gateway counts as
    not yet. Raises RuntimeError naming `what`, the last status and the log's tail, at the
    deadline or as soon as the gateway or one of the lone `nodes` exits."""
    deadline = time.monotonic() + timeout
    last: dict | str = "no answer yet"
    while True:
        if c.proc.poll() is not None:
            raise RuntimeError(f"the gateway process {c.proc.pid} exited with {c.proc.returncode} "
                               f"while waiting for {what}:\n{c.output()[-4000:]}")
        for n in nodes:
            if n.proc.poll() is not None:
                raise RuntimeError(f"node {n.name} (pid {n.pid}) exited with {n.proc.returncode} while "
                                   f"waiting for {what}:\n{n.output()[-4000:]}")
        try:
            last = c.status(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            if ok(last):
                return last
        except OSError as e:
            last = f"no answer: {e}"
        if time.monotonic() >= deadline:
            raise RuntimeError(f"not {what} within {timeout:.0f}s; last status: {last}\n"
                               f"log tail:\n{c.output()[-4000:]}")
        time.sleep(every)


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


# ---- lone processes: nodes and gateways as on separate machines ---------------------------------


@dataclass
class NodeProcess:
    """A `zmqinfer node` started here (not by `up`): its name, data port, process and log."""

    name: str
    data_port: int
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_node(log_dir: Path, name: str, gateway_control: str, data_port: int,
               extra: list[str] | None = None, env: dict[str, str] | None = None) -> NodeProcess:
    """`zmqinfer node --name NAME` on 127.0.0.1, reporting to `gateway_control` (IP:port), with
    mDNS advertising off (tests stay off the LAN). Returns at once (it registers by itself)."""
    log = log_dir / f"node-{name}-{data_port}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(node_command(name, gateway_control, data_port, extra or []),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **SHARED_CORES_ENV, **(env or {})})
    return NodeProcess(name, data_port, proc, log)


def restart_up_node(c: LocalCluster, log_dir: Path, name: str, extra: list[str] | None = None) -> NodeProcess:
    """Start again a node of an `up` cluster (`node<i>`) with its old name and data port
    (API port + 10 + i), reporting to the same gateway, as a lone process."""
    index = int(name.removeprefix("node"))
    keys = ["--keys", str(c.keys)] if c.keys is not None else ["--no-curve"]
    return start_node(log_dir, name, f"127.0.0.1:{c.port + CONTROL_OFFSET}", c.port + DATA_OFFSET + index,
                      [*keys, *(extra or [])])


def write_config(path: Path, port: int, names: list[str], model: Path | str | None = None) -> Path:
    """A nodes.toml for a loopback cluster laid out like `up --port PORT`: the gateway on PORT
    (control PORT+1, results PORT+2), node i at 127.0.0.1 with data port PORT+10+i."""
    lines = [f"model = {json.dumps(str(model))}"] if model is not None else []
    lines += ["", "[gateway]", 'address = "127.0.0.1"', 'bind = "127.0.0.1"', f"port = {port}",
              f"control_port = {port + CONTROL_OFFSET}", f"result_port = {port + RESULT_OFFSET}"]
    for i, name in enumerate(names):
        lines += ["", "[[node]]", f"name = {json.dumps(name)}", 'address = "127.0.0.1"',
                  f"port = {port + DATA_OFFSET + i}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_gateway(log_dir: Path, config: Path, port: int, extra: list[str] | None = None,
                  env: dict[str, str] | None = None) -> LocalCluster:
    """`zmqinfer gateway --config CONFIG --no-discovery` (nodes.toml only, off the LAN).
    Returns at once: wait with `wait_ready`. `stop` on the result stops only this process and
    the nodes it reports; stop lone nodes with `stop_node`."""
    log = log_dir / f"gateway-{port}-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "zmqinfer", "gateway", "--config", str(config), "--no-discovery"]
    proc = subprocess.Popen([*cmd, *(extra or [])], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})
    return LocalCluster(port, proc, log)


def stop_node(n: NodeProcess, timeout: float = NODE_STOP_TIMEOUT_S) -> None:
    """SIGTERM (after SIGCONT, in case it was stopped), then SIGKILL past the deadline."""
    if n.proc.poll() is None:
        signal_pid(n.pid, signal.SIGCONT)
        n.proc.send_signal(signal.SIGTERM)
        if wait_exit(n.proc, timeout) is None:
            n.proc.kill()
            n.proc.wait()


# ---- signals and exits ----------------------------------------------------------------------


def signal_pid(pid: int, sig: int) -> bool:
    """Send `sig` to `pid`; False if there is no such process (any more)."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def pid_running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (a dead child its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): signal 0 says whether it exists
        return signal_pid(pid, 0)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit status of `proc` if it exits within `timeout`, else None (still running)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """For processes that are not our children (nodes of `up`): whether `pid` is gone (or a
    zombie) within `timeout`."""
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
