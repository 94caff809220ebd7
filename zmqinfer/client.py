"""`zmqinfer status` and `zmqinfer ping`: ask the gateway over HTTP, print a table, never hang.

Both answer within a deadline whether or not the gateway (or a node) is there, and name what is
missing; the exit status is 0 only when the ring is ready (status) or every hop answered (ping).
"""

from __future__ import annotations

import json
from typing import Any

CLIENT_TIMEOUT_S = 5.0  # status: the gateway answers from memory, so 5 s means it is not there
PING_CLIENT_TIMEOUT_S = 15.0  # ping waits on every node (1 s each, in parallel) and one probe


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
    st = _fetch(url.rstrip("/") + "/cluster/status", "GET", CLIENT_TIMEOUT_S, api_key)
    if as_json:
        print(json.dumps(st, indent=2))
        return 0 if st.get("ready") else 1
    from rich.console import Console
    from rich.table import Table

    c = Console()
    state = "[green]ready[/]" if st.get("ready") else f"[red]not ready[/]: {st.get('reason', '?')}"
    c.print(f"model {st.get('model')}  ({st.get('n_layers')} layers)  epoch {st.get('epoch')}  {state}")
    t = Table("node", "address", "layers", "health", "beat", "device", "rss", "shard", "busy")
    for col in t.columns[:3]:
        col.no_wrap = True
    for n in st.get("nodes", []):
        layers = f"[{n['layers'][0]},{n['layers'][1]})" if n.get("layers") else "-"
        beat = f"{n['last_heartbeat_s']:.1f}s" if n.get("last_heartbeat_s") is not None else "-"
        t.add_row(n["name"], f"{n.get('address') or '?'}:{n.get('data_port')}", layers,
                  n["health"] if n["health"] == "ok" else f"[red]{n['health']}[/]", beat,
                  (n.get("device") or "-").split(" (")[0], _mib(n.get("rss_bytes")), _mib(n.get("shard_bytes")),
                  f"{100 * n.get('busy_fraction', 0):.0f}%")
    c.print(t)
    return 0 if st.get("ready") else 1


def ping(url: str, api_key: str | None, as_json: bool) -> int:
    res = _fetch(url.rstrip("/") + "/cluster/ping", "POST", PING_CLIENT_TIMEOUT_S, api_key)
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
