"""Being found and finding others at run time: the glue between the processes and discovery.py.

* :class:`NodePresence` — a node's own `_zmqinfer._tcp` ad. `start` registers it, `update` (every
  heartbeat) re-announces only when `adverts.worth_reannouncing` says so and never waits on the
  network, `close` says goodbye. Failing to advertise is logged, never fatal: the node still
  works through a static address in nodes.toml (or `--gateway`). Only a duplicate node id raises.
* :class:`GatewayDirectory` — the gateway's view of the LAN: one zeroconf for browsing and for
  the gateway's own ad (so nodes started without `--gateway` find it), plus nodes.toml's `.local`
  hosts resolved through mDNS itself, retried while unresolved and refreshed now and then.
* :func:`find_gateway` — what a node without `--gateway` does: browse for the one gateway.

Nothing here hands a `.local` name to the system resolver. Every zeroconf call has a deadline;
every task started here is owned and cancelled/awaited by `close()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import structlog
from zeroconf.asyncio import AsyncZeroconf

from zmqinfer.mdns.adverts import NodeAd, refusal, worth_reannouncing
from zmqinfer.mdns.discovery import (
    SERVICE_TYPE,
    Advertiser,
    Browser,
    Discovered,
    DiscoveryError,
    DuplicateNodeId,
    close_zeroconf,
    open_zeroconf,
    resolve_local_name,
)
from zmqinfer.protocol.wire import NodeId

log = structlog.get_logger()

# A re-announcement is three multicast packets ~1 s apart; past this something is wrong and the
# next heartbeat tries again. It runs beside the beats, so it never delays one.
REANNOUNCE_TIMEOUT_S = 5.0
REANNOUNCE_RETRY_S = 10.0  # after a failed re-announcement: do not retry (and log) every beat
HOST_RESOLVE_TIMEOUT_S = 2.0  # one `.local` query; a live host answers in milliseconds
HOST_RETRY_S = 3.0  # an unresolved nodes.toml host is asked again this often
HOST_REFRESH_S = 60.0  # a resolved one is re-checked this often (DHCP may move it)
# After the first gateway answers, wait this long for a second one: every responder answers the
# same query within ~120 ms (RFC 6762 §6), so 1 s tells "one gateway" from "several".
GATEWAY_SETTLE_S = 1.0


class NodePresence:
    """A node's mDNS ad: `start` -> `update` every heartbeat -> `close`."""

    def __init__(self, interfaces: Sequence[str] = (), *, service_type: str = SERVICE_TYPE) -> None:
        self.interfaces = tuple(interfaces)
        self.error: str | None = None  # why we are not (or no longer) advertising, for status
        self._adv = Advertiser(service_type=service_type)
        self._announcing: asyncio.Task[None] | None = None
        self._retry_at = 0.0

    @property
    def advertising(self) -> bool:
        return self._adv.ad is not None

    async def start(self, ad: NodeAd) -> None:
        """Register `ad` (takes ~2.5 s: a duplicate check, probing, announcements; bounded by
        discovery's deadlines). Raises only DuplicateNodeId: two live nodes must never share an
        id. Any other failure is logged with its reason and leaves the node unadvertised."""
        try:
            await self._adv.start(ad, self.interfaces or None)
        except DuplicateNodeId:
            raise
        except DiscoveryError as e:
            self.error = str(e)
            log.warning("not advertising over mdns; the node still works through its static "
                        "address (nodes.toml `address` or --gateway)", node=ad.node_id, reason=str(e))

    async def update(self, ad: NodeAd) -> None:
        """Called every heartbeat: cheap, never waits on the network. A re-announcement that is
        worth it runs as this object's one background task; a newer ad waits for the next beat."""
        if self._announcing is not None:
            if not self._announcing.done():
                return
            self._announcing = None
        current = self._adv.ad
        if current is None or time.monotonic() < self._retry_at or not worth_reannouncing(current, ad):
            return
        self._announcing = asyncio.get_running_loop().create_task(
            self._announce(ad), name=f"reannounce {ad.node_id}")
        self._announcing.add_done_callback(_log_crash)

    async def _announce(self, ad: NodeAd) -> None:
        try:
            async with asyncio.timeout(REANNOUNCE_TIMEOUT_S):
                await self._adv.update(ad)
            self.error = None
        except (DiscoveryError, TimeoutError) as e:
            self.error = f"re-announcement failed: {e!r}"
            self._retry_at = time.monotonic() + REANNOUNCE_RETRY_S
            log.warning("mdns re-announcement failed; browsers keep the previous ad",
                        node=ad.node_id, reason=repr(e), retry_in_s=REANNOUNCE_RETRY_S)

    async def close(self) -> None:
        """Stop any re-announcement and say goodbye (bounded by discovery.CLOSE_TIMEOUT_S)."""
        if self._announcing is not None:
            self._announcing.cancel()
            await asyncio.wait([self._announcing])
            self._announcing = None
        await self._adv.close()


class GatewayDirectory:
    """The gateway's mDNS side: discovered nodes, resolved nodes.toml hosts, its own ad."""

    def __init__(self, hosts: Sequence[str], interfaces: Sequence[str] = (),
                 gateway_ad: NodeAd | None = None, *, service_type: str = SERVICE_TYPE) -> None:
        self.hosts = tuple(dict.fromkeys(hosts))
        self.interfaces = tuple(interfaces)
        self.gateway_ad = gateway_ad
        self.service_type = service_type
        self.error: str | None = None  # why the gateway is not advertised (nodes need --gateway)
        self.changed = asyncio.Event()  # set when `discovered` or `resolved_hosts` changes
        self._resolved: dict[str, str] = {}
        self._aiozc: AsyncZeroconf | None = None
        self._browser: Browser | None = None
        self._adv: Advertiser | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def discovered(self) -> Mapping[NodeId, Discovered]:
        """Advertising nodes by id (gateways' ads left out), as browsed right now."""
        table = self._browser.table if self._browser is not None else {}
        return MappingProxyType({n: d for n, d in table.items() if d.ad.role == "node"})

    @property
    def resolved_hosts(self) -> Mapping[str, str]:
        """nodes.toml `.local` host -> its IPv4 literal, for ring.merge_members."""
        return MappingProxyType(self._resolved)

    @property
    def ignored(self) -> Mapping[str, str]:
        """mDNS services skipped (malformed, unreachable) -> why."""
        return MappingProxyType(self._browser.ignored if self._browser is not None else {})

    async def start(self) -> None:
        """Open zeroconf and browse now; advertise the gateway and resolve hosts in the
        background (registration takes seconds). Raises DiscoveryError when no mDNS socket can
        be opened at all (e.g. an --interface IP this host does not have)."""
        self._aiozc = open_zeroconf(self.interfaces or None)
        self._browser = Browser(self._aiozc, self.service_type, on_change=self.changed.set)
        await self._browser.start(self.interfaces or None)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway directory")
        self._task.add_done_callback(_log_crash)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        if self._adv is not None:
            await self._adv.close()
        if self._browser is not None:
            await self._browser.close()
        if self._aiozc is not None:
            aiozc, self._aiozc = self._aiozc, None
            await close_zeroconf(aiozc)

    async def _run(self) -> None:
        if self.gateway_ad is not None:
            await self._advertise(self.gateway_ad)
        next_try = dict.fromkeys(self.hosts, 0.0)
        while next_try:
            due = [h for h, at in next_try.items() if at <= time.monotonic()]
            async with asyncio.TaskGroup() as tg:  # a slow host must not hold up the others
                for host in due:
                    tg.create_task(self._resolve(host, next_try))
            await asyncio.sleep(max(0.1, min(next_try.values()) - time.monotonic()))

    async def _advertise(self, ad: NodeAd) -> None:
        self._adv = Advertiser(self._aiozc, self.service_type)
        try:
            await self._adv.start(ad, self.interfaces or None)
        except DiscoveryError as e:  # DuplicateNodeId included: browsing still works
            self.error = str(e)
            log.warning("gateway not advertised over mdns; start nodes with --gateway IP",
                        reason=str(e))

    async def _resolve(self, host: str, next_try: dict[str, float]) -> None:
        assert self._aiozc is not None
        ip = await resolve_local_name(self._aiozc, host, HOST_RESOLVE_TIMEOUT_S)
        old = self._resolved.get(host)
        if ip is None:
            # Keep a previous answer: one missed refresh is more likely a lost packet than a move,
            # and a node that really left is noticed by its missing heartbeats.
            next_try[host] = time.monotonic() + (HOST_REFRESH_S if old else HOST_RETRY_S)
            if old is None:
                log.debug("host not resolved via mdns yet", host=host, retry_in_s=HOST_RETRY_S)
            return
        next_try[host] = time.monotonic() + HOST_REFRESH_S
        if ip != old:
            self._resolved[host] = ip
            log.info("resolved host via mdns", host=host, ip=ip, previous=old)
            self.changed.set()


async def find_gateway(timeout: float, interfaces: Sequence[str] = (), *,
                       service_type: str = SERVICE_TYPE) -> tuple[str, int]:
    """(IPv4, control port) of the one gateway advertising over mDNS. Raises DiscoveryError
    when none answers within `timeout` s or when several different gateways advertise."""
    async with Browser(service_type=service_type) as browser:
        await browser.start(interfaces or None)
        if await browser.wait_until(lambda t: bool(_gateways(t)), timeout):
            await asyncio.sleep(GATEWAY_SETTLE_S)  # a second gateway answers the same query
        found = _gateways(browser.table)
        refused = {d.ad.node_id: why for d in browser.table.values()
                   if d.ad.role == "gateway" and (why := _unusable(d)) is not None}
    if len(found) == 1:
        d = found[0]
        assert d.ad.control_port is not None
        return d.addresses[0], d.ad.control_port
    if found:
        named = ", ".join(f"{d.ad.node_id} at {d.addresses[0]}:{d.ad.control_port}" for d in found)
        raise DiscoveryError(f"several gateways advertise over mDNS ({named}); "
                             "pass --gateway IP[:PORT] to choose one")
    why = "".join(f"; gateway {g} is unusable: {r}" for g, r in sorted(refused.items()))
    raise DiscoveryError(
        f"no zmqinfer gateway answered over mDNS within {timeout:g}s{why}. Pass --gateway "
        "IP[:PORT] (or set [gateway] address in nodes.toml); mDNS needs multicast UDP 5353 to "
        "reach the gateway (check --interface, firewalls, VLANs)")


def _log_crash(task: asyncio.Task[None]) -> None:
    # Every expected failure is handled inside; anything else is a bug worth a traceback, now
    # rather than at close().
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background mdns task crashed", task=task.get_name(), exc_info=exc)


def _unusable(d: Discovered) -> str | None:
    if d.ad.control_port is None:
        return "its ad has no control port"
    return refusal(d.ad)  # a gateway speaking another protocol cannot drive this node


def _gateways(table: Mapping[NodeId, Discovered]) -> list[Discovered]:
    return sorted((d for d in table.values() if d.ad.role == "gateway" and _unusable(d) is None),
                  key=lambda d: d.ad.node_id)
