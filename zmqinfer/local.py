"""A ring on one machine — `zmqinfer up`, the benchmark, the loopback tests — laid out one way:
its ports, the node command line, and the environment of nodes that share cores."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from zmqinfer.config import GatewaySpec, NodeSpec
from zmqinfer.wire import NodeId

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
