"""What a node is started with (`zmqinfer node`'s flags): shared by its process and its data plane."""

from __future__ import annotations

from dataclasses import dataclass

from zmqinfer.node.simulated import SimulatedCost
from zmqinfer.protocol.keys import CurveKeys
from zmqinfer.protocol.wire import NodeId


@dataclass(frozen=True)
class NodeOptions:
    name: NodeId
    gateway_host: str  # an IP address: never a name
    control_port: int
    data_port: int
    bind: str = "0.0.0.0"
    interfaces: tuple[str, ...] = ()  # IPs to advertise (and browse) on; () = every interface
    advertise: bool = True  # register _zmqinfer._tcp over mDNS
    memory_limit: int | None = None  # bytes this node offers for layers at most (tests, shared hosts)
    simulate: SimulatedCost | None = None  # stand in for a device: sleep instead of computing
    allow_sleep: bool = False  # no no-idle-sleep assertion while serving (node/sleep.py)
    keys: CurveKeys | None = None  # CurveZMQ key pair and cluster directory; None: plaintext
