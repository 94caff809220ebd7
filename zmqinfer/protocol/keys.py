"""CurveZMQ keys of a cluster (Ironhouse): one key pair per node and for the gateway, and a
cluster directory of the public keys everyone trusts. Shared by gateway, nodes and `zmqinfer keys`.

    DIR/public_keys/NAME.key            trusted public keys: the directory *is* the trust list
    DIR/private_keys/NAME.key_secret    this machine's own key pair (0600); only its own

The layout is pyzmq's (`zmq.auth.create_certificates`), so its tools read it. A peer's name is
the file's stem and identity is the key, never a routing id: `ClusterAuth` answers libzmq's ZAP
requests (so every CURVE handshake on a socket of this context is checked against the
directory) and `peer(frame)` maps each received message's ZAP User-Id (the client's public key)
back to the name it is trusted as, against the directory as it is *now*: a revoked key stops
being accepted on connections it already has, within one RELOAD_EVERY_S.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.certs import load_certificate
from zmq.utils import z85

log = structlog.get_logger()

GATEWAY = "gateway"  # the gateway's key pair's name in every cluster directory
PUBLIC, PRIVATE = "public_keys", "private_keys"
# How often the trust list is re-read (when the directory changed): a revoked key is refused
# within this long, without restarting anything. A stat() of one directory per second is free.
RELOAD_EVERY_S = 1.0
# Refusals are logged once per peer address (a scanner would otherwise fill the log); after this
# many distinct peers we only count.
MAX_LOGGED_PEERS = 256
ENV_DIR = "ZMQINFER_KEYS"  # where `node`/`gateway` look for the cluster directory by default


class CurveKeyError(ValueError):
    """A missing or unreadable key file; the message says which and how to make it."""


@dataclass(frozen=True)
class CurveKeys:
    """This process's key pair, and (for a connecting socket) the public key of the server it
    connects to. Secrets never appear in a repr."""

    name: str
    public: bytes  # z85
    secret: bytes  # z85
    directory: Path
    server_key: bytes | None = None  # z85; set by `toward` on client sockets

    def __repr__(self) -> str:
        return f"CurveKeys({self.name!r}, {self.directory})"

    def toward(self, peer: str) -> CurveKeys:
        """The same key pair, set up to connect to `peer` (its trusted public key)."""
        return replace(self, server_key=public_key(self.directory, peer))


def default_dir() -> Path | None:
    """$ZMQINFER_KEYS, else ~/.config/zmqinfer/cluster when it exists; None: no directory."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    home = Path.home() / ".config" / "zmqinfer" / "cluster"
    return home if (home / PUBLIC).is_dir() else None


def load_keys(directory: Path, name: str) -> CurveKeys:
    secret_file = directory / PRIVATE / f"{name}.key_secret"
    if not secret_file.exists():
        raise CurveKeyError(f"{secret_file}: no key pair for {name!r} (make one with "
                        f"`zmqinfer keys add {name} --dir {directory}` and copy it here)")
    public, secret = load_certificate(secret_file)
    if secret is None:
        raise CurveKeyError(f"{secret_file}: holds no secret key")
    trusted = directory / PUBLIC / f"{name}.key"
    if not trusted.exists() or load_certificate(trusted)[0] != public:
        raise CurveKeyError(f"{trusted}: {name!r}'s own public key is not in the trust list "
                        f"(run `zmqinfer keys trust {directory / PRIVATE / name}.key_secret`)")
    return CurveKeys(name, public, secret, directory)


def public_key(directory: Path, name: str) -> bytes:
    path = directory / PUBLIC / f"{name}.key"
    if not path.exists():
        raise CurveKeyError(f"{path}: {name!r} is not trusted in this cluster directory "
                        f"(`zmqinfer keys trust FILE` adds its public key)")
    return load_certificate(path)[0]


def trusted(directory: Path) -> dict[bytes, str]:
    """z85 public key -> name, for every file in public_keys/ (unreadable ones are skipped and
    logged: one bad file must not lock the whole cluster out)."""
    out: dict[bytes, str] = {}
    for f in sorted((directory / PUBLIC).glob("*.key")):
        try:
            out[load_certificate(f)[0]] = f.stem
        except (OSError, ValueError) as e:
            log.warning("unreadable public key file skipped", file=str(f), error=str(e))
    return out


def apply(s: zmq.Socket[Any], keys: CurveKeys | None, *, server: bool) -> None:
    """Set CURVE on `s` before it binds or connects (libzmq reads these at handshake time)."""
    if keys is None:
        return
    s.curve_secretkey = keys.secret
    s.curve_publickey = keys.public
    if server:
        s.curve_server = True
    else:
        assert keys.server_key is not None, "a connecting socket needs keys.toward(peer)"
        s.curve_serverkey = keys.server_key


class ClusterAuth(AsyncioAuthenticator):
    """ZAP for one process's context: CURVE clients are accepted only with a key in the cluster
    directory. `bind()` must run before any CURVE server socket binds (libzmq lets a handshake
    through unchecked when no ZAP handler is bound); `run()` answers requests and reloads the
    directory, inside the process's TaskGroup (pyzmq's own `start()` would detach a task)."""

    def __init__(self, ctx: zmq.asyncio.Context, directory: Path) -> None:
        super().__init__(ctx)
        self.directory = directory
        self.keys: dict[bytes, str] = {}
        self._stamp: tuple[tuple[str, int], ...] | None = None
        self.refused_handshakes = 0
        self.refused_messages = 0
        self.refused_peers: dict[str, str] = {}  # address or claimed name -> why (first seen)
        self.configure_curve_callback("*", self)
        self.reload()

    def bind(self) -> None:
        super(AsyncioAuthenticator, self).start()  # base: create and bind the ZAP socket only

    def reload(self) -> bool:
        """Re-read public_keys/ if it changed; whether it did."""
        d = self.directory / PUBLIC
        stamp: tuple[tuple[str, int], ...] = ()
        try:
            stamp = tuple(sorted((f.name, f.stat().st_mtime_ns) for f in d.glob("*.key")))
        except FileNotFoundError:
            pass  # a file removed between the glob and its stat: the next reload sees the change
        if stamp == self._stamp:
            return False
        self._stamp, before = stamp, set(self.keys.values())
        self.keys = trusted(self.directory)
        gone = sorted(before - set(self.keys.values()))
        log.info("cluster keys loaded", directory=str(self.directory), trusted=sorted(self.keys.values()),
                 revoked=gone or None)
        return True

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys  # key: z85 bytes of the client's public key

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        await super().handle_zap_message(msg)
        if len(msg) >= 7 and msg[5] == b"CURVE" and z85.encode(msg[6]) not in self.keys:
            self.refused_handshakes += 1
            self._note(msg[3].decode(errors="replace"), "handshake with a key not in the cluster directory")

    def peer(self, frame: zmq.Frame) -> str | None:
        """The trusted name of whoever sent `frame` (its ZAP User-Id is the client's z85 public
        key), or None: unknown or revoked since the handshake."""
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        return self.keys.get(str(user).encode())

    def admit(self, frame: zmq.Frame, want: str | None, what: str) -> bool:
        """Whether `frame` came from `want`'s key; if not, the refusal is counted and noted."""
        key = self.peer(frame)
        if key is not None and key == want:
            return True
        self.refuse(f"{what} from {key or 'an untrusted key'}", key, f"{what} not from {want or 'nobody assigned'}")
        return False

    def key_of(self, name: str) -> bytes | None:
        """The trusted z85 public key of `name`, or None."""
        return next((k for k, n in self.keys.items() if n == name), None)

    def ad_trusted(self, name: str, pubkey: str | None) -> bool:
        """Whether an mDNS ad for `name` advertising `pubkey` may count (ads are hints: the
        directory decides). A mismatch is noted once per (name, key), like a refused handshake."""
        if pubkey is not None and self.key_of(name) == pubkey.encode():
            return True
        self._note(f"mdns ad for {name} with key {pubkey or 'none'}",
                   "ad whose key is not the trusted key of that name (ignored)")
        return False

    def refuse(self, claimed: str, peer: str | None, what: str) -> None:
        """Count (and log once per claim) a message refused because its key is not the one the
        message's role needs."""
        self.refused_messages += 1
        self._note(f"{claimed} via key of {peer or 'nobody trusted'}", what)

    def _note(self, who: str, why: str) -> None:
        if who not in self.refused_peers and len(self.refused_peers) < MAX_LOGGED_PEERS:
            self.refused_peers[who] = why
            log.warning("refused a peer", peer=who, reason=why)

    async def run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.zap_socket, zmq.POLLIN)
        next_reload = time.monotonic() + RELOAD_EVERY_S
        while True:
            events = dict(await poller.poll(timeout=RELOAD_EVERY_S * 1000))
            if self.zap_socket in events:
                await self.handle_zap_message(self.zap_socket.recv_multipart())
            if time.monotonic() >= next_reload:
                self.reload()
                next_reload = time.monotonic() + RELOAD_EVERY_S

    def status(self) -> dict[str, Any]:
        return {"curve": True, "trusted": sorted(self.keys.values()),
                "refused_handshakes": self.refused_handshakes, "refused_messages": self.refused_messages,
                "refused_peers": dict(list(self.refused_peers.items())[:20])}
