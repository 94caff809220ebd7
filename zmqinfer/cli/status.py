"""`zmqinfer status` and `zmqinfer ping`: ask the gateway over HTTP, print a table, never hang.
`zmqinfer discover`: what advertises over mDNS right now.

Status and ping answer within a deadline whether or not the gateway (or a node) is there, and name what is
missing; the exit status is 0 only when the ring is ready (status) or every hop answered (ping).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from rich.console import RenderableType

    from zmqinfer.mdns.discovery import Discovered

from zmqinfer.clusterstatus import ClusterPing, ClusterStatus, ModelInfo, NodeStatus
from zmqinfer.config import DEFAULT_API_PORT, ConfigError

PIPE_WIDTH = 200  # status table width when stdout is not a terminal (a row is ~130 characters)
CLIENT_TIMEOUT_S = 5.0  # status: the gateway answers from memory, so 5 s means it is not there
PING_CLIENT_TIMEOUT_S = 15.0  # ping waits on every node (1 s each, in parallel) and one probe


GATEWAY_LOOKUP_S = 10.0  # a gateway answers in milliseconds; 10 s covers one still starting


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, fn, text in (("status", _cmd_status, "show the ring: nodes, addresses, layers, health"),
                           ("ping", _cmd_ping, "round trip to each node and through the whole ring")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_API_PORT}", help="the gateway")
        c.add_argument("--json", action="store_true", help="print the raw JSON")
        # $ZMQINFER_API_KEY may list several keys (the gateway's format): a client sends the first.
        env_key = (os.environ.get("ZMQINFER_API_KEY") or "").split(",")[0].strip() or None
        c.add_argument("--api-key", default=env_key,
                       help="when the gateway requires one (default: the first key in $ZMQINFER_API_KEY)")
        c.set_defaults(func=fn)
    d = sub.add_parser("discover", help="list what advertises _zmqinfer._tcp over mDNS right now")
    d.add_argument("--seconds", type=float, default=3.0, help="how long to listen (default 3)")
    d.add_argument("--interface", action="append", default=[], metavar="IP",
                   help="browse on this interface IP only; repeatable (default: every interface)")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=_cmd_discover)


def _cmd_status(args: argparse.Namespace) -> int:
    return status(args.url, args.api_key, args.json)


def _cmd_ping(args: argparse.Namespace) -> int:
    return ping(args.url, args.api_key, args.json)


def _cmd_discover(args: argparse.Namespace) -> int:
    if args.seconds <= 0:
        raise ConfigError(f"--seconds {args.seconds}: must be positive")
    return discover(args.seconds, tuple(args.interface), args.json)


def locate_gateway(interfaces: tuple[str, ...]) -> tuple[str, int] | None:
    """A node given no gateway address asks mDNS; None after printing why it could not."""
    import asyncio

    from zmqinfer.mdns.discovery import DiscoveryError
    from zmqinfer.mdns.presence import find_gateway

    print(f"zmqinfer: no --gateway given; looking for the gateway over mDNS (up to "
          f"{GATEWAY_LOOKUP_S:.0f}s)", file=sys.stderr, flush=True)
    try:
        host, port = asyncio.run(find_gateway(GATEWAY_LOOKUP_S, interfaces))
    except DiscoveryError as e:
        print(f"zmqinfer: {e}", file=sys.stderr)
        return None
    print(f"zmqinfer: found the gateway at {host}:{port} via mDNS", file=sys.stderr, flush=True)
    return host, port


def _fetch(url: str, method: str, timeout: float, api_key: str | None) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
        if e.code in (401, 403):
            raise SystemExit(f"zmqinfer: {url}: {body.get('error', {}).get('message', e.reason)} "
                             "(pass --api-key or set ZMQINFER_API_KEY)") from None
        return body
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise SystemExit(f"zmqinfer: no gateway at {url} within {timeout:.0f}s ({reason})") from None


def status(url: str, api_key: str | None, as_json: bool) -> int:
    st = cast(ClusterStatus, _fetch(url.rstrip("/") + "/cluster/status", "GET", CLIENT_TIMEOUT_S, api_key))
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        from rich.console import Console

        # Piped (no terminal to measure), rich would assume 80 columns and wrap every row: a
        # file or `grep` is better served by one line per node.
        piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        Console(width=PIPE_WIDTH if piped else None).print(status_view(st))
    return 0 if st.get("ready") else 1


def status_view(st: ClusterStatus) -> RenderableType:
    """The status table of a /cluster/status answer. Keys an older gateway does not send
    (found_by, detail, refused) render as "-" or are left out."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    state = "[green]ready[/]" if st.get("ready") else f"[red]not ready[/]: {st.get('reason', '?')}"
    head = f"model {st.get('model')}  ({st.get('n_layers')} layers)  epoch {st.get('epoch')}  {state}"
    t = Table("node", "address", "found", "layers", "health", "beat", "device", "rss", "shard", "busy")
    # Names, addresses and layer ranges stay whole; the rest wrap. Health keeps room to be read
    # in a narrow terminal (it was squeezed to nothing at 80 columns).
    for i, col in enumerate(t.columns):
        col.no_wrap = i in (0, 1, 3)
    t.columns[4].min_width = 12
    for n in st.get("nodes", []):
        held = n.get("layers")
        layers = f"[{held[0]},{held[1]})" if held else "-"
        beat = f"{n['last_heartbeat_s']:.1f}s" if n.get("last_heartbeat_s") is not None else "-"
        health = escape(n.get("health") or "-")
        health = health if health == "ok" else f"[red]{health}[/]"
        if n.get("refused"):
            health = f"[red]refused: {escape(str(n['refused']))}[/]"
        t.add_row(escape(n.get("name", "?")), f"{n.get('address') or '?'}:{n.get('data_port')}",
                  escape(_found(n)),
                  layers, health, beat, (n.get("device") or "-").split(" (")[0],
                  _mib(n.get("rss_bytes")), _mib(n.get("shard_bytes")),
                  f"{100 * (n.get('busy_fraction') or 0):.0f}%")
    return Group(head, *_model_line(st), t, *_security_lines(st), *prefix_summary(st))


def model_summary(info: ModelInfo) -> str:
    """"qwen3_moe, 4-bit, group 64, context 40960, 30.5B parameters (3.3B active)"."""
    def count(n: int) -> str:
        return next(f"{n / 10 ** e:.1f}{u}" for e, u in ((12, "T"), (9, "B"), (6, "M"), (3, "K"), (0, ""))
                    if n >= 10 ** e or e == 0)
    act = info.get("params_active")
    active = f" ({count(act)} active)" if act else ""
    ctx = f"context {info['context_length']}" if info.get("context_length") else "context unknown"
    alone = ", one sequence at a time" if info.get("batching") == "one sequence at a time" else ""
    return (f"{info['family']}, {info['quantization']}, {ctx}, "
            f"{count(info['params_total'])} parameters{active}{alone}")


def _model_line(st: ClusterStatus) -> list[str]:
    from rich.markup import escape

    info = st.get("model_info")
    return [] if info is None else [escape(model_summary(info))]  # absent from an older gateway


def prefix_summary(st: ClusterStatus) -> list[str]:
    """"prefix cache: 3 entries, 2,410 tokens, 12.3 MiB; hit rate 67% (4 of 6), 1,980 tokens saved"."""
    pc = st.get("prefix_cache")  # absent from an older gateway
    if pc is None:
        return []
    if not pc["enabled"]:
        return ["prefix cache: off"]
    return [f"prefix cache: {pc['entries']} entries, {pc['tokens']:,} tokens, {_mib(pc['bytes'])}; "
            f"hit rate {100 * pc['hit_rate']:.0f}% ({pc['hits']} of {pc['lookups']}), "
            f"{pc['tokens_saved']:,} tokens saved, {pc['evictions']} evicted"]


def _security_lines(st: ClusterStatus) -> list[str]:
    """One line on how the ring and the API are guarded, and what was refused (if anything)."""
    from rich.markup import escape

    sec = st.get("security")
    if sec is None:
        return []  # an older gateway
    api = sec.get("api")
    curve = ("[green]curve[/] (" + ", ".join(sec["trusted"]) + " trusted)" if sec["curve"]
             else "[red]zeromq unencrypted[/] (no cluster directory: zmqinfer keys init)")
    line = f"security: {curve}; api: {api['mode'] if api else '?'}"
    by_nodes = sum(n.get("refused_by_node", 0) for n in st.get("nodes", []))
    refused = [f"{sec['refused_handshakes']} handshakes and {sec['refused_messages']} messages refused by "
               f"the gateway, {by_nodes} by nodes" + (f", {api['refused']} api requests" if api else "")]
    for who, why in list(sec.get("refused_peers", {}).items())[:5]:
        refused.append(f"  refused {escape(who)}: {escape(why)}")
    return [line, *refused]


def _found(n: NodeStatus) -> str:
    """"mdns" / "static", with the gateway's detail ("nodes.toml address", "mini2.local via mdns")
    where it says more than the kind."""
    by, detail = n.get("found_by"), n.get("detail")
    if not by:
        return "-"
    return f"{by} ({detail})" if detail and detail != f"{by} ad" else by


# ---- zmqinfer discover ----------------------------------------------------------------------

NO_ADS_HINT = ("If nodes are running, multicast (UDP 5353 to 224.0.0.251) is not getting through: "
               "a firewall, a VLAN or guest network, a VPN, or the wrong --interface. The gateway "
               'still reaches a node listed in nodes.toml with `address = "IP"`, and a node '
               "reaches the gateway with --gateway IP.")


def discover(seconds: float, interfaces: tuple[str, ...], as_json: bool) -> int:
    """Browse `_zmqinfer._tcp` for `seconds` and print what advertises; 0 whatever is found."""
    import asyncio

    from zmqinfer import log
    from zmqinfer.mdns.discovery import DiscoveryError
    from zmqinfer.mdns.discovery import discover as browse

    # The browser logs each find at info: on stdout they would corrupt --json, and the table
    # says it all; warnings (malformed ads) still go to stderr.
    os.environ.setdefault("ZMQINFER_LOG", "warning")
    log.setup("discover")
    ignored: dict[str, str] = {}
    try:
        rows = discover_rows(asyncio.run(browse(seconds, interfaces or None, ignored=ignored)))
    except DiscoveryError as e:  # e.g. --interface is not an IPv4 address of this host
        print(f"zmqinfer: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({"services": rows, "ignored": ignored}, indent=2))
    else:
        from rich.console import Console

        Console().print(discover_view(rows, ignored, seconds))
    return 0


def discover_rows(found: Sequence[Discovered]) -> list[dict[str, Any]]:
    """One JSON-able row per advertised service, with `refused` set when we could not use it."""
    from zmqinfer.mdns.adverts import refusal

    return [{"id": d.ad.node_id, "role": d.ad.role, "addresses": list(d.addresses),
             "data_port": d.ad.data_port, "control_port": d.ad.control_port,
             "mem_total": d.ad.mem_total, "mem_free": d.ad.mem_free, "device": d.ad.device,
             "fingerprint": d.ad.fingerprint, "protocol": d.ad.protocol, "host": d.host,
             "refused": refusal(d.ad)} for d in found]


def discover_view(rows: Sequence[dict[str, Any]], ignored: Mapping[str, str],
                  seconds: float) -> RenderableType:
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    parts: list[RenderableType] = []
    if not rows:
        parts.append(f"Nothing advertises _zmqinfer._tcp here (browsed {seconds:g}s). {NO_ADS_HINT}")
    else:
        t = Table("id", "role", "addresses", "ports", "memory (free/total)", "device", "model",
                  "protocol")
        for r in rows:
            ports = f"data {r['data_port']}" + (f", control {r['control_port']}" if r.get("control_port") else "")
            # Everything but the numbers comes from strangers on the LAN: no markup from them.
            proto = escape(r["protocol"])
            if r.get("refused"):
                proto = f"[red]{proto}: refused, {escape(r['refused'])}[/]"
            t.add_row(escape(r["id"]), r["role"], ", ".join(r["addresses"]), ports,
                      f"{_gib(r['mem_free'])} / {_gib(r['mem_total'])}", escape(r["device"] or "-"),
                      r["fingerprint"][:12] or "-", proto)
        parts.append(t)
    parts += [f"[yellow]ignored[/] {escape(name)}: {escape(why)}" for name, why in sorted(ignored.items())]
    return Group(*parts)


def ping(url: str, api_key: str | None, as_json: bool) -> int:
    res = cast(ClusterPing, _fetch(url.rstrip("/") + "/cluster/ping", "POST", PING_CLIENT_TIMEOUT_S, api_key))
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        for n in res.get("nodes", []):
            what = f"{n['control_ms']:.2f} ms" if "control_ms" in n else n.get("error", "?")
            print(f"{n['name']:<12} {n.get('address') or '?':<16} control {what}")
        ring = f"{res['ring_ms']:.2f} ms" if res.get("ring_ms") is not None else res.get("ring_error", "?")
        print(f"{'ring':<12} {'':<16} probe   {ring}")
    ok = res.get("ring_ms") is not None and all("control_ms" in n for n in res.get("nodes", []))
    return 0 if ok else 1


def _mib(n: int | None) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "-"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
