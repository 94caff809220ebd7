"""Namespaces for the security tests: hosts.Net's machinery (popen, run, logs, teardown) under
names of their own, so they never touch another test's namespaces, bridge or veths:

    zqs<N>-h0 .. zqs<N>-h<K-1>   10.219.<N>.1 .. .K /24 on bridge zqsbr<N>, veth ports zqs<N>h<i>b
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .hosts import Host, Net, sh


class SecNet(Net):
    def __init__(self, n_hosts: int, net_id: int) -> None:
        super().__init__(n_hosts, net_id)
        self.bridge = f"zqsbr{net_id}"
        self.hosts = [Host(f"zqs{net_id}-h{i}", f"10.219.{net_id}.{i + 1}") for i in range(n_hosts)]

    def _up(self) -> None:
        n = self.n
        self._logs = Path(tempfile.mkdtemp(prefix=f"zqsnet{n}-"))
        sh("ip", "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
        sh("ip", "link", "set", self.bridge, "up")
        for i, h in enumerate(self.hosts):
            port = f"zqs{n}h{i}b"
            sh("ip", "netns", "add", h.name)
            sh("ip", "-n", h.name, "link", "set", "lo", "up")
            sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h.name)
            sh("ip", "link", "set", port, "master", self.bridge, "up")
            sh("ip", "-n", h.name, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            sh("ip", "-n", h.name, "link", "set", "eth0", "up", "multicast", "on")
            sh("ip", "-n", h.name, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def down(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass  # unkillable within 10 s: deleting its namespace below still cuts it off
        self._procs.clear()
        if self._logs is not None:
            shutil.rmtree(self._logs, ignore_errors=True)
            self._logs = None
        existing = set(sh("ip", "netns", "list", check=False).stdout.split())
        for h in self.hosts:
            if h.name in existing:
                sh("ip", "netns", "del", h.name, check=False)
        if sh("ip", "link", "show", self.bridge, check=False).returncode == 0:
            sh("ip", "link", "del", self.bridge, check=False)
