"""Who may use the HTTP API: `Authorization: Bearer` keys, or protected mode, as one middleware.

* With keys, every route but /health (and /metrics when `metrics_open`) needs one of them, sent
  as `Authorization: Bearer` or `x-api-key` (Anthropic's header): 401 in the request's dialect's
  error shape otherwise. New routes are guarded without doing anything.
* Keys are kept only as SHA-256 digests and compared in constant time against every digest, so
  timing tells neither a key nor which one matched. Each has a name, which is what logs and
  /cluster/status show; a key itself never appears in a log line or a reply.
* No keys configured: **protected mode** (as Redis does it): only clients on this machine
  (loopback, or one of its own addresses) are answered, anyone else gets 403 saying how to set a key. `--no-auth` (mode "open") is the explicit way out.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from aiohttp import web

from zmqinfer.clusterstatus import ApiAuthStatus

log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Mode = Literal["keys", "protected", "open"]
ENV_KEYS = "ZMQINFER_API_KEY"  # comma-separated; the CLI's status/ping/top read it too
KEY_NAME = web.RequestKey("api_key_name", str)  # which key a request came with, for logs
OPEN_PATHS = frozenset({"/health"})  # a load balancer's probe needs no key
# The status page and the chat are static files a browser loads without a header; they hold no
# data and send the key (given once as ?key=) with every API call they make.
OPEN_PAGES = ("/", "/chat")
OPEN_PREFIX = "/static/"
# Shorter keys are guessable; 16 characters of a random key are ~80+ bits.
MIN_KEY_LENGTH = 16


class KeyFileError(ValueError):
    """A bad key file or key; the message names the file and line, never the key."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiGuard:
    digests: tuple[tuple[str, bytes], ...]  # (name, sha256(key))
    mode: Mode
    metrics_open: bool = False
    refused: list[int] | None = None  # one mutable counter cell in a frozen guard
    # Web origins whose scripts may call the API (cors.py); empty: this machine's pages only.
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_keys(cls, named: Mapping[str, str], *, no_auth: bool = False,
                  metrics_open: bool = False, cors_origins: tuple[str, ...] = ()) -> ApiGuard:
        """`named`: name -> key. No keys: protected mode, or open with `no_auth`."""
        digests = tuple((name, _digest(key)) for name, key in named.items())
        mode: Mode = "keys" if digests else ("open" if no_auth else "protected")
        return cls(digests, mode, metrics_open, [0], cors_origins)

    def match(self, token: str) -> str | None:
        """The name of the key `token` is, or None. Constant time in the token's content."""
        got, name = _digest(token), None
        for n, d in self.digests:
            if hmac.compare_digest(got, d):  # no early exit: every digest is compared
                name = n
        return name

    def describe(self) -> ApiAuthStatus:
        return {"mode": self.mode, "keys": [n for n, _ in self.digests],
                "metrics_open": self.metrics_open, "refused": self.refused[0] if self.refused else 0}

    def announce(self) -> None:
        """One log line at start saying how the API is guarded (names only)."""
        if self.mode == "keys":
            log.info("api keys required", keys=[n for n, _ in self.digests], metrics_open=self.metrics_open)
        elif self.mode == "protected":
            log.warning("protected mode: no API keys configured, so only loopback clients are answered "
                        "(set [api] keys / key_file in nodes.toml, --api-key-file or ZMQINFER_API_KEY; "
                        "--no-auth opens the API to everyone)")
        else:
            log.warning("--no-auth: the API answers anyone who can reach it, without a key")

    def _refuse(self) -> None:
        if self.refused is not None:
            self.refused[0] += 1


def own_addresses() -> set[str]:
    """Every IP address of this machine's interfaces, now (DHCP may change them)."""
    import psutil

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def _address(remote: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP (an IPv4-mapped IPv6 one as IPv4, a zone id dropped), or None."""
    if not remote:
        return None
    try:
        ip = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local(remote: str | None) -> bool:
    """A client on this machine: loopback, or one of this machine's own addresses (a client here
    that connects to the LAN address; a remote peer cannot complete a TCP handshake from it)."""
    ip = _address(remote)
    return ip is not None and (ip.is_loopback or str(ip) in own_addresses())


def is_loopback(remote: str | None) -> bool:
    ip = _address(remote)
    return ip is not None and ip.is_loopback


def presented_key(request: web.Request) -> str:
    """The key a request carries: `Authorization: Bearer <key>` (OpenAI, Ollama) or, as
    Anthropic's clients send it, `x-api-key: <key>`; "" for none."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key", "").strip()


def middleware(guard: ApiGuard,
               error: Callable[[web.Request, int, str, str], web.StreamResponse]
               ) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The aiohttp middleware for `guard`; `error(request, status, message, code)` shapes the
    refusal (in the request's dialect)."""

    @web.middleware
    async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if (path in OPEN_PATHS or path in OPEN_PAGES or path.startswith(OPEN_PREFIX)
                or (guard.metrics_open and path == "/metrics") or guard.mode == "open"):
            return await handler(request)
        if guard.mode == "protected":
            if is_local(request.remote):
                return await handler(request)
            guard._refuse()
            log.warning("protected mode refused a client", peer=request.remote, path=path)
            return error(request, 403, "protected mode: this gateway has no API keys configured, so it answers "
                              "loopback clients only. Set a key ([api] keys or key_file in nodes.toml, "
                              "--api-key-file, or ZMQINFER_API_KEY) and send 'Authorization: Bearer <key>', "
                              "or start the gateway with --no-auth to serve everyone", "protected_mode")
        name = guard.match(token) if (token := presented_key(request)) else None
        if name is None:
            guard._refuse()
            log.info("refused: missing or invalid API key", peer=request.remote, path=path)
            return error(request, 401, "missing or invalid API key: send 'Authorization: Bearer"
                         " <key>' (or 'x-api-key: <key>')", "invalid_api_key")
        request[KEY_NAME] = name
        return await handler(request)

    return guarded


# ---- where keys come from -------------------------------------------------------------------


def read_key_file(path: Path) -> dict[str, str]:
    """One key per line, optionally `NAME KEY`; blank lines and `#` comments skipped. A bare key
    is named `FILE:LINE`."""
    try:
        text = path.read_text()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the API key file ({e.strerror})") from None
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise KeyFileError(f"{path}:{i}: expected KEY or NAME KEY")
        name, key = (parts[0], parts[1]) if len(parts) == 2 else (f"{path.name}:{i}", parts[0])
        _check(key, f"{path}:{i}")
        out[name] = key
    return out


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    raw = (environ if environ is not None else os.environ).get(ENV_KEYS, "")
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    for i, k in enumerate(keys, 1):
        _check(k, f"{ENV_KEYS} (key {i})")
    return {f"env:{i}": k for i, k in enumerate(keys, 1)}


def gather(config_keys: Iterable[str], key_files: Iterable[Path],
           environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every configured key, name -> key: nodes.toml's `[api] keys` (named config:N), then its
    key_file and --api-key-file, then $ZMQINFER_API_KEY."""
    named: dict[str, str] = {}
    for i, k in enumerate(config_keys, 1):
        _check(k, f"[api] keys (key {i})")
        named[f"config:{i}"] = k
    for f in key_files:
        named.update(read_key_file(f))
    named.update(from_env(environ))
    return named


def _check(key: str, where: str) -> None:
    if len(key) < MIN_KEY_LENGTH:
        raise KeyFileError(f"{where}: an API key needs at least {MIN_KEY_LENGTH} characters "
                           "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
