"""The `zmqinfer` command: its parser, and the commands that are not serving ones: node, model
path / fetch, bench. `up` and `gateway` live in serve.py, status / ping / discover in status.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zmqinfer.cli import keys as cluster_keys
from zmqinfer.cli import serve, service, top
from zmqinfer.cli import (
    status as client,  # status, ping, discover: clients of a running cluster
)
from zmqinfer.config import (
    DEFAULT_API_PORT,
    DEFAULT_DATA_PORT,
    ClusterConfig,
    ConfigError,
    NodeSpec,
    ip_literal,
    load_cluster,
    parse_size,
)
from zmqinfer.protocol.wire import NodeId

if TYPE_CHECKING:
    from zmqinfer.node.simulated import SimulatedCost


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is for the program a service runs (argparse would not let a
    # positional list follow the verb's options).
    cut = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:cut])
    args.passthrough = argv[cut + 1:]
    if args.passthrough and args.func is not service.cmd_service:
        print(f"zmqinfer: unexpected arguments after --: {' '.join(args.passthrough)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"zmqinfer: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zmqinfer", description="Serve one LLM across several machines.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    for add in (_add_up, _add_node, _add_gateway, client.add_commands, top.add_command, service.add_commands,
                cluster_keys.add_commands, _add_bench, _add_model):
        add(sub)  # client: status, ping, discover; top; service: install|...|logs; keys: init|add|trust|revoke|list
    return p


def _add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="start a local cluster (N nodes + gateway) and serve until Ctrl-C")
    up.add_argument("--nodes", type=int, default=3, help="node processes to start (default 3)")
    up.add_argument("--port", type=int, default=DEFAULT_API_PORT, help="HTTP port (default 8100); "
                    "control/results use port+1/+2, nodes port+10..")
    up.add_argument("--host", default="127.0.0.1", help="address to serve the API on")
    up.add_argument("--model", default=None, help="embedded default, a local mlx-lm directory or a hub id")
    up.add_argument("--layers", default=None, help="layer counts per node, e.g. 10,10,10")
    up.add_argument("--pin", action="store_true",
                    help="one core per node (node i on core i mod cores, one BLAS thread): stands in for "
                         "separate machines; Linux only, the gateway stays unpinned")
    up.add_argument("--memory-limit", metavar="SIZE", help="passed to each node (see node --help)")
    up.add_argument("--simulate", metavar="COST", help="passed to each node (see node --help): "
                    "N simulated devices instead of N stages computing")
    _add_api_auth(up)
    _add_prefix_cache(up)
    up.add_argument("--no-curve", action="store_true", help="plaintext ZeroMQ between the local processes "
                    "(default: CurveZMQ with a throwaway key per process; this is for measuring its cost)")
    up.add_argument("--keys", type=Path, default=None, metavar="DIR", help="keep the ring's cluster directory "
                    "here (made or completed as needed) instead of a throwaway one")
    up.set_defaults(func=serve.cmd_up)


def _add_node(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="run one node (on each machine)")
    node.add_argument("--name", required=True, help="this node's id, as in nodes.toml")
    node.add_argument("--config", type=Path, default=None, help="nodes.toml (for the gateway address and ports)")
    node.add_argument("--gateway", default=None, help="gateway IP[:control_port], overrides the config")
    node.add_argument("--port", type=int, default=None, help=f"data port (default {DEFAULT_DATA_PORT})")
    node.add_argument("--bind", default="0.0.0.0", help="address to bind the data port on")
    node.add_argument("--interface", action="append", default=[], metavar="IP", help="use mDNS (advertise, "
                      "find the gateway) on this interface IP only; repeatable (default: all)")
    node.add_argument("--no-advertise", action="store_true", help="no mDNS ad: nodes.toml must list its address")
    node.add_argument("--memory-limit", metavar="SIZE", help="offer at most this much memory for layers: bytes, "
                      "450M, 1.5G, 512MiB (K..T, KiB..TiB: powers of 1024; KB..TB: of 1000)")
    node.add_argument("--simulate", metavar="STEP_MS[,SEQ_MS[,PREFILL_TOKEN_MS]]", help="stand in for "
                      "a device: sleep this cost per decode step (+ per sequence, + per prefill token) "
                      "instead of computing (benchmarks of the pipeline itself)")
    node.add_argument("--allow-sleep", action="store_true", help="do not hold a no-idle-sleep assertion while "
                      "serving (by default the machine stays awake while this node has requests)")
    node.add_argument("--log-file", type=Path, default=None, metavar="PATH", help="JSON lines to PATH, rotated "
                      "by size (what the launchd service uses), instead of stderr")
    _add_curve(node)
    node.set_defaults(func=cmd_node)


def _add_gateway(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gw = sub.add_parser("gateway", help="run the gateway (on one machine)")
    gw.add_argument("--config", type=Path, default=Path("nodes.toml"), help="nodes.toml (default ./nodes.toml)")
    gw.add_argument("--model", default=None, help="overrides the config's model")
    gw.add_argument("--port", type=int, default=None, help="HTTP port, overrides the config")
    gw.add_argument("--layers", default=None, help="layer counts per node, e.g. 10,9,9")
    gw.add_argument("--interface", action="append", default=[], metavar="IP",
                    help="browse and advertise over mDNS on this interface IP only; repeatable")
    gw.add_argument("--no-discovery", action="store_true", help="no mDNS: nodes.toml's nodes only")
    gw.add_argument("--log-file", type=Path, default=None, metavar="PATH", help="JSON lines to PATH, rotated "
                    "by size (what the launchd service uses), instead of stderr")
    _add_api_auth(gw)
    _add_prefix_cache(gw)
    _add_curve(gw)
    gw.set_defaults(func=serve.cmd_gateway)


def _add_api_auth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="API keys, one per line (KEY or NAME KEY); also [api] keys / key_file in "
                        "nodes.toml and $ZMQINFER_API_KEY (comma-separated). Without any key only "
                        "loopback clients are answered (protected mode)")
    p.add_argument("--no-auth", action="store_true",
                   help="no API keys and no protected mode: anyone who reaches the port may use the API")


def _add_prefix_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt from its first token: no reuse of cached prompt prefixes "
                        "across requests (docs/prefix-cache.md)")
    p.add_argument("--no-speculation", action="store_true",
                   help="decode one token per step through the ring: no drafts looked up in the prompt "
                        "and output (docs/speculation.md)")


def _add_curve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", type=Path, default=None, metavar="DIR",
                   help="the cluster directory (zmqinfer keys): CurveZMQ with this process's key pair "
                        "(default: $ZMQINFER_KEYS, else ~/.config/zmqinfer/cluster when it exists)")
    p.add_argument("--no-curve", action="store_true",
                   help="plaintext ZeroMQ even when a cluster directory exists")


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="ring vs single-process mlx-lm, side by side: decode, first "
                           "token, aggregate throughput, one core per node, hops, wire bytes, memory, BLAS")
    bench.add_argument("--model", default=None)
    bench.add_argument("--quick", action="store_true",
                       help="small sizes for a smoke run (2 nodes, concurrency 1,4, 8 tokens, prompts 16,64, "
                            "1 rep); the flags below override it")
    bench.add_argument("--nodes", default=None, help="ring sizes (default 1,2,3)")
    bench.add_argument("--concurrency", default=None, help="aggregate levels (default 1,4,8,16,32)")
    bench.add_argument("--tokens", type=int, default=None, help="tokens per single-stream request (default 64)")
    bench.add_argument("--batch-tokens", type=int, default=None,
                       help="tokens per request at each concurrency level (default 32, at most --tokens)")
    bench.add_argument("--reps", type=int, default=None, help="repetitions of single requests (default 3)")
    bench.add_argument("--batch-reps", type=int, default=None, help="repetitions of each level (default 1)")
    bench.add_argument("--prompt-lengths", default=None, help="time-to-first-token prompts (default 128,1024)")
    bench.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                       help="the one-core-per-node comparison (default on where supported)")
    bench.add_argument("--pin-nodes", type=int, default=None, help="nodes in the pinned ring (default 2)")
    bench.add_argument("--pin-concurrency", type=int, default=None,
                       help="the pinned comparison's level: the closest measured one (default 16)")
    bench.add_argument("--level-timeout", type=float, default=None,
                       help="seconds a concurrency level may take before it counts as failed (default 300)")
    bench.add_argument("--conversation-turns", type=int, default=None, help="turns of the prefix cache's "
                       "conversation, timed with and without the cache (default 10; 0 skips it)")
    bench.add_argument("--conversation-growth", type=int, default=None,
                       help="tokens each conversation turn adds (default 300)")
    bench.add_argument("--json", type=Path, default=None, help="also write the report here")
    bench.add_argument("--speculation", action="store_true",
                       help="only speculation: a code edit, chat and 16 chats on single-process mlx-lm and on "
                            "3-node rings with and without speculation (docs/speculation.md)")
    bench.add_argument("--simulate", action="store_true", help="only the simulated devices: a ring of "
                       "--stages nodes that sleep --step-ms per step instead of computing, at c=1 and c=16")
    bench.add_argument("--stages", type=int, default=3, help="simulated devices (default 3)")
    bench.add_argument("--step-ms", type=float, default=10.0, help="a simulated decode step (default 10)")
    bench.add_argument("--curve-cost", action="store_true",
                       help="only what CurveZMQ costs: a Curve and a plaintext ring side by side, measured "
                            "interleaved (--nodes: one size, default 2; --reps: rounds, default 3; --tokens, --batch-tokens; c=16)")
    bench.add_argument("--floor", action="store_true",
                       help="only the least a token can cost round a ring here: bare ZeroMQ relays "
                            "(sync, asyncio, + a thread, + an mlx op) beside the ring with --simulate 0 "
                            "(--nodes: sizes, default 1,3)")
    bench.set_defaults(func=cmd_bench)


def _add_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    model = sub.add_parser("model", help="model utilities")
    msub = model.add_subparsers(required=True, metavar="ACTION")
    mp = msub.add_parser("path", help="print the local mlx-lm directory of a model (converting the default)")
    mp.add_argument("model", nargs="?", default=None)
    mp.set_defaults(func=cmd_model_path)
    mf = msub.add_parser("fetch", help="download a hub model's config, tokenizer and only the weight "
                                       "files that a layer range needs (a node's shard)")
    mf.add_argument("model", help="Hugging Face id, e.g. mlx-community/Qwen3-1.7B-8bit")
    mf.add_argument("--layers", metavar="START:END", default=None,
                    help="layers START..END-1, as nodes.toml's [START, END]; default: every layer "
                         "(what a gateway machine needs)")
    mf.set_defaults(func=cmd_model_fetch)


# ---- model ---------------------------------------------------------------------------------


def cmd_model_path(args: argparse.Namespace) -> int:
    from zmqinfer.model.resolve import ModelNotFound

    try:
        print(serve.resolve_with_progress(args.model))
    except ModelNotFound as e:
        print(f"zmqinfer: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_model_fetch(args: argparse.Namespace) -> int:
    """The one command that downloads weights: nodes themselves only read the local cache."""
    from zmqinfer.model.resolve import ModelNotFound
    from zmqinfer.model.shards import fetch_shard

    start, end = 0, None
    if args.layers is not None:
        try:
            start, end = (int(x) for x in args.layers.split(":"))
        except ValueError:
            raise ConfigError(f"--layers {args.layers!r}: expected START:END, e.g. 0:10") from None
    try:
        print(fetch_shard(args.model, start, end))
    except ValueError as e:  # a range outside the model, or a malformed weight index
        raise ConfigError(f"--layers {args.layers}: {e}" if args.layers else f"{args.model}: {e}") from None
    except ModelNotFound as e:
        print(f"zmqinfer: {e}", file=sys.stderr)
        return 1
    return 0


# ---- processes -----------------------------------------------------------------------------


def cmd_node(args: argparse.Namespace) -> int:
    from zmqinfer import log
    from zmqinfer.node.options import NodeOptions
    from zmqinfer.node.process import run_node

    cfg = load_cluster(args.config) if args.config else ClusterConfig()
    spec = cfg.node(args.name) if args.config else NodeSpec(NodeId(args.name))
    interfaces = tuple(ip_literal(ip, "--interface") for ip in args.interface)
    memory_limit = parse_size(args.memory_limit, "--memory-limit") if args.memory_limit else None
    log.setup(f"node:{args.name}", args.log_file)  # before the gateway lookup: its logs belong on stderr too
    host, port = cfg.gateway.address, cfg.gateway.control_port
    if args.gateway:
        host, _, p = args.gateway.partition(":")
        port = int(p) if p else port
    elif not (args.config and _names_gateway(args.config)):
        if (found := client.locate_gateway(interfaces)) is None:
            return 1
        host, port = found
    opts = NodeOptions(name=NodeId(args.name), gateway_host=ip_literal(host, "--gateway"), control_port=port,
                       data_port=args.port or spec.port, bind=args.bind, interfaces=interfaces,
                       advertise=not args.no_advertise, memory_limit=memory_limit,
                       simulate=_simulate(args.simulate), allow_sleep=args.allow_sleep,
                       keys=serve.curve_keys(args.keys, args.name, args.no_curve))
    return asyncio.run(run_node(opts))


def _simulate(text: str | None) -> SimulatedCost | None:
    from zmqinfer.node.simulated import SimulatedCost, SimulatedCostError

    try:
        return SimulatedCost.parse(text) if text is not None else None
    except SimulatedCostError as e:
        raise ConfigError(str(e)) from None


def _bench_simulated(args: argparse.Namespace) -> int:
    import tempfile

    from zmqinfer.bench import simulate

    if not 1 <= args.stages <= 16 or not 0 < args.step_ms <= 1000:
        raise ConfigError("--stages must be 1..16 and --step-ms in (0, 1000]")
    opts = simulate.SimOptions(stages=args.stages, step_ms=args.step_ms)
    with tempfile.TemporaryDirectory(prefix="zmqinfer-sim-") as tmp:
        report = simulate.run(opts, Path(tmp), log=lambda what: print(what, file=sys.stderr, flush=True))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


def _names_gateway(path: Path) -> bool:
    import tomllib  # load_cluster fills in 127.0.0.1: "this machine", not "where the gateway is"

    gateway = tomllib.loads(Path(path).read_text()).get("gateway")
    return isinstance(gateway, dict) and "address" in gateway


def _report(text: str, data: dict[str, Any], path: Path | None) -> int:
    """A benchmark section's table on stdout, and its data as JSON in `path` when asked."""
    print(text)
    if path is not None:
        path.write_text(json.dumps(data, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from zmqinfer.bench import run as bench
    from zmqinfer.bench.report import failures, report_tables

    if args.simulate:
        return _bench_simulated(args)

    def ints(text: str | None, what: str) -> tuple[int, ...] | None:
        if text is None:
            return None
        try:
            vals = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise ConfigError(f"{what} {text!r}: expected numbers separated by commas") from None
        if min(vals) < 1:
            raise ConfigError(f"{what} {text!r}: every value must be at least 1")
        return vals

    if args.speculation:
        from zmqinfer.bench import speculation

        found = speculation.standalone(args.model, bench.run_baseline, tokens=args.tokens or 160, reps=args.reps or 2,
                                       log=lambda what: print(what, file=sys.stderr, flush=True))
        return _report(speculation.table(found), found, args.json)
    if args.floor:
        from zmqinfer.bench import floor

        found = floor.run(stages=ints(args.nodes, "--nodes") or (1, 3),
                          log=lambda what: print(what, file=sys.stderr, flush=True))
        return _report(floor.table(found), found, args.json)
    if args.curve_cost:
        from zmqinfer.bench import curvecost

        sizes = ints(args.nodes, "--nodes") or (2,)
        cost = curvecost.run(nodes=sizes[0], rounds=args.reps or curvecost.ROUNDS, tokens=args.tokens or 32,
                             batch_tokens=args.batch_tokens or 16,
                             log=lambda what: print(what, file=sys.stderr, flush=True))
        return _report(curvecost.table(cost), cost, args.json)
    given: dict[str, Any] = dict(bench.QUICK) if args.quick else {}
    for key, value in (("nodes", ints(args.nodes, "--nodes")),
                       ("concurrency", ints(args.concurrency, "--concurrency")),
                       ("prompt_lengths", ints(args.prompt_lengths, "--prompt-lengths")),
                       ("tokens", args.tokens), ("batch_tokens", args.batch_tokens), ("reps", args.reps),
                       ("batch_reps", args.batch_reps), ("pin", args.pin), ("pin_nodes", args.pin_nodes),
                       ("pin_concurrency", args.pin_concurrency), ("level_timeout_s", args.level_timeout),
                       ("conversation_turns", args.conversation_turns),
                       ("conversation_growth", args.conversation_growth)):
        if value is not None:
            given[key] = value
    if "batch_tokens" not in given and "tokens" in given:
        given["batch_tokens"] = min(bench.Options.batch_tokens, given["tokens"])
    opts = bench.Options(model=args.model, **given)
    if opts.tokens < 2 or min(opts.reps, opts.batch_reps, opts.batch_tokens, opts.pin_nodes) < 1 \
            or opts.level_timeout_s <= 0:
        raise ConfigError("--tokens must be at least 2 (decode speed needs a second token); --reps, "
                          "--batch-reps, --batch-tokens and --pin-nodes at least 1; --level-timeout positive")
    if opts.pin and not bench.can_pin():
        print("zmqinfer: CPU pinning is not supported on this platform; skipping the one-core-per-node "
              "comparison", file=sys.stderr)
    started = time.monotonic()
    report = bench.run(opts, log=lambda what: print(f"[{time.monotonic() - started:6.0f}s] {what}",
                                                      file=sys.stderr, flush=True))
    report["seconds"] = round(time.monotonic() - started, 1)
    print(report_tables(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    failed = failures(report)
    for line in failed:
        print(f"zmqinfer: failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
