"""Throwaway "hosts" for multi-host tests: one network namespace per host on one bridge.

    zq<N>-h0 .. zq<N>-h<K-1>   10.213.<N>.1 .. .K /24, each `eth0` a veth whose peer is a port
                               of bridge zqbr<N> (no address on the root side: the test never
                               talks from the root namespace, and nothing leaks onto real links)
    zq<N>-r + zq<N>-m          optional: a host whose network blocks multicast. It sits behind a
                               router namespace (10.214.<N>.0/24): unicast is routed to and from
                               the LAN, link-local multicast (mDNS) never crosses a router.

Why a router: this kernel has no tc classifiers/actions and no iptables/nftables, and
`ip link set multicast off` does not stop a socket from sending or receiving multicast on a veth
(measured). Being on another subnet is also how multicast is "blocked" in real networks.

Root only (`skip_reason()` says why not). `Net` removes leftovers of an earlier crashed run
with the same N before building, and tears everything down on exit, also when a test fails.
Every command has a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

CMD_TIMEOUT_S = 10.0  # one `ip` invocation; they take milliseconds
ROOT = Path(__file__).resolve().parents[2]


def skip_reason() -> str | None:
    """None when namespaces can be built here, else why not (for pytest.skip)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs these as root)"
    if shutil.which("ip") is None:
        return "iproute2 `ip` is not installed (apt-get install -y iproute2)"
    probe = "zqprobe-%d" % os.getpid()
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                       timeout=CMD_TIMEOUT_S)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=CMD_TIMEOUT_S)
    return None


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return r


@dataclass(frozen=True)
class Host:
    name: str  # the namespace
    ip: str
    multicast: bool = True


class Net:
    def __init__(self, n_hosts: int, net_id: int, *, blocked_host: bool = False) -> None:
        if not 1 <= net_id <= 250 or not 1 <= n_hosts <= 200:
            raise ValueError("net_id in 1..250, n_hosts in 1..200")
        self.n = net_id
        self.bridge = f"zqbr{net_id}"
        self.hosts = [Host(f"zq{net_id}-h{i}", f"10.213.{net_id}.{i + 1}") for i in range(n_hosts)]
        self.router = f"zq{net_id}-r" if blocked_host else None
        self.blocked = Host(f"zq{net_id}-m", f"10.214.{net_id}.2", multicast=False) if blocked_host else None
        self._procs: list[subprocess.Popen[str]] = []
        self._logs: Path | None = None  # the processes' stderr files, removed on teardown
        self._stderr: dict[int, Path] = {}

    def __enter__(self) -> Net:
        self.down()  # leftovers of a crashed run with the same id
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _up(self) -> None:
        n = self.n
        self._logs = Path(tempfile.mkdtemp(prefix=f"zqnet{n}-"))
        # No snooping: mDNS is link-local multicast and must simply be flooded to every port.
        sh("ip", "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
        sh("ip", "link", "set", self.bridge, "up")
        lan = [(h.name, h.ip, f"zq{n}h{i}b") for i, h in enumerate(self.hosts)]
        if self.router:
            lan.append((self.router, f"10.213.{n}.254", f"zq{n}rb"))
        for ns, ip, port in lan:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", port, "master", self.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up", "multicast", "on")
            # Where a process picks no interface, multicast leaves through eth0.
            sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        if self.router and self.blocked:
            m, r = self.blocked.name, self.router
            sh("ip", "netns", "add", m)
            sh("ip", "-n", m, "link", "set", "lo", "up")
            sh("ip", "-n", r, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", m)
            sh("ip", "-n", r, "addr", "add", f"10.214.{n}.1/24", "dev", "eth1")
            sh("ip", "-n", r, "link", "set", "eth1", "up")
            sh("ip", "-n", m, "addr", "add", f"{self.blocked.ip}/24", "dev", "eth0")
            sh("ip", "-n", m, "link", "set", "eth0", "up", "multicast", "off")
            sh("ip", "-n", m, "route", "add", "default", "via", f"10.214.{n}.1")
            sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for h in self.hosts:
                sh("ip", "-n", h.name, "route", "add", f"10.214.{n}.0/24", "via", f"10.213.{n}.254")

    def down(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=CMD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        if self._logs is not None:
            shutil.rmtree(self._logs, ignore_errors=True)
            self._logs = None
        existing = set(sh("ip", "netns", "list", check=False).stdout.split())
        for ns in [h.name for h in self.hosts] + [f"zq{self.n}-r", f"zq{self.n}-m"]:
            if ns in existing:
                # Deleting a namespace kills its veth ends, which removes the bridge ports too.
                sh("ip", "netns", "del", ns, check=False)
        if sh("ip", "link", "show", self.bridge, check=False).returncode == 0:
            sh("ip", "link", "del", self.bridge, check=False)

    # ---- running things inside a host -------------------------------------------------------

    def popen(self, host: Host, argv: list[str], *,
              env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start `argv` in `host`'s namespace (stdio piped); killed on teardown. Every host
        keeps this machine's host name (network namespaces share one UTS namespace), as
        machines installed from one image do: nothing may rely on host names being unique.
        `env` adds to this process's environment."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
        # stdin is a pipe the process may watch: closing it asks for a clean stop. stderr goes
        # to a file, so a chatty process can never block on a full pipe nobody is reading.
        assert self._logs is not None, "use Net as a context manager"
        log = self._logs / f"{host.name}-{len(self._procs)}.log"
        with open(log, "w") as err:
            p = subprocess.Popen(["ip", "netns", "exec", host.name, *argv], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
        self._procs.append(p)
        self._stderr[p.pid] = log
        return p

    def run(self, host: Host, argv: list[str], timeout: float,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` to completion in `host`'s namespace (killed after `timeout` s)."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
        return subprocess.run(["ip", "netns", "exec", host.name, *argv], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)

    def terminate(self) -> None:
        """SIGTERM every process still running, then wait a little: a clean stop says goodbye
        over mDNS. down() kills whatever is left."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=CMD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass

    def stderr(self, p: subprocess.Popen[str]) -> str:
        """What `p` wrote to stderr so far (its log lines), for failure messages."""
        log = self._stderr.get(p.pid)
        return log.read_text(errors="replace") if log and log.exists() else ""

    @staticmethod
    def ask_to_stop(p: subprocess.Popen[str]) -> None:
        """Close its stdin (our agents stop cleanly on that); communicate() still works."""
        if p.stdin is not None:
            p.stdin.close()
            p.stdin = None

    def python(self, host: Host, code: str, *args: str) -> subprocess.Popen[str]:
        return self.popen(host, [sys.executable, "-c", textwrap.dedent(code), *args])

    def multicast_reaches(self, pairs: list[tuple[Host, Host]], timeout: float = 1.5) -> list[bool]:
        """For each (src, dst): does a plain UDP datagram to 224.0.0.251 from src arrive at dst?
        Each pair gets its own port (not mDNS's, so no responder is disturbed; own ports also
        keep a host's looped-back sends out of its own probe). The harness checks its blocking."""
        recvs = []
        for i, (_, dst) in enumerate(pairs):
            recv = self.python(dst, _MC_RECV, dst.ip, str(timeout), str(_MC_PORT + i))
            recvs.append(recv)
        for recv, (_, dst) in zip(recvs, pairs):
            if recv.stdout is None or recv.stdout.readline().strip() != "listening":
                raise RuntimeError(f"multicast probe receiver failed in {dst.name}")
        sends = [self.python(src, _MC_SEND, src.ip, str(_MC_PORT + i)) for i, (src, _) in enumerate(pairs)]
        for s in sends:
            s.wait(timeout=CMD_TIMEOUT_S)
        results = []
        for r in recvs:
            r.wait(timeout=timeout + CMD_TIMEOUT_S)
            assert r.stdout is not None
            results.append(r.stdout.read().strip() == "got")
        return results


_MC_PORT = 5390
_MC_RECV = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[3])))
try:
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                 socket.inet_aton("224.0.0.251") + socket.inet_aton(sys.argv[1]))
except OSError:
    pass  # a host that cannot even join receives nothing, which is the answer
print("listening", flush=True)
s.settimeout(float(sys.argv[2]))
try:
    s.recvfrom(64)
    print("got")
except TimeoutError:
    print("nothing")
"""
_MC_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[1]))
for _ in range(3):
    try:
        s.sendto(b"probe", ("224.0.0.251", int(sys.argv[2])))
    except OSError:
        pass  # unroutable: nothing leaves, which is what the probe measures
    time.sleep(0.1)
"""
