"""What a node says about itself: the memory it offers, its heartbeat (which doubles as READY:
ports, memory, device, pid, epoch, usage counters, the addresses its data port listens on) and
its mDNS ad. Reads the worker's plain counters and the machine; sends nothing (the node's beat
loop does).
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

import psutil

from zmqinfer.mdns.adverts import NodeAd
from zmqinfer.node.accelerator import GpuSampler
from zmqinfer.node.dataplane import DataPlane
from zmqinfer.node.options import NodeOptions
from zmqinfer.node.worker import Worker
from zmqinfer.protocol.keys import ClusterAuth
from zmqinfer.protocol.wire import Epoch, Heartbeat

# Memory a node keeps beside its shard and KV caches while computing (mlx scratch buffers of a
# prefill chunk, the allocator's cache): what the KV cap leaves free under its memory.
KV_HEADROOM_BYTES = 32 << 20


def device_name() -> str:
    import mlx.core as mx  # only for the device kind; no mlx work happens here

    kind = "gpu" if mx.default_device() == mx.gpu else "cpu"
    where = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    # Pinned to some cores (`up --pin`): a device of its own, apart from nodes on other cores.
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cores and len(cores) < (os.cpu_count() or 0):
        where += f"; on core {','.join(map(str, cores))}"
    return f"{kind} ({where})"


def listening_addresses(bind: str) -> tuple[str, ...]:
    """The IPv4 addresses the data port accepts on, as this machine sees them: the bound one,
    or every interface's (loopback included: a gateway on this machine may connect there).
    Asked every beat, so a DHCP move shows up in the next one."""
    if bind != "0.0.0.0":
        return (bind,)
    return tuple(dict.fromkeys(a.address for addrs in psutil.net_if_addrs().values()
                               for a in addrs if a.family == socket.AF_INET))


class Report:
    def __init__(self, opts: NodeOptions, device: str, worker: Worker, data: DataPlane,
                 gpu: GpuSampler, auth: ClusterAuth | None) -> None:
        self.opts, self.device, self.worker, self.data, self.gpu, self.auth = opts, device, worker, data, gpu, auth
        self._proc = psutil.Process()

    def memory(self, vm: Any, rss: int) -> tuple[int, int]:
        """(total, free) bytes this node offers, within --memory-limit when set."""
        limit = self.opts.memory_limit
        if limit is None:
            return vm.total, vm.available
        return min(vm.total, limit), max(0, min(vm.available, limit - rss))

    def kv_budget(self, rss: int) -> int:
        """Bytes of KV cache this node may hold: what is left of its memory limit (or of the
        machine's available memory) beside what it uses now, less KV_HEADROOM_BYTES."""
        room = psutil.virtual_memory().available
        if self.opts.memory_limit is not None:
            room = min(room, self.opts.memory_limit - rss)
        return room - KV_HEADROOM_BYTES

    def ad(self, vm: Any) -> NodeAd:
        total, free = self.memory(vm, self._proc.memory_info().rss)
        return NodeAd(node_id=self.opts.name, data_port=self.opts.data_port, mem_total=total,
                      mem_free=free, device=self.device, fingerprint=self.worker.fingerprint,
                      pubkey=self.opts.keys.public.decode() if self.opts.keys else None)

    def heartbeat(self, epoch: Epoch, loaded: bool) -> tuple[Heartbeat, Any]:
        """This beat, and the memory reading it was made from (the ad's update reuses it)."""
        vm = psutil.virtual_memory()
        rss = self._proc.memory_info().rss
        total, free = self.memory(vm, rss)
        w, gpu = self.worker, self.gpu.latest
        refused = 0 if self.auth is None else self.auth.refused_handshakes + self.auth.refused_messages
        return Heartbeat(
            node=self.opts.name, data_port=self.opts.data_port, mem_total=total,
            mem_free=free, device=self.device, pid=os.getpid(), epoch=epoch,
            loaded=loaded, rss_bytes=rss,
            busy_seconds=w.busy_seconds, sequences=w.sequences,
            steps=w.steps, tokens=w.tokens, kv_bytes=w.kv_bytes, layers=w.layers,
            accel_memory_bytes=gpu.memory_bytes if gpu else None,
            gpu_utilization=gpu.utilization if gpu else None, stale_drops=self.data.stale_drops,
            addresses=listening_addresses(self.opts.bind), refused=refused), vm
