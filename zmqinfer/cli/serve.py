"""The serving commands: `zmqinfer gateway` and `zmqinfer up`, both running the gateway in this
process (`up` with N local node processes as its children).

`up` is the one-command local cluster: it resolves (and on first use converts) the model with a
progress bar, starts N node processes and runs the gateway in this process, prints the endpoint
and the layer split once the ring is serving, and stops every process on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from zmqinfer.config import (
    ConfigError,
    GatewaySpec,
    NodeSpec,
    ip_literal,
    load_cluster,
    parse_layer_counts,
    parse_size,
)
from zmqinfer.local import (
    ONE_BLAS_THREAD,
    SHARED_CORES_ENV,
    local_gateway,
    local_node,
    node_command,
)

NODE_STOP_GRACE_S = 5.0
# `up` looks this often whether a node process exited by itself (and says so).
PROCESS_CHECK_EVERY_S = 1.0


def resolve_with_progress(model: str | None) -> Path:
    from rich.progress import Progress

    from zmqinfer.model.resolve import resolve_model

    with Progress(transient=True) as bar:
        task = None

        def progress(stage: str, done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task(stage, total=total)
            bar.update(task, completed=done, total=total, description=stage)

        return resolve_model(model, progress=progress)


def api_guard(config_keys: frozenset[str], key_files: list[Path], no_auth: bool,
              metrics_open: bool, cors_origins: tuple[str, ...] = ()) -> Any:
    """The API's guard from every key source (auth.gather); ConfigError names a bad source."""
    from zmqinfer.gateway.api.auth import ApiGuard, KeyFileError, gather

    try:
        named = gather(sorted(config_keys), key_files)
    except KeyFileError as e:
        raise ConfigError(str(e)) from None
    if named and no_auth:
        raise ConfigError("--no-auth with API keys configured: drop one or the other")
    return ApiGuard.from_keys(named, no_auth=no_auth, metrics_open=metrics_open,
                              cors_origins=cors_origins)


def curve_keys(directory: Path | None, name: str, insecure: bool) -> Any:
    """This process's CurveZMQ keys from the cluster directory (--keys, $ZMQINFER_KEYS or
    ~/.config/zmqinfer/cluster); None without one (plaintext, and the process says so)."""
    from zmqinfer.protocol.keys import (
        GATEWAY,
        CurveKeyError,
        default_dir,
        load_keys,
        public_key,
    )

    directory = None if insecure else (directory or default_dir())
    if directory is None:
        return None
    try:
        public_key(directory, GATEWAY)  # a node connects to it; the gateway is its own check
        return load_keys(directory, name)
    except CurveKeyError as e:
        raise ConfigError(str(e)) from None


def cmd_gateway(args: argparse.Namespace) -> int:
    cfg = load_cluster(args.config)
    gspec = cfg.gateway if args.port is None else GatewaySpec(**{**cfg.gateway.__dict__, "port": args.port})
    gspec = GatewaySpec(**{**gspec.__dict__, "prefix_cache": not args.no_prefix_cache,
                           "speculation": not args.no_speculation})
    counts = parse_layer_counts(args.layers, len(cfg.nodes)) if args.layers else None
    interfaces = tuple(ip_literal(ip, "--interface") for ip in args.interface)
    files = [f for f in (cfg.api_key_file, args.api_key_file) if f is not None]
    guard = api_guard(cfg.api_keys, files, args.no_auth, cfg.metrics_open, cfg.cors_origins)
    keys = curve_keys(args.keys, "gateway", args.no_curve)
    return serve(args.model or cfg.model, gspec, list(cfg.nodes), counts, guard, [],
                  discovery=not args.no_discovery, interfaces=interfaces, log_file=args.log_file, keys=keys)


def cmd_up(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= 32:
        raise ConfigError(f"--nodes {args.nodes}: choose 1..32")
    memory_limit = parse_size(args.memory_limit, "--memory-limit") if args.memory_limit else None
    counts = parse_layer_counts(args.layers, args.nodes) if args.layers else None
    host = ip_literal(args.host, "--host")
    gspec = GatewaySpec(**{**local_gateway(args.port, bind=host).__dict__, "prefix_cache": not args.no_prefix_cache,
                           "speculation": not args.no_speculation})
    nodes = [local_node(args.port, i) for i in range(args.nodes)]
    guard = api_guard(frozenset(), [args.api_key_file] if args.api_key_file else [], args.no_auth, False)
    model_path = resolve_or_exit(args.model)
    if model_path is None:
        return 1
    from zmqinfer.cli.keys import make_cluster
    from zmqinfer.model.resolve import DEFAULT_MODEL
    from zmqinfer.protocol.keys import load_keys

    # A throwaway cluster directory for this ring, so Curve is on by default here too; it lives
    # as long as this process. `--keys DIR` keeps it (a node restarted by hand can rejoin).
    scratch = None if args.no_curve or args.keys else tempfile.TemporaryDirectory(prefix="zmqinfer-up-keys-")
    directory = None if args.no_curve else (args.keys or Path(scratch.name if scratch else ""))
    if directory is not None:
        make_cluster(directory, [n.name for n in nodes])
    keys = load_keys(directory, "gateway") if directory is not None else None
    key_args = ["--keys", str(directory)] if directory is not None else ["--no-curve"]

    # N nodes share this machine's cores: each may use every core (one stage computes at a time
    # for a single stream), but idle ones must not spin. A lone node shares them with nobody
    # but the gateway: OpenBLAS's own spin serves it best (one stream 13.6 against 12.8 tok/s
    # with the shortest spin; 16 at once 59-61 either way).
    env = {**(SHARED_CORES_ENV if len(nodes) > 1 else {}), **os.environ}
    cores = pin_cores(args.nodes) if args.pin else None
    if cores is not None:
        env.update(ONE_BLAS_THREAD)
    procs = []
    for i, n in enumerate(nodes):
        extra = key_args + (["--memory-limit", str(memory_limit)] if memory_limit is not None else [])
        if args.simulate:
            extra += ["--simulate", args.simulate]
        cmd = node_command(n.name, f"127.0.0.1:{gspec.control_port}", n.port, extra)
        # Own process group: the terminal's Ctrl-C reaches only us, and we stop nodes in order.
        procs.append(subprocess.Popen(cmd, start_new_session=True, env=env,
                                      preexec_fn=None if cores is None else pinner(cores[i])))
    if cores is not None:
        print("zmqinfer: pinned " + ", ".join(f"{n.name} to core {c}" for n, c in zip(nodes, cores))
              + " (one BLAS thread each; the gateway is not pinned)", flush=True)
    # Local nodes load the very directory the gateway resolved: no second conversion.
    try:
        return serve(str(model_path), gspec, nodes, counts, guard, procs, model_path,
                     model_id=args.model or DEFAULT_MODEL, discovery=False, keys=keys)
    finally:
        if scratch is not None:
            scratch.cleanup()


def pin_cores(n: int) -> list[int] | None:
    """Node i's core: the i-th core this process may use, round robin; None where pinning is
    not supported (macOS has no CPU affinity API)."""
    if not hasattr(os, "sched_setaffinity"):
        print("zmqinfer: --pin is not supported on this platform; nodes run unpinned", file=sys.stderr)
        return None
    usable = sorted(os.sched_getaffinity(0))
    return [usable[i % len(usable)] for i in range(n)]


def pinner(core: int) -> Any:
    # Runs in the child between fork and exec, so the node and every thread it will start (BLAS,
    # mlx, zmq) inherits the mask. One system call and a malloc, which glibc keeps usable after fork.
    return lambda: os.sched_setaffinity(0, {core})


def resolve_or_exit(model: str | None) -> Path | None:
    from zmqinfer.model.resolve import ModelNotFound

    try:
        return resolve_with_progress(model)
    except ModelNotFound as e:
        print(f"zmqinfer: {e}", file=sys.stderr)
        return None


def serve(model: str | None, gspec: GatewaySpec, nodes: list[NodeSpec], counts: list[int] | None,
           guard: Any, procs: list[subprocess.Popen], model_path: Path | None = None,
           model_id: str | None = None, *, discovery: bool = True,
           interfaces: tuple[str, ...] = (), log_file: Path | None = None, keys: Any = None) -> int:
    """`guard`: auth.ApiGuard; `keys`: keys.CurveKeys of the gateway, None for plaintext."""
    from zmqinfer import log
    from zmqinfer.gateway.process import Gateway
    from zmqinfer.model.resolve import DEFAULT_MODEL

    if model_path is None:
        model_path = resolve_or_exit(model)
        if model_path is None:
            return 1
    log.setup("gateway", log_file)
    gw: Any = None
    base = f"http://{gspec.bind if gspec.bind != '0.0.0.0' else '127.0.0.1'}:{gspec.port}/v1"

    def on_ready(placement: list[Any]) -> None:
        split = "  ".join(f"{p.node}=[{p.start},{p.end})" for p in placement)
        print(f"zmqinfer serving {gw.model_id} at {base}\n  layers: {split}", flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        nonlocal gw
        guard.announce()
        gw = Gateway(gspec, model or DEFAULT_MODEL, model_path, nodes, counts, guard, on_ready,
                     model_id=model_id or model or DEFAULT_MODEL, discovery=discovery,
                     interfaces=interfaces, keys=keys)
        async with asyncio.TaskGroup() as tg:
            if procs:
                tg.create_task(watch(procs, stop))
            await gw.run(stop)

    try:
        asyncio.run(run())
    finally:
        stop_processes(procs)
    return 0


async def watch(procs: list[subprocess.Popen], stop: asyncio.Event) -> None:
    """Report a node process that dies (the gateway takes the ring down by itself)."""
    reported: set[int] = set()
    while not stop.is_set():
        for p in procs:
            if p.poll() is not None and p.pid not in reported:
                reported.add(p.pid)
                print(f"zmqinfer: node process {p.pid} exited with status {p.returncode}", file=sys.stderr)
        try:
            async with asyncio.timeout(PROCESS_CHECK_EVERY_S):
                await stop.wait()
        except TimeoutError:
            pass


def stop_processes(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:  # SIGINT, not SIGTERM: with the gateway gone there is no re-plan to drain into
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + NODE_STOP_GRACE_S
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
