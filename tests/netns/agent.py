"""What runs inside a test namespace: `python -m tests.netns.agent <role> ...`.

Each role prints JSON lines on stdout ({"event": ...}) so the test can follow it, and stops by
itself after --seconds (every loop bounded), or earlier when its stdin closes.

    advertise  register a NodeAd bound to --ip; re-announce once (--update-after) to prove it;
               with --find-gateway, then look for the gateway's ad as a node without --gateway
    junk       register a malformed ad under our service type (the browser must shrug it off)
    browse     what a gateway does: advertise a role="gateway" ad and browse on one zeroconf
               bound to --ip; wait for --expect (up to --timeout), report latencies, whether
               --absent stayed absent, a re-announcement, .local resolves, a goodbye and a
               return; stay up until stdin closes; then a TCP connect to --connect
    listen     accept TCP connections on --ip:--port (the static-address proof)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from zmqinfer import log
from zmqinfer.mdns.discovery import (
    SERVICE_TYPE,
    Advertiser,
    Browser,
    DiscoveryError,
    NodeAd,
    close_zeroconf,
    open_zeroconf,
    resolve_local_name,
)
from zmqinfer.protocol.wire import NodeId

GIB = 1 << 30


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


async def _stdin_closed() -> None:
    """Returns when the test closes our stdin. A daemon thread, not the default executor, so
    that a timeout around this never leaves asyncio.run waiting for a blocked read at exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def read() -> None:
        sys.stdin.read()
        if not loop.is_closed():
            loop.call_soon_threadsafe(lambda: None if done.done() else done.set_result(None))

    threading.Thread(target=read, daemon=True).start()
    await done


async def advertise(a: argparse.Namespace) -> None:
    ad = NodeAd(NodeId(a.id), a.port, 16 * GIB, 12 * GIB, "cpu (netns test)", fingerprint="ab12")
    adv = Advertiser()
    try:
        t0 = time.monotonic()
        await adv.start(ad, [a.ip])
        emit(event="ready", register_s=round(time.monotonic() - t0, 3), started_at=t0)
        if a.find_gateway:
            # A node without --gateway: find the gateway's ad on the zeroconf we already have.
            async with Browser(adv.aiozc) as b:
                await b.start([a.ip])
                t1 = time.monotonic()
                ok = await b.wait_until(lambda t: any(d.ad.role == "gateway" for d in t.values()), 5.0)
                gw = [d for d in b.table.values() if d.ad.role == "gateway"]
                emit(event="gateway", ok=ok, after_s=round(time.monotonic() - t1, 3),
                     addresses=list(gw[0].addresses) if gw else [],
                     control_port=gw[0].ad.control_port if gw else None,
                     table=sorted(b.table), ignored=b.ignored)
        if a.update_after > 0:
            await asyncio.sleep(a.update_after)
            at = time.monotonic()
            sent = await adv.update(NodeAd(ad.node_id, ad.data_port, ad.mem_total, 4 * GIB, ad.device,
                                           fingerprint="ab12"))
            emit(event="updated", sent=sent, at=at)
        try:
            await asyncio.wait_for(_stdin_closed(), a.seconds)
        except TimeoutError:
            pass
    except DiscoveryError as e:
        emit(event="error", error=str(e), kind=type(e).__name__)
    finally:
        await adv.close()
        emit(event="closed")


async def junk(a: argparse.Namespace) -> None:
    """A foreign service under our type with a TXT record no zmqinfer would send."""
    aiozc = AsyncZeroconf(interfaces=[a.ip])
    info = AsyncServiceInfo(SERVICE_TYPE, f"{a.id}.{SERVICE_TYPE}", port=a.port,
                            properties={"id": "not a valid id!", "proto": "zmqinfer/5"},
                            server="stranger.local.", parsed_addresses=[a.ip])
    try:
        await asyncio.wait_for(await aiozc.async_register_service(info), 10)
        emit(event="ready")
        try:
            await asyncio.wait_for(_stdin_closed(), a.seconds)
        except TimeoutError:
            pass
    finally:
        await asyncio.wait_for(aiozc.async_close(), 5)


async def browse(a: argparse.Namespace) -> None:
    expect = set(filter(None, a.expect.split(",")))
    absent = set(filter(None, a.absent.split(",")))
    upd_node, _, upd_free = a.wait_update.partition("=")
    first_seen: dict[str, float] = {}
    gone: dict[str, float] = {}
    back: dict[str, float] = {}
    update_at: list[float] = []

    def on_change() -> None:  # time.monotonic() is one clock for every namespace of this host
        now = time.monotonic()
        for n, d in b.table.items():
            first_seen.setdefault(n, now)
            if n in gone:
                back.setdefault(n, now)
            if n == upd_node and d.ad.mem_free == int(upd_free or -1) and not update_at:
                update_at.append(now)
        for left in set(first_seen) - set(b.table):
            gone.setdefault(left, now)

    # Like a gateway: one zeroconf for its own ad (so nodes can find it) and for browsing.
    aiozc = open_zeroconf([a.ip])
    gateway_ad = NodeAd(NodeId("gateway"), 8102, 16 * GIB, 8 * GIB, "cpu (netns test)",
                        control_port=8101, role="gateway")
    async with Advertiser(aiozc) as adv, Browser(aiozc, on_change=on_change) as b:
        t0 = time.monotonic()
        await b.start([a.ip])
        await adv.start(gateway_ad, [a.ip])
        seen_all = await b.wait_until(lambda t: expect <= set(t), a.timeout)
        elapsed = time.monotonic() - t0
        # Give a blocked host the same chance the others had (and then some) to show up.
        await asyncio.sleep(max(0.0, a.absent_grace - elapsed))
        found = {n: {"addresses": list(d.addresses), "port": d.ad.data_port, "host": d.host,
                     "after_s": round(first_seen[n] - t0, 3)}
                 for n, d in b.table.items() if d.ad.role == "node"}
        emit(event="browsed", seen_all=seen_all, found=found, ignored=b.ignored,
             absent_ok=not (absent & set(b.table)), all_after_s=round(elapsed, 3))
        if upd_node:
            ok = await b.wait_until(lambda t: bool(update_at), a.timeout)
            emit(event="update_seen", ok=ok, at=update_at[0] if ok else None)
        if a.resolve:
            # A fresh instance: the browser's cache already holds the A records that came with
            # the ads, and the point is to prove an actual mDNS query for a host name.
            fresh = AsyncZeroconf(interfaces=[a.ip])
            try:
                t1 = time.monotonic()
                ip = await resolve_local_name(fresh, a.resolve, timeout=3.0)
                emit(event="resolved", name=a.resolve, ip=ip, after_s=round(time.monotonic() - t1, 3))
            finally:
                await asyncio.wait_for(fresh.async_close(), 5)
        if a.resolve_missing:
            assert b.aiozc is not None
            t1 = time.monotonic()
            ip = await resolve_local_name(b.aiozc, a.resolve_missing, timeout=1.0)
            emit(event="resolved_missing", ip=ip, after_s=round(time.monotonic() - t1, 3))
        if a.wait_gone:
            ok = await b.wait_until(lambda t: a.wait_gone not in t, a.timeout)
            emit(event="gone", ok=ok, at=gone.get(a.wait_gone))
            # ... and comes back (same id, new process) through its announcements alone.
            ok = await b.wait_until(lambda t: a.wait_gone in t, a.timeout)
            emit(event="back", ok=ok, at=back.get(a.wait_gone),
                 addresses=list(b.table[a.wait_gone].addresses) if ok else [])
        # Stay up (and advertised) until told to stop: nodes may still be looking for us.
        try:
            await asyncio.wait_for(_stdin_closed(), a.timeout)
        except TimeoutError:
            pass
    await close_zeroconf(aiozc)
    if a.connect:
        host, _, port = a.connect.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=3.0) as s:
                emit(event="connected", peer=s.getpeername()[0])
        except OSError as e:
            emit(event="connect_failed", error=str(e))


async def listen(a: argparse.Namespace) -> None:
    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(on_conn, a.ip, a.port)
    async with server:
        emit(event="listening")
        try:
            await asyncio.wait_for(_stdin_closed(), a.seconds)
        except TimeoutError:
            pass


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    ad = sub.add_parser("advertise")
    ad.add_argument("--id", required=True)
    ad.add_argument("--ip", required=True)
    ad.add_argument("--port", type=int, default=8110)
    ad.add_argument("--seconds", type=float, default=30)
    ad.add_argument("--update-after", type=float, default=0)
    ad.add_argument("--find-gateway", action="store_true")
    br = sub.add_parser("browse")
    br.add_argument("--ip", required=True)
    br.add_argument("--expect", default="")
    br.add_argument("--absent", default="")
    br.add_argument("--absent-grace", type=float, default=0)
    br.add_argument("--timeout", type=float, default=10)
    br.add_argument("--wait-update", default="")
    br.add_argument("--resolve", default="")
    br.add_argument("--resolve-missing", default="")
    br.add_argument("--wait-gone", default="")
    br.add_argument("--connect", default="")
    ls = sub.add_parser("listen")
    ls.add_argument("--ip", required=True)
    ls.add_argument("--port", type=int, required=True)
    ls.add_argument("--seconds", type=float, default=30)
    jk = sub.add_parser("junk")
    for name in ("--id", "--ip"):
        jk.add_argument(name, required=True)
    jk.add_argument("--port", type=int, default=8110)
    jk.add_argument("--seconds", type=float, default=30)
    a = p.parse_args()
    log.setup(f"agent:{a.role}")  # logs to stderr: stdout carries only the JSON events
    if os.environ.get("ZQ_DEBUG"):  # zeroconf's packet log, for debugging a failing run
        logging.getLogger("zeroconf").setLevel(logging.DEBUG)
    roles = {"advertise": advertise, "browse": browse, "listen": listen, "junk": junk}
    asyncio.run(roles[a.role](a))


if __name__ == "__main__":
    main()
