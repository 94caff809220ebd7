"""`zmqinfer top`: a live terminal dashboard of a running ring.

    header   the ring: ready or why not, tok/s, TTFT, running / waiting requests, re-plans
    table    one row per node, in ring order: layers, health, busy bar, GPU %, memory, tok/s,
             step time, hop latency

It polls `/cluster/status` (the same document `status --json` prints) every `--interval`
seconds, each poll under a deadline on its own thread, so keys are read while a poll waits.
A gateway that is gone is shown as gone (with the last state it reported), never a traceback.
`q` or Ctrl-C leaves: the terminal's mode is restored in a `finally` and rich's alternate screen
is left, so the shell gets back the screen it had.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import sys
import termios
import threading
import time
import tty
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from zmqinfer.clusterstatus import ClusterStatus, NodeStatus
from zmqinfer.config import DEFAULT_API_PORT, ConfigError

if TYPE_CHECKING:
    from rich.console import RenderableType

# A status answer comes from the gateway's memory in milliseconds; 2 s without one means it is
# not there (or wedged), and the screen says so rather than freezing.
POLL_TIMEOUT_S = 2.0
DEFAULT_INTERVAL_S = 1.0  # as often as the nodes beat: a faster refresh shows nothing new
MIN_INTERVAL_S = 0.1  # below this the polls themselves become the load
BAR_WIDTH = 10  # characters of the busy bar: 10% steps are as fine as a beat's busy ratio is


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("top", help="live dashboard of the ring: per node busy, GPU, memory, tok/s")
    c.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_API_PORT}", help="the gateway")
    c.add_argument("--api-key", default=os.environ.get("ZMQINFER_API_KEY"),
                   help="when the gateway requires one (default: $ZMQINFER_API_KEY)")
    c.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S,
                   help=f"seconds between refreshes (default {DEFAULT_INTERVAL_S:g})")
    c.set_defaults(func=_cmd_top)


def _cmd_top(args: argparse.Namespace) -> int:
    if args.interval < MIN_INTERVAL_S:
        raise ConfigError(f"--interval {args.interval}: at least {MIN_INTERVAL_S} seconds")
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        print("zmqinfer: top needs a terminal; use `zmqinfer status` (or --json) in scripts",
              file=sys.stderr)
        return 2
    return top(args.url, args.api_key, args.interval)


@dataclass
class Poll:
    """The latest answer and, if the latest poll failed, why."""

    status: ClusterStatus | None = None
    error: str | None = None
    at: float = 0.0  # monotonic time of the last good answer


def fetch_status(url: str, api_key: str | None, timeout: float = POLL_TIMEOUT_S) -> ClusterStatus:
    """GET /cluster/status; raises OSError (with a readable reason) when there is no answer."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(url.rstrip("/") + "/cluster/status", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return cast(ClusterStatus, json.loads(r.read()))
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read() or b"{}").get("error", {}).get("message", e.reason)
        except ValueError:
            message = e.reason
        hint = " (pass --api-key or set ZMQINFER_API_KEY)" if e.code in (401, 403) else ""
        raise OSError(f"HTTP {e.code}: {message}{hint}") from None
    except urllib.error.URLError as e:
        raise OSError(f"no gateway at {url} ({e.reason})") from None
    except (TimeoutError, ConnectionError, ValueError) as e:
        raise OSError(f"no answer from {url} within {timeout:.0f}s ({e or type(e).__name__})") from None


def top(url: str, api_key: str | None, interval: float) -> int:
    from rich.console import Console
    from rich.live import Live

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    poll = Poll()
    answers: queue.Queue[ClusterStatus | OSError] = queue.Queue()
    console = Console()
    try:
        tty.setcbreak(fd)  # one key at a time, no echo; Ctrl-C still raises KeyboardInterrupt
        with Live(view(url, poll, interval), console=console, screen=True, auto_refresh=False) as live:
            while True:
                _start_poll(url, api_key, answers)
                if _wait_for_keys(fd, answers, interval, live, url, poll):
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _start_poll(url: str, api_key: str | None, answers: queue.Queue[ClusterStatus | OSError]) -> None:
    def run() -> None:
        try:
            answers.put(fetch_status(url, api_key))
        except OSError as e:
            answers.put(e)

    # A daemon thread: a poll still waiting on a dead gateway must not hold up `q`.
    threading.Thread(target=run, name="top-poll", daemon=True).start()


def _wait_for_keys(fd: int, answers: queue.Queue[ClusterStatus | OSError], interval: float,
                   live: Any, url: str, poll: Poll) -> bool:
    """Until the next poll is due: draw answers as they come, read keys. True on `q`."""
    due = time.monotonic() + interval
    while (left := due - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.05))
        if ready and any(ch in b"qQ" for ch in os.read(fd, 64)):
            return True
        try:
            got = answers.get_nowait()
        except queue.Empty:
            continue
        if isinstance(got, OSError):
            poll.error = str(got)
        else:
            poll.status, poll.error, poll.at = got, None, time.monotonic()
        live.update(view(url, poll, interval), refresh=True)
    return False


# ---- the picture ------------------------------------------------------------------------------


def view(url: str, poll: Poll, interval: float) -> RenderableType:
    """The whole screen for the latest poll (pure: tests render it without a terminal)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.text import Text

    st = poll.status
    lines: list[RenderableType] = []
    title = f"[bold]zmqinfer top[/]  {escape(url)}"
    if st is not None:
        state = "[green]ready[/]" if st.get("ready") else f"[red]not ready: {escape(str(st.get('reason') or '?'))}[/]"
        title += f"   model {escape(str(st.get('model')))} ({st.get('n_layers')} layers)   epoch {st.get('epoch')}   {state}"
    lines.append(Text.from_markup(title))
    if poll.error is not None:
        age = f"; showing what it said {time.monotonic() - poll.at:.0f}s ago" if st is not None else ""
        lines.append(Text.from_markup(f"[bold red]gateway unreachable[/]: {escape(poll.error)}{age}"))
    if st is None:
        if poll.error is None:
            lines.append(Text("waiting for the first answer..."))
    else:
        lines.append(Text.from_markup(_ring_line(st)))
        lines.append(node_table(st))
    lines.append(Text.from_markup(f"[dim]q quits · every {interval:g}s · "
                                  f"{time.strftime('%H:%M:%S')}[/]"))
    return Group(*lines)


def _ring_line(st: ClusterStatus) -> str:
    tp = st.get("throughput") or {}
    ring = st.get("ring") or {}
    ttft = tp.get("ttft_s")
    return (f"ring: [bold]{tp.get('generation_tokens_per_s', 0):.1f}[/] tok/s generated · "
            f"{tp.get('prompt_tokens_per_s', 0):.1f} tok/s prompt · TTFT "
            f"{'-' if ttft is None else f'{ttft:.2f}s'} · queue {st.get('waiting_requests', 0)} waiting, "
            f"{st.get('running_requests', 0)} running · {ring.get('micro_batches_in_flight', 0)} in flight · "
            f"{ring.get('replans', 0)} re-plans")


def node_table(st: ClusterStatus) -> RenderableType:
    from rich.markup import escape
    from rich.table import Table

    t = Table("node", "layers", "health", "busy", "GPU", "rss", "accel", "KV", "tok/s", "step", "hop",
              expand=False)
    t.columns[0].no_wrap = t.columns[1].no_wrap = t.columns[3].no_wrap = True
    nodes = sorted(st.get("nodes", []), key=lambda n: (n.get("layers") is None, (n.get("layers") or [0])[0]))
    for n in nodes:
        health = escape(n.get("health") or "-")
        t.add_row(escape(n.get("name", "?")), _layers(n), health if health == "ok" else f"[red]{health}[/]",
                  _bar(n.get("busy_fraction") or 0.0), _pct(n.get("gpu_utilization")),
                  _mib(n.get("rss_bytes")), _mib(n.get("accel_memory_bytes")), _mib(n.get("kv_bytes")),
                  f"{n.get('tokens_per_s') or 0:.1f}", _ms(n.get("step_s")), _ms(n.get("hop_latency_s")))
    return t


def _layers(n: NodeStatus) -> str:
    held = n.get("layers")
    return f"[{held[0]},{held[1]})" if held else "-"


def _bar(ratio: float) -> str:
    ratio = min(1.0, max(0.0, ratio))
    full = round(ratio * BAR_WIDTH)
    return f"[cyan]{'█' * full}[/][dim]{'░' * (BAR_WIDTH - full)}[/] {100 * ratio:3.0f}%"


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{100 * ratio:.0f}%"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"
