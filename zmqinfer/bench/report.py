"""The benchmark report (`bench.run`'s dict) as markdown tables, and the issue's five targets.

`targets(report)` turns measurements into ratios and says met / missed by how much. When a run
did not measure the exact setting a target names (a `--quick` run has no 1024-token prompt or
concurrency 16), the closest measured setting stands in and the target says so
(`as_specified: false`): such a line exercises the arithmetic, it is not a result.
"""

from __future__ import annotations

from typing import Any

from zmqinfer.bench import blasinfo, conversation, speculation, structured

Report = dict[str, Any]


# ---- targets -------------------------------------------------------------------------------


def targets(r: Report) -> list[dict[str, Any]]:
    base = r["baseline"]
    rings = {x["nodes"]: x for x in r["rings"] if "error" not in x}
    pinned = r.get("pinned") or {}
    out = []

    n, exact = _closest(list(rings), 3)
    out.append(_ratio(1, "single-stream decode through 3 nodes vs single-process mlx-lm", f"{n} nodes", exact,
                      dig(rings.get(n), "single", "decode_tps"), base["decode_tps"], ">=", 0.9))

    pc = pinned.get("concurrency")
    out.append(_ratio(2, "one core per node, 2 nodes, concurrency 16: aggregate vs one pinned process",
                      f"{dig(pinned, 'ring', 'nodes')} nodes, concurrency {pc}",
                      pc == "16" and dig(pinned, "ring", "nodes") == 2,
                      dig(pinned, "ring", "batch", pc, "tps"), dig(pinned, "baseline", "batch", pc, "tps"),
                      ">=", 1.7))

    n, exact_n = _closest(list(rings), 3)
    c, exact_c = _closest([int(k) for k in base["batch_tps"]], 16)
    out.append(_ratio(3, "3 nodes on this machine, concurrency 16: aggregate vs mlx-lm batch_generate",
                      f"{n} nodes, concurrency {c}", exact_n and exact_c,
                      dig(rings.get(n), "batch", str(c), "tps"), base["batch_tps"].get(str(c)), ">=", 1.0))

    lengths = [int(k) for k in (dig(pinned, "baseline", "ttft") or {})]
    length, exact = _closest(lengths, 1024)
    out.append(_ratio(4, "1024-token prompt, 2 pinned nodes: time to first token vs one pinned process",
                      f"{length}-token prompt, {dig(pinned, 'ring', 'nodes')} nodes",
                      exact and dig(pinned, "ring", "nodes") == 2,
                      dig(pinned, "ring", "ttft", str(length), "median_s"),
                      dig(pinned, "baseline", "ttft", str(length), "median_s"), "<=", 0.7))

    w = r["wire"]
    hop = next(h for h in w["hops"] if h["hop"] == "node -> node" and h["measured_dtype"])
    measured, limit = hop["b1_bytes"], w["limit_per_seq"]
    out.append({"id": 5, "what": "wire bytes per decoded token per hop vs hidden_size x 2 + 256 per sequence",
                "at": f"node -> node, {w['dtype']}, one sequence (whole message incl. ZMTP framing)",
                "as_specified": True, "measured": measured, "required": limit, "op": "<=", "unit": "bytes",
                "status": "met" if measured <= limit else "missed",
                "detail": (f"{measured} B <= {limit} B" if measured <= limit else
                           f"missed by {measured - limit} B ({measured} B > {limit} B); "
                           f"per extra sequence {hop['per_seq_bytes']:.0f} B. The hidden state alone is "
                           f"hidden_size x {_size(w['dtype'])} B in {w['dtype']}")})
    return out + _speed_targets(r, rings)


def _speed_targets(r: Report, rings: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13: as fast as the best single process on one machine, every device busy."""
    base, server, sim = r["baseline"], r.get("server") or {}, r.get("simulated") or {}
    c, exact_c = _closest([int(k) for k in base["batch_tps"]], 16)
    out = [_ratio(tid, f"up, {n} node(s), concurrency 16: aggregate vs mlx_lm.server", f"{n} node(s), concurrency {c}",
                  exact_c and n in rings, dig(rings.get(n), "batch", str(c), "tps"),
                  dig(server, "batch", str(c), "tps"), ">=", need)
           for tid, n, need in ((6, 3, 0.9), (7, 1, 1.0))]
    out.append(_ratio(8, "ring, 1 node, concurrency 16: aggregate vs batch_generate", f"1 node, concurrency {c}",
                      exact_c and 1 in rings, dig(rings.get(1), "batch", str(c), "tps"),
                      base["batch_tps"].get(str(c)), ">=", 0.95))
    out.append(_ratio(9, "single stream through 3 nodes vs single-process mlx-lm", "3 nodes", 3 in rings,
                      dig(rings.get(3), "single", "decode_tps"), base["decode_tps"], ">=", 0.95))
    at = f"{sim.get('stages')} simulated devices, {sim.get('step_ms')} ms a step, concurrency {sim.get('concurrency')}"
    spec = (sim.get("stages"), sim.get("step_ms"), sim.get("concurrency")) == (3, 10.0, 16)
    out.append(_ratio(10, "simulated devices: aggregate steps/s vs ideal", at, spec,
                      sim.get("aggregate_steps_per_s"), sim.get("ideal_steps_per_s"), ">=", 0.9))
    busy = min((sim.get("busy") or {}).values(), default=None)
    out.append(_ratio(11, "simulated devices: the least busy device (busy time / wall time)", at, spec,
                      busy, 1.0 if busy is not None else None, ">=", 0.9))
    gap = (sim["single_stream_ms_per_token"] - sim["ideal_ms_per_token"]) if sim.get("ideal_ms_per_token") else None
    out.append({"id": 12, "what": "simulated devices: one stream's ms per token over the ideal", "at": at,
                "as_specified": spec, "measured": gap, "required": 1.0, "op": "<=", "unit": "ms",
                "status": "not measured" if gap is None else "met" if gap <= 1.0 else "missed",
                "detail": "a measurement is missing" if gap is None else f"{gap:.2f} ms over {sim['ideal_ms_per_token']} ms"})
    return out + _conversation_targets(r, rings)


def _conversation_targets(r: Report, rings: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 22: the late turns of a growing conversation, with the prefix cache."""
    n, exact = _closest(list(rings), 3)
    talk = dig(rings, n, "conversation") or {}
    at = f"{n} nodes, {talk.get('turns')} turns growing to {(talk.get('prompt_tokens') or [None])[-1]} tokens"
    spec = exact and talk.get("turns") == 10 and ((talk.get("prompt_tokens") or [0])[-1] or 0) >= 2500
    late = talk.get("late_with_cache_s")
    return [_ratio(13, "conversation, turns 5-10: time to first token without the prefix cache / with it", at,
                   spec, talk.get("late_without_cache_s"), late, ">=", 5.0),
            _ratio(14, "conversation, turns 5-10: mlx_lm.server's time to first token / the ring's with the cache",
                   at, spec, dig(r.get("server"), "conversation", "late_with_cache_s"), late, ">=", 1.0)]


def _ratio(tid: int, what: str, at: str, exact: bool, num: float | None, den: float | None,
           op: str, required: float) -> dict[str, Any]:
    t: dict[str, Any] = {"id": tid, "what": what, "at": at + ("" if exact else " (stand-in: not the setting named)"),
                         "as_specified": exact, "required": required, "op": op, "unit": "x"}
    if num is None or den is None or den <= 0:
        return {**t, "measured": None, "status": "not measured", "detail": "a measurement is missing or failed"}
    m = num / den
    met = m >= required if op == ">=" else m <= required
    if met:
        detail = f"{m:.2f}x {op} {required:.2f}x"
    elif op == ">=":
        detail = f"missed by {required - m:.2f}x ({m:.2f}x, needs {required:.2f}x: {required / m:.2f}x faster)"
    else:
        detail = f"missed by {m - required:.2f}x ({m:.2f}x, needs <= {required:.2f}x)"
    return {**t, "measured": m, "status": "met" if met else "missed", "detail": detail}


def _closest(available: list[int], want: int) -> tuple[int | None, bool]:
    if not available:
        return None, False
    best = min(available, key=lambda a: (abs(a - want), -a))
    return best, best == want


def _size(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def dig(d: Any, *keys: Any) -> Any:
    """d[k0][k1]... of nested report dicts, or None where a level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def failures(r: Report) -> list[str]:
    """Every measurement that failed, one line each (the tables show them in place too)."""
    out = []
    setups = [r["baseline_before"], *_rings_all(r), *([r["server"]] if r.get("server") else []),
              r["baseline_after"]]
    if "baseline" in (r.get("pinned") or {}):
        setups.append(r["pinned"]["baseline"])
    for x in setups:
        if "error" in x:
            out.append(f"{x['setup']}: {x['error']}")
        for part in ("single", "ping", "structured"):
            if "error" in (x.get(part) or {}):
                out.append(f"{x['setup']}, {part}: {x[part]['error']}")
        for kind in ("ttft", "batch"):
            for key, m in (x.get(kind) or {}).items():
                if "error" in m:
                    out.append(f"{x['setup']}, {'prompt' if kind == 'ttft' else 'concurrency'} {key}: {m['error']}")
    if "error" in (r.get("pinned") or {}):
        out.append(f"one core per node: {r['pinned']['error']}")
    return out


# ---- markdown ------------------------------------------------------------------------------


def report_tables(r: Report) -> str:
    o = r["options"]
    parts = [_machine(r), _single(r), _aggregate(r), _cpu(r), _pinned(r), _simulated(r), _hops(r), _wire(r), _memory(r),
             _blas(r), structured.table(r["rings"]),
             conversation.table([x for x in [*r["rings"], r.get("server") or {}] if "conversation" in x]),
             speculation.table(r.get("speculation")), _targets(r), _phases(r),
             _failures(r)]
    head = (f"Greedy; single stream {o['tokens']} tokens (median of {o['reps']} after a warm-up), time to "
            f"first token median of {o['reps']} (ring: a max_tokens=1 request through the HTTP API), aggregate "
            f"{o['batch_tokens']} tokens per request; the mlx-lm baseline runs before and after the rings and "
            "ratios are against their mean.")
    return "\n\n".join([head, *[p for p in parts if p]])


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _machine(r: Report) -> str:
    m = r["machine"]
    return (f"**Machine**: {m['cpu']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable), "
            f"{m['ram_bytes'] / 2**30:.0f} GiB RAM, {m['os']}; Python {m['python']}, mlx {m['mlx']}, "
            f"mlx-lm {m['mlx_lm']}; BLAS: {m['blas']['blas']}. {m['date']}. Other load on the machine: "
            f"{m.get('cpu_busy_before_pct', 0):.0f}% CPU busy before the run, "
            f"{m.get('cpu_busy_after_pct', 0):.0f}% after.")


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1000 * s:.0f} ms"


def _x(a: float | None, b: float | None) -> str:
    return "" if a is None or not b else f" ({a / b:.2f}x)"


def _err(x: dict[str, Any] | None) -> str:
    return "failed (below)" if x and "error" in x else "-"


def _single(r: Report) -> str:
    base = r["baseline"]
    lengths = [str(n) for n in r["options"]["prompt_lengths"]]
    rows = []
    for x in [r["baseline_before"], *r["rings"], r["baseline_after"]]:
        if "error" in x and "single" not in x:
            rows.append([x["setup"], _err(x)] + [""] * len(lengths))
            continue
        tps = dig(x, "single", "decode_tps")
        row = [x["setup"], "-" if tps is None else f"{tps:.2f}{_x(tps, base['decode_tps'])}"]
        for n in lengths:
            t = dig(x, "ttft", n, "median_s")
            row.append(_ms(t) + ("" if t is None else _x(t, base["ttft_s"].get(n))) if t is not None
                       else _err(dig(x, "ttft", n)))
        rows.append(row)
    return "**Single stream**\n\n" + _table(
        ["setup", "decode tok/s (vs mlx-lm)"] + [f"first token, {n}-token prompt" for n in lengths], rows)


def _aggregate(r: Report) -> str:
    base = r["baseline"]["batch_tps"]
    levels = [str(c) for c in r["options"]["concurrency"]]
    rows = []
    for x in [r["baseline_before"], *r["rings"], *([r["server"]] if r.get("server") else []), r["baseline_after"]]:
        row = [x["setup"] + (" (batch_generate)" if "mlx-lm," in x["setup"] else "")]
        for c in levels:
            tps = dig(x, "batch", c, "tps")
            row.append(f"{tps:.1f}{_x(tps, base.get(c))}" if tps is not None else _err(dig(x, "batch", c) or x))
        rows.append(row)
    return (f"**Aggregate tokens/s** (c requests of {r['options']['batch_tokens']} tokens at once; tokens / "
            "time from the first send to the last token; vs mlx-lm batch_generate)\n\n"
            + _table(["setup"] + [f"c={c}" for c in levels], rows))


def _cpu(r: Report) -> str:
    """CPU per generated token at each level, per process: where a setup spends the machine."""
    levels = [str(c) for c in r["options"]["concurrency"]]
    rows = []
    for x in [r["baseline_before"], *r["rings"], *([r["server"]] if r.get("server") else [])]:
        for c in levels:
            per = dig(x, "batch", c, "cpu_ms_per_token")
            if per:
                rows.append([x["setup"], c, f"{sum(per.values()):.1f}",
                             ", ".join(f"{k} {v:.1f}" for k, v in per.items())])
    if not rows:
        return ""
    return ("**CPU per generated token** (ms of CPU, user + system, all threads, during each aggregate "
            "level / completion tokens)\n\n" + _table(["setup", "concurrency", "total ms", "per process (ms)"], rows))


def _pinned(r: Report) -> str:
    p = r.get("pinned")
    if not p:
        return ""
    if "error" in p:
        return f"**One core per node**: {p['error']}"
    b, g, c = p["baseline"], p["ring"], p["concurrency"]
    rows = [["decode tok/s (single stream)", *_pair(dig(b, "single", "decode_tps"), dig(g, "single", "decode_tps"), "{:.2f}")]]
    for n in sorted(b.get("ttft", {}), key=int):
        rows.append([f"first token, {n}-token prompt",
                     *_pair(dig(b, "ttft", n, "median_s"), dig(g, "ttft", n, "median_s"), "ms")])
    rows.append([f"aggregate tok/s, concurrency {c}",
                 *_pair(dig(b, "batch", c, "tps"), dig(g, "batch", c, "tps"), "{:.1f}")])
    return ("**One core per node** (stands in for separate machines; every node and the single process "
            "pinned to one core with one BLAS thread; the gateway unpinned)\n\n"
            + _table(["", b["setup"], g["setup"], "ring / single"], rows)
            + (f"\n\nfailed: {b.get('error', '')} {g.get('error', '')}" if "error" in b or "error" in g else ""))


def _pair(a: float | None, b: float | None, fmt: str) -> list[str]:
    def f(v: float | None) -> str:
        return "-" if v is None else (_ms(v) if fmt == "ms" else fmt.format(v))
    return [f(a), f(b), "-" if a is None or b is None or not a else f"{b / a:.2f}x"]


def _rings_all(r: Report) -> list[dict[str, Any]]:
    p = r.get("pinned") or {}
    return r["rings"] + ([p["ring"]] if "ring" in p else [])


def _hops(r: Report) -> str:
    rows = []
    for x in _rings_all(r):
        ring_ms = dig(x, "ping", "ring_ms")
        ctrl = dig(x, "ping", "control_ms") or {}
        hops = x["nodes"] + 1
        rows.append([x["setup"], "-" if ring_ms is None else f"{ring_ms:.2f} ms", str(hops),
                     "-" if ring_ms is None else f"{ring_ms / hops:.2f} ms",
                     ", ".join(f"{k} {v:.2f}" for k, v in ctrl.items()) or "-"])
    return ("**Per hop** (an empty probe through every stage and back, `/cluster/ping`, median while idle; "
            "hops = nodes + 1)\n\n" + _table(["ring", "probe round trip", "hops", "per hop", "control round trip (ms)"], rows))


def _wire(r: Report) -> str:
    w = r["wire"]
    rows = [[h["hop"], h["dtype"] + ("" if h["measured_dtype"] else " (for comparison)"), f"{h['b1_bytes']} B",
             f"{h['per_seq_bytes']:.0f} B"] for h in w["hops"]]
    return (f"**Bytes on the wire per decoded token** (computed by encoding decode-step messages with "
            f"`codec.encode`, hidden size {w['hidden_size']}, nodes compute in {w['dtype']}; frames + ZMTP framing, "
            f"no TCP/IP headers; target <= hidden_size x 2 + 256 = {w['limit_per_seq']} B per sequence)\n\n"
            + _table(["hop", "dtype", "one sequence (whole message)", "each extra sequence (B=16 vs 1)"], rows))


def _memory(r: Report) -> str:
    rows = []
    for x in [r["baseline_before"], *(dig(r, "pinned", "baseline") and [r["pinned"]["baseline"]] or [])]:
        if x.get("rss_bytes"):
            rows.append([x["setup"], "whole process", "all", _mib(x["rss_bytes"]), "-", "-"])
    for x in _rings_all(r):
        for n in x.get("per_node", []):
            rows.append([x["setup"], n["name"], f"[{n['layers'][0]},{n['layers'][1]})", _mib(n["rss_bytes"]),
                         _mib(n["shard_bytes"]), _mib((n["rss_bytes"] or 0) - (n["shard_bytes"] or 0))])
    return ("**Memory** (each node once the load's sequences are released)\n\n"
            + _table(["setup", "process", "layers", "resident", "shard", "resident - shard"], rows))


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f} MiB"


def _blas(r: Report) -> str:
    rows: list[tuple[str, str, list[str]]] = [("bench", "this process", _proc(r["machine"]["blas"]))]
    for x in [r["baseline_before"], *(dig(r, "pinned", "baseline") and [r["pinned"]["baseline"]] or [])]:
        if x.get("process"):
            rows.append((x["setup"], "mlx-lm", _proc(x["process"])))
    for x in _rings_all(r):
        if x.get("gateway"):
            rows.append((x["setup"], "gateway", _proc(x["gateway"])))
        for n in x.get("per_node", []):
            rows.append((x["setup"], n["name"], _proc(n["process"])))
    return ("**BLAS per process** (read from /proc/<pid>/maps and environ)\n\n"
            + _table(["setup", "process", "BLAS", "OPENBLAS_NUM_THREADS", "CPU affinity", "threads"],
                     [[setup, proc, *cells] for setup, proc, cells in rows]))


def _proc(p: dict[str, Any]) -> list[str]:
    aff = p.get("affinity")
    return [blasinfo.short(p), p.get("openblas_num_threads") or "default",
            "-" if aff is None else ",".join(map(str, aff)), str(p.get("threads") or "-")]


def _simulated(r: Report) -> str:
    s = r.get("simulated")
    if not s:
        return ""
    if "error" in s:
        return f"**Simulated devices**: {s['error']}"
    busy = ", ".join(f"{k} {v:.2f}" for k, v in s["busy"].items())
    return (f"**Simulated devices** ({s['stages']} nodes sleeping {s['step_ms']} ms a step instead of computing; "
            f"the real gateway, scheduler, wire and HTTP between them; {s['groups']} micro-batch groups)\n\n"
            + _table(["concurrency", "measured", "ideal", "busy"],
                     [[str(s["concurrency"]), f"{s['aggregate_steps_per_s']:.1f} steps/s "
                       f"({s['aggregate_tokens_per_s']:.0f} tok/s)", f"{s['ideal_steps_per_s']:.0f} steps/s", busy],
                      ["1", f"{s['single_stream_ms_per_token']:.1f} ms/token", f"{s['ideal_ms_per_token']:.0f} ms/token",
                       "-"]]))


def _targets(r: Report) -> str:
    units = {"x": "x", "ms": " ms"}
    rows = [[str(t["id"]), t["what"], t["at"], f"{t['op']} {t['required']}{units.get(t['unit'], ' B')}",
             t["status"].upper() if t["status"] != "not measured" else t["status"], t["detail"]]
            for t in r["targets"]]
    return "**Targets** (1-5: issue 3; 6-12: issue 13)\n\n" + _table(["#", "target", "measured at", "needs", "status", "detail"], rows)


def _phases(r: Report) -> str:
    rows = [[p["what"], f"{p['seconds']:.0f} s", f"{p['others_cores']:.2f}"] for p in r.get("phases", [])]
    return (f"**Run** (this machine's {r['machine']['usable_cores']} cores are shared: CPU that other processes "
            "took during each phase, in cores busy on average, is noise in that phase)\n\n"
            + _table(["phase", "time", "other processes (cores)"], rows))


def _failures(r: Report) -> str:
    failed = failures(r)
    return "**Failed measurements**\n\n" + "\n".join(f"* {f}" for f in failed) if failed else ""
