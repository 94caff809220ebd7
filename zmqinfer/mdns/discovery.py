"""Zeroconf advertise/browse and `.local` resolution through mDNS itself.

Contract:

* A node (or the gateway) advertises one `_zmqinfer._tcp.local.` service whose TXT record is a
  :class:`NodeAd` (adverts.py: `to_txt`/`from_txt`, validated, size-limited). :class:`Advertiser` registers
  it, re-announces when it changes in a way that matters, and sends goodbyes on `close()`.
* :class:`Browser` keeps `{node id: Discovered}` up to date: each ad resolved to IPv4 literals
  from the service's own A records (never a name), entries dropped when their service goes away.
  A malformed or foreign ad is skipped and its reason kept in `ignored`; it never stops the
  browser.
* :func:`resolve_local_name` turns `mini2.local` into an IPv4 literal by asking mDNS directly.
  Nothing here hands a name to the system resolver (it cannot resolve `.local`) or to ZeroMQ.
* The static fallback is not here: `gateway/membership.merge_members` (pure) merges nodes.toml's
  static nodes with what was discovered.

Every network wait has a deadline; every task this module starts is cancelled and awaited on
`close()`. Bind both sides to explicit interface IPs where the default is wrong (network
namespaces, multi-homed Macs): pass `interfaces=[ip, ...]`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog
from zeroconf import (
    AddressResolverIPv4,
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from zmqinfer.config import LOCAL_HOST
from zmqinfer.mdns.adverts import AdError, NodeAd, server_name, worth_reannouncing
from zmqinfer.protocol.wire import NodeId

log = structlog.get_logger()

SERVICE_TYPE = "_zmqinfer._tcp.local."
RESOLVE_TIMEOUT_S = 3.0  # one mDNS resolve: answers come in ms on a LAN; 3 s covers retries
REGISTER_TIMEOUT_S = 10.0  # probing (~0.75 s) plus announcements (~1 s), with margin
CLOSE_TIMEOUT_S = 3.0  # goodbyes are best effort: a dying process must not hang on them
# Before registering, ask whether a live host already answers for our name: python-zeroconf's
# probing only consults its cache, so it misses a twin whose records it has not happened to
# cache (measured: 2 of 3 twins registered). A live owner answers in milliseconds.
DUPLICATE_CHECK_S = 1.5
# RFC 6762 suggests 120 s for host records; we use it for all records so a node that died
# without a goodbye leaves browsers' caches within two minutes instead of 75.
RECORD_TTL_S = 120



class DiscoveryError(RuntimeError):
    """Advertising could not start or re-announce (no usable interface, deadline passed)."""


class DuplicateNodeId(DiscoveryError):
    """Another live host already advertises this node id: two nodes must never share one."""


@dataclass(frozen=True)
class Discovered:
    ad: NodeAd
    addresses: tuple[str, ...]  # IPv4 literals from the service's A records, best first
    last_seen: float  # time.monotonic() of the last successful resolve
    service: str = ""  # the mDNS instance name, for messages
    host: str = ""  # the advertised host name (display only: never resolved by the system)
    source: Literal["mdns"] = "mdns"


def _is_ipv4(value: str) -> bool:
    try:
        return bool(ipaddress.IPv4Address(value))
    except ValueError:
        return False


Net = ipaddress.IPv4Network


def _ipv4s(values: Sequence[str], near: Sequence[Net] = ()) -> tuple[str, ...]:
    """Valid IPv4 literals: those on one of our `near` networks first, then the rest, then
    loopback and link-local (they only help when everything else is missing)."""
    ips = [ipaddress.IPv4Address(v) for v in values if _is_ipv4(v)]

    def rank(ip: ipaddress.IPv4Address) -> int:
        return 2 if ip.is_loopback or ip.is_link_local else (0 if any(ip in n for n in near) else 1)
    return tuple(dict.fromkeys(str(ip) for ip in sorted(ips, key=rank)))


def open_zeroconf(interfaces: Sequence[str] | None = None) -> AsyncZeroconf:
    """One AsyncZeroconf on these interface IPs (all when None), for an Advertiser and a Browser
    to share (pass it to both; close it with close_zeroconf after closing them)."""
    if interfaces is not None and (not interfaces or not all(map(_is_ipv4, interfaces))):
        raise DiscoveryError(f"interfaces must be IPv4 literals, got {list(interfaces)}")
    # IPv4 only: our addresses go into ZeroMQ endpoints as literals and we never need v6 scopes.
    try:
        return AsyncZeroconf(interfaces=list(interfaces) if interfaces else InterfaceChoice.All,
                             ip_version=IPVersion.V4Only)
    except OSError as e:  # e.g. an interface IP this host does not have (ENODEV)
        where = ", ".join(interfaces) if interfaces else "any interface"
        raise DiscoveryError(f"cannot open mDNS sockets on {where}: {e.strerror or e}") from e


def _local_networks(only: Sequence[str] | None = None) -> list[tuple[str, Net]]:
    """(ip, its network) for this host's non-loopback IPv4 addresses, or just `only`'s."""
    import ifaddr  # zeroconf's own dependency

    return [(ip.ip, ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False))
            for a in ifaddr.get_adapters() for ip in a.ips
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.") and (only is None or ip.ip in only)]



async def close_zeroconf(aiozc: AsyncZeroconf) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await aiozc.async_close()
    except (TimeoutError, OSError) as e:  # shutting down anyway; the sockets die with us
        log.warning("zeroconf did not close cleanly", error=repr(e))


class Advertiser:
    """Registers one ad. `start` -> any number of `update` -> `close` (goodbye)."""

    def __init__(self, aiozc: AsyncZeroconf | None = None, service_type: str = SERVICE_TYPE) -> None:
        self._given, self.aiozc, self.service_type = aiozc, aiozc, service_type
        self.info: ServiceInfo | None = None
        self.ad: NodeAd | None = None
        self._host, self._addresses = "", list[str]()

    async def start(self, ad: NodeAd, interfaces: Sequence[str] | None = None) -> None:
        """Register and announce; raises DiscoveryError (e.g. another node has this id).
        The ad lists `interfaces` (default: every non-loopback IPv4 address) under the A
        records of `adverts.server_name(node id)`, never the machine's host name: machines
        cloned from one image share that, and their answers for one name would mix."""
        addresses = list(interfaces) if interfaces else [ip for ip, _ in _local_networks()]
        host = server_name(ad.node_id)
        if not addresses:
            raise DiscoveryError("this host has no IPv4 address to advertise")
        if self.aiozc is None:
            self.aiozc = open_zeroconf(interfaces)
        self._host, self._addresses = host, addresses
        self.info = self._info(ad)
        try:
            twin = AsyncServiceInfo(self.service_type, self.info.name)
            async with asyncio.timeout(DUPLICATE_CHECK_S + REGISTER_TIMEOUT_S):
                if await twin.async_request(self.aiozc.zeroconf, int(DUPLICATE_CHECK_S * 1000)):
                    raise NonUniqueNameException(self.info.name)
                await (await self.aiozc.async_register_service(self.info))
        except NonUniqueNameException:
            await self._close_own()
            raise DuplicateNodeId(f"another host already advertises {ad.node_id!r} "
                                  "(node ids must be unique)") from None
        except (TimeoutError, OSError, BadTypeInNameException) as e:
            await self._close_own()
            raise DiscoveryError(f"could not advertise {ad.node_id!r}: {e!r}") from e
        self.ad = ad
        log.info("advertising", node=ad.node_id, host=host, addresses=addresses, port=ad.data_port)

    async def update(self, ad: NodeAd, *, force: bool = False) -> bool:
        """Re-announce if `ad` differs in a way that matters (or `force`); True if it did."""
        if self.info is None or self.ad is None or self.aiozc is None:
            raise DiscoveryError("update() before start()")
        if ad.node_id != self.ad.node_id:
            raise DiscoveryError("a node's id never changes: close() and start() a new ad")
        if not force and not worth_reannouncing(self.ad, ad):
            return False
        self.info = self._info(ad)  # same name and host: zeroconf replaces the records
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT_S):
                await (await self.aiozc.async_update_service(self.info))
        except (TimeoutError, OSError) as e:
            raise DiscoveryError(f"could not re-announce {ad.node_id!r}: {e!r}") from e
        self.ad = ad
        return True

    def _info(self, ad: NodeAd) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            self.service_type, f"{ad.node_id}.{self.service_type}", port=ad.data_port,
            properties=ad.to_txt(), server=self._host, parsed_addresses=self._addresses,
            host_ttl=RECORD_TTL_S, other_ttl=RECORD_TTL_S)

    async def close(self) -> None:
        """Say goodbye (best effort, bounded) and release the sockets we opened."""
        if self.info is not None and self.aiozc is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await (await self.aiozc.async_unregister_service(self.info))
            except (TimeoutError, OSError) as e:
                log.warning("goodbye not sent; browsers will expire us", error=repr(e))
        self.info = None
        await self._close_own()

    async def _close_own(self) -> None:
        if self._given is None and self.aiozc is not None:
            aiozc, self.aiozc = self.aiozc, None
            await close_zeroconf(aiozc)

    async def __aenter__(self) -> Advertiser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Browser:
    """The live table of advertised zmqinfer services (nodes and gateways)."""

    def __init__(self, aiozc: AsyncZeroconf | None = None, service_type: str = SERVICE_TYPE, *,
                 on_change: Callable[[], None] | None = None,
                 resolve_timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
        self._given, self.aiozc, self.service_type = aiozc, aiozc, service_type
        self.on_change, self.resolve_timeout_s = on_change, resolve_timeout_s
        self.table: dict[NodeId, Discovered] = {}
        self.ignored: dict[str, str] = {}  # service name -> why it is not in the table
        self.changed = asyncio.Event()  # set on every table change; consumers clear it
        self._ids: dict[str, NodeId] = {}  # service name -> node id it resolved to
        self._tasks: dict[str, asyncio.Task[None]] = {}  # one resolve per service, latest wins
        self._near: list[Net] = []
        self._browser: AsyncServiceBrowser | None = None
        self.started_at = 0.0

    async def start(self, interfaces: Sequence[str] | None = None) -> None:
        if self.aiozc is None:
            self.aiozc = open_zeroconf(interfaces)
        self._near = [net for _, net in _local_networks(interfaces)]
        self.started_at = time.monotonic()
        self._browser = AsyncServiceBrowser(self.aiozc.zeroconf, self.service_type,
                                            handlers=[self._on_state_change])

    async def close(self) -> None:
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # only cancellations and logged errors
        self._tasks.clear()
        await self._close_own()

    async def _close_own(self) -> None:  # the Advertiser's rule: close the zeroconf only if we opened it
        if self._given is None and self.aiozc is not None:
            aiozc, self.aiozc = self.aiozc, None
            await close_zeroconf(aiozc)

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_until(self, predicate: Callable[[dict[NodeId, Discovered]], bool],
                         timeout: float) -> bool:
        """Wait (at most `timeout` s) until `predicate(table)` holds; returns whether it did."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.table):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return predicate(self.table)
        return True

    # zeroconf calls this on the event loop thread with keyword arguments.
    def _on_state_change(self, *, zeroconf: Zeroconf, service_type: str, name: str,
                         state_change: ServiceStateChange) -> None:
        if (old := self._tasks.pop(name, None)) is not None:
            old.cancel()
        if state_change is ServiceStateChange.Removed:
            self.ignored.pop(name, None)
            if (node := self._ids.pop(name, None)) is not None and node in self.table:
                del self.table[node]
                log.info("node gone from mdns", node=node, service=name)
                self._changed()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name), name=f"resolve {name}")
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._reap(name, t))

    def _reap(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # _resolve handles every expected failure; anything else is a bug worth a traceback.
            log.error("mdns resolve crashed", service=name, exc_info=exc)

    async def _resolve(self, name: str) -> None:
        assert self.aiozc is not None
        try:
            info = AsyncServiceInfo(self.service_type, name)
            async with asyncio.timeout(self.resolve_timeout_s + 0.5):
                ok = await info.async_request(self.aiozc.zeroconf, int(self.resolve_timeout_s * 1000))
        except BadTypeInNameException:
            return self._ignore(name, "not a valid service name")
        except TimeoutError:
            ok = False
        if not ok:
            return self._ignore(name, f"did not answer a resolve within {self.resolve_timeout_s:.0f}s")
        try:
            ad = NodeAd.from_txt(info.properties)
        except AdError as e:
            return self._ignore(name, f"malformed ad: {e}")
        addresses = _ipv4s(info.parsed_addresses(IPVersion.V4Only), self._near)
        if not addresses:
            return self._ignore(name, "advertises no IPv4 address")
        previous = self._ids.get(name)
        if previous is not None and previous != ad.node_id:
            self.table.pop(previous, None)
        self.ignored.pop(name, None)
        self._ids[name] = ad.node_id
        entry = Discovered(ad, addresses, time.monotonic(), name, info.server or "")
        if (old := self.table.get(ad.node_id)) is not None and old.service != name:
            log.warning("two services claim one node id; keeping the newer", node=ad.node_id,
                        old=old.service, new=name)
        self.table[ad.node_id] = entry
        log.info("found node via mdns", node=ad.node_id, addresses=addresses, port=ad.data_port,
                 after_s=round(entry.last_seen - self.started_at, 3))
        self._changed()

    def _ignore(self, name: str, reason: str) -> None:
        if self.ignored.get(name) != reason:
            log.warning("ignoring mdns service", service=name, reason=reason)
        self.ignored[name] = reason

    def _changed(self) -> None:
        self.changed.set()
        if self.on_change is not None:
            self.on_change()


async def resolve_local_name(aiozc: AsyncZeroconf, name: str,
                             timeout: float = RESOLVE_TIMEOUT_S) -> str | None:
    """`mini2.local` -> its IPv4 literal, asked of mDNS directly; None after `timeout` s.

    Only `.local` names are accepted (ValueError otherwise): anything else would need a real
    DNS server, and this function must never fall back to the system resolver."""
    fqdn = name.rstrip(".") + "."
    if not LOCAL_HOST.fullmatch(fqdn.removesuffix(".")):
        raise ValueError(f"{name!r} is not a .local host name")
    resolver = AddressResolverIPv4(fqdn)
    try:
        async with asyncio.timeout(timeout + 0.5):
            ok = await resolver.async_request(aiozc.zeroconf, int(timeout * 1000))
    except TimeoutError:
        ok = False
    found = _ipv4s(resolver.parsed_addresses(IPVersion.V4Only)) if ok else ()
    return found[0] if found else None


async def discover(seconds: float, interfaces: Sequence[str] | None = None, *,
                   ignored: dict[str, str] | None = None) -> list[Discovered]:
    """Browse for `seconds`; what is advertising right now, by node id. Services skipped as
    malformed or unreachable are added to `ignored` (service name -> reason) when given."""
    async with Browser() as browser:
        await browser.start(interfaces)
        await asyncio.sleep(seconds)
        if ignored is not None:
            ignored.update(browser.ignored)
        return sorted(browser.table.values(), key=lambda d: d.ad.node_id)
