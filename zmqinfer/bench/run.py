"""`zmqinfer bench`: the ring next to single-process mlx-lm, side by side, in one run.

These machines are noisy, so only ratios measured side by side mean anything. One run measures:

1. single-process mlx-lm (`baseline.py`, a process of its own): `generate_step` for one stream and
   time to first token, `batch_generate` at each concurrency level; once before and once after
   the rings, and ratios are against the mean of the two;
2. rings of 1, 2, 3 nodes, each a real `zmqinfer up` on loopback measured through the HTTP API
   (`loadgen.py`): single-stream decode, time to first token per prompt length, aggregate
   tokens/s per concurrency level, and the ring probe of `/cluster/ping`;
3. one core per node, standing in for separate machines: `zmqinfer up --pin` (node i on core i,
   one BLAS thread each) against a single process pinned to one core with one BLAS thread;
4. bytes on the wire per decoded token per hop (computed with the real encoder, `codec.encode`),
   node resident memory vs shard bytes, and which BLAS every process really uses (`blasinfo`).

Every workload (token ids, max_tokens, greedy) is built once here and given to both sides.
`report.py` renders the markdown and checks the targets; `server.py` measures `mlx_lm.server`
beside the rings and `simulate.py` the simulated devices; clusters start through `zmqinfer.local`. Each phase records how
much CPU other processes took meanwhile: on a shared machine that is the noise in its numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import random
import struct
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from zmqinfer import local
from zmqinfer.bench import blasinfo, conversation, loadgen, server, simulate, speculation
from zmqinfer.bench.report import dig, targets
from zmqinfer.bench.simulate import SimOptions
from zmqinfer.local import ONE_BLAS_THREAD
from zmqinfer.model.resolve import read_config

PROMPT = "Describe a cat to someone who has never seen one."  # long answer: no early stop
TOPICS = ["a lighthouse keeper", "the history of bread", "a city under the sea", "how bees talk",
          "a robot learning to paint", "the first winter on Mars", "a lost library", "volcanoes",
          "a chess match between rivals", "the migration of whales", "a bakery at midnight",
          "the invention of the printing press", "a train across Siberia", "a garden in the desert",
          "an old clockmaker", "the life of a river", "a mountain rescue", "the northern lights",
          "a market in Marrakesh", "a ship in a storm", "the making of violins", "a forest fire",
          "an astronaut's first day", "a village festival", "the secret life of octopuses",
          "a detective in Lisbon", "glaciers", "a jazz club in 1920", "a map with no names",
          "the last dragon", "a school for magicians", "the deep ocean floor"]
# Prose for prompts of an exact token count; shuffled per prompt so no two prompts are equal.
SENTENCES = ["The river bends twice before it reaches the old mill.", "Every morning the baker",
             "counts the loaves twice.", "Clouds gathered over the hills while the market closed.",
             "A small dog followed the postman along the narrow street.", "In the library, the",
             "clocks had stopped at different hours.", "She wrote the numbers in a green notebook.",
             "The train was late, so the passengers shared their bread.", "Snow fell on the harbour",
             "and the fishermen mended their nets.", "Nobody remembered who had planted the orchard."]
BASELINE_TIMEOUT_S = 1800.0  # the whole single-process run at full size takes a few minutes


@dataclass(frozen=True)
class Options:
    model: str | None = None
    nodes: tuple[int, ...] = (1, 2, 3)
    concurrency: tuple[int, ...] = (1, 4, 8, 16, 32)
    tokens: int = 64  # per single-stream request
    batch_tokens: int = 32  # per request at each concurrency level
    reps: int = 3  # single stream and time to first token: median of this many (after a warm-up)
    batch_reps: int = 1  # each concurrency level (a level at 32 already averages 32 requests)
    prompt_lengths: tuple[int, ...] = (128, 1024)
    pin: bool = True  # the one-core-per-node comparison (Linux only)
    pin_nodes: int = 2
    pin_concurrency: int = 16  # the level the pinned comparison runs at (closest measured one)
    pings: int = 10
    level_timeout_s: float = 300.0
    server: bool = True  # mlx_lm.server at the same concurrency levels
    simulate: SimOptions | None = SimOptions()  # simulated devices (simulate.py); None: skip
    conversation_turns: int = 10  # the prefix cache's conversation (bench/conversation.py); 0: skip
    conversation_growth: int = 300  # tokens each turn adds: 10 turns reach ~3,000
    speculation: bool = True  # the speculation comparison (bench/speculation.py)


# What `--quick` means: every size small enough for a smoke run of well under a minute.
QUICK = dict(nodes=(2,), concurrency=(1, 4), tokens=8, batch_tokens=8, reps=1, prompt_lengths=(16, 64),
             pings=3, level_timeout_s=60.0, conversation_turns=3, conversation_growth=24, speculation=False,
             simulate=SimOptions(stages=2, step_ms=5, concurrency=4, single_tokens=16, warm_s=0.3, window_s=0.5))


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity")


# ---- the run -------------------------------------------------------------------------------


def run(opts: Options, log: typing.Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from mlx_lm.utils import load_tokenizer

    from zmqinfer.model.resolve import resolve_model

    model_path = resolve_model(opts.model)
    tokenizer = load_tokenizer(model_path)
    work = workload(tokenizer, model_path, opts)
    pin_c = str(min(opts.concurrency, key=lambda c: abs(c - opts.pin_concurrency)))
    pinned_work = {**work, "batch": {pin_c: work["batch"][pin_c]}, "conversation": None, "structured": None}
    report: dict[str, Any] = {"machine": machine(), "options": dataclasses.asdict(opts),
                              "wire": wire_bytes(model_path), "rings": [], "pinned": None, "phases": []}
    report["machine"]["cpu_busy_before_pct"] = _others_load()
    extra = ["--model", opts.model] if opts.model else []

    def phase(what: str, fn: typing.Callable[[], dict[str, Any]]) -> dict[str, Any]:
        log(what)
        t0, cpu0 = time.monotonic(), _cpu_marks()
        result = fn()
        wall, cpu1 = time.monotonic() - t0, _cpu_marks()
        others = (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])
        report["phases"].append({"what": what, "seconds": round(wall, 1),
                                 "others_cores": round(max(0.0, others) / wall, 2)})
        return result

    with tempfile.TemporaryDirectory(prefix="zmqinfer-bench-") as tmp:
        t = Path(tmp)
        report["baseline_before"] = phase("mlx-lm, single process (before)", lambda: run_baseline(work, t / "before"))
        for n in opts.nodes:
            report["rings"].append(phase(f"ring, {n} node{'s' if n > 1 else ''}",
                                         lambda: run_ring(n, work, t, extra, opts)))
        if opts.pin and can_pin():
            core = sorted(os.sched_getaffinity(0))[0]
            base = phase("mlx-lm, single process, pinned to one core",
                         lambda: run_baseline(pinned_work, t / "pinned", cpu=core))
            ring = phase(f"ring, {opts.pin_nodes} nodes, one core each",
                         lambda: run_ring(opts.pin_nodes, pinned_work, t, [*extra, "--pin"], opts, pinned=True))
            report["pinned"] = {"baseline": base, "ring": ring, "concurrency": pin_c}
        elif opts.pin:
            report["pinned"] = {"error": "CPU pinning is not supported on this platform"}
        if opts.server:
            report["server"] = phase("mlx_lm.server", lambda: server.run(model_path, tokenizer, work, t,
                                                                         opts.level_timeout_s))
        if opts.simulate is not None:
            sim = opts.simulate
            report["simulated"] = phase("simulated devices", lambda: simulate.run_safely(sim, t))
        if opts.speculation:
            report["speculation"] = phase("speculation", lambda: speculation.run(
                model_path, tokenizer, t, run_baseline, extra, level_timeout_s=opts.level_timeout_s, log=log))
        report["baseline_after"] = phase("mlx-lm, single process (after)", lambda: run_baseline(work, t / "after"))
    report["machine"]["cpu_busy_after_pct"] = _others_load()
    report["baseline"] = _mean_baseline(report["baseline_before"], report["baseline_after"])
    report["targets"] = targets(report)
    return report


def workload(tokenizer: Any, model_path: Path, opts: Options) -> dict[str, Any]:
    """The exact token ids both sides process (JSON keys: prompt length / concurrency)."""
    def chat(text: str) -> list[int]:
        return [int(t) for t in tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                               add_generation_prompt=True)]

    def exact(n: int, seed: int) -> list[int]:
        rng, ids = random.Random(seed), list[int]()
        while len(ids) < n:
            ids += tokenizer.encode(" ".join(rng.sample(SENTENCES, len(SENTENCES))))
        return [int(t) for t in ids[:n]]

    styles = ["Write a long story about {}.", "Tell me everything you know about {}.",
              "Describe {} in great detail, step by step, for a curious child.", "Write an essay on {}."]
    batch = {str(c): {"prompts": [chat(styles[i % len(styles)].format(TOPICS[i % len(TOPICS)]))
                                  for i in range(c)], "max_tokens": opts.batch_tokens, "reps": opts.batch_reps}
             for c in opts.concurrency}
    return {"model_path": str(model_path),
            "single": {"prompt": chat(PROMPT), "tokens": opts.tokens, "reps": opts.reps},
            "structured": {"tokens": opts.tokens, "reps": opts.reps},  # rings only (bench/structured.py)
            "ttft": {str(n): [exact(n, 1000 * n + r) for r in range(opts.reps + 1)] for n in opts.prompt_lengths},
            "batch": batch,
            # A conversation growing by `conversation_growth` tokens a turn (bench/conversation.py).
            "conversation": {"turns": conversation.turns(
                chat(PROMPT), lambda t: exact(opts.conversation_growth, 7000 + t), opts.conversation_turns)}
            if opts.conversation_turns else None}


def run_baseline(work: dict[str, Any], where: Path, cpu: int | None = None) -> dict[str, Any]:
    """`python -m zmqinfer.bench.baseline` on `work`: a process of its own, so this one never holds a
    second copy of the model while the rings run; pinned to `cpu` with one BLAS thread if given."""
    where.mkdir(parents=True, exist_ok=True)
    wl, res = where / "workload.json", where / "result.json"
    wl.write_text(json.dumps(work))
    env, cmd = dict(os.environ), [sys.executable, "-m", "zmqinfer.bench.baseline", str(wl), str(res)]
    if cpu is not None:
        env.update(ONE_BLAS_THREAD)  # read by OpenBLAS when it loads: set here, not there
        cmd += ["--cpu", str(cpu)]
    setup = "mlx-lm, single process" + (", 1 core, 1 BLAS thread" if cpu is not None else "")
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BASELINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"setup": setup, "error": f"did not finish within {BASELINE_TIMEOUT_S:.0f}s"}
    if p.returncode != 0:
        return {"setup": setup, "error": f"exit {p.returncode}: {p.stderr[-2000:]}"}
    return {"setup": setup, **json.loads(res.read_text())}


def run_ring(n: int, work: dict[str, Any], tmp: Path, extra: list[str], opts: Options,
             pinned: bool = False) -> dict[str, Any]:
    setup = f"ring, {n} node{'s' if n > 1 else ''}" + (", 1 core + 1 BLAS thread each" if pinned else "")
    out: dict[str, Any] = {"setup": setup, "nodes": n, "pinned": pinned}
    t0 = time.monotonic()
    try:
        c = local.start(tmp, n, extra)
    except RuntimeError as e:
        return {**out, "error": f"did not start: {e}"}
    out["start_s"] = round(time.monotonic() - t0, 1)
    try:
        procs = {"gateway": c.proc.pid, **c.node_pids()}  # `up` runs the gateway in its own process
        out.update(asyncio.run(loadgen.measure(c.url, work, opts.level_timeout_s, opts.pings, procs)))
        st = _drained(c)
        out["per_node"] = [{"name": x["name"], "layers": x["layers"], "pid": x["pid"], "rss_bytes": x["rss_bytes"],
                            "shard_bytes": x["shard_bytes"], "process": blasinfo.describe(x["pid"])}
                           for x in st["nodes"]]
        out["gateway"] = blasinfo.describe(c.proc.pid)
    except OSError as e:
        out["error"] = f"lost the gateway: {e}"
    finally:
        local.stop(c)
    return out


def _drained(c: local.LocalCluster, timeout_s: float = 10.0) -> dict[str, Any]:
    """/cluster/status once every node has released the load's sequences and beaten since (every
    0.5 s): a node's memory is then what it keeps, not what the last level left in flight."""
    deadline = time.monotonic() + timeout_s
    while any(n["sequences"] for n in c.status()["nodes"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    status: dict[str, Any] = c.status()
    return status


def _mean_baseline(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Before and after, averaged metric by metric (one side alone when the other failed)."""
    def mean(*xs: float | None) -> float | None:
        vals = [x for x in xs if x is not None]
        return sum(vals) / len(vals) if vals else None

    return {"decode_tps": mean(dig(a, "single", "decode_tps"), dig(b, "single", "decode_tps")),
            "ttft_s": {n: mean(dig(a, "ttft", n, "median_s"), dig(b, "ttft", n, "median_s"))
                       for n in {**a.get("ttft", {}), **b.get("ttft", {})}},
            "batch_tps": {c: mean(dig(a, "batch", c, "tps"), dig(b, "batch", c, "tps"))
                          for c in {**a.get("batch", {}), **b.get("batch", {})}}}


# ---- machine and wire ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "-"

    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "usable_cores": len(os.sched_getaffinity(0)) if can_pin() else os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "os": platform.platform(),
            "python": platform.python_version(), "mlx": ver("mlx"), "mlx_lm": ver("mlx-lm"),
            "blas": blasinfo.describe(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def _others_load() -> float:
    """CPU busy (%) over half a second while none of ours run: what else this machine is doing."""
    import psutil

    return psutil.cpu_percent(interval=0.5)


def _cpu_marks() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its reaped
    children). A phase reaps every process it starts, so the difference of the deltas is what
    other processes (and the hypervisor, as steal) took from the machine during it."""
    import psutil

    t = psutil.cpu_times()
    o = os.times()
    return (sum(t) - t.idle - getattr(t, "iowait", 0.0),
            o.user + o.system + o.children_user + o.children_system)


def wire_bytes(model_path: Path) -> dict[str, Any]:
    """Bytes one decode step puts on each hop, from the real encoder (`codec.encode`).

    Representative values: epoch and step ids as a long-running gateway has them, positions
    around 1k, no sampling parameters (they ride on a sequence's first chunk only). Bytes count
    every frame plus ZMTP 3 framing (1 flag byte + a 1- or 8-byte length per frame); TCP/IP
    headers are not counted, nor CurveZMQ's 16-byte MAC per message when enabled.
    """
    cfg = read_config(model_path)
    hidden, dtype = int(cfg["hidden_size"]), _activation_dtype(model_path, cfg)
    out: dict[str, Any] = {"hidden_size": hidden, "dtype": dtype, "limit_per_seq": hidden * 2 + 256, "hops": []}
    for dt in dict.fromkeys([dtype, "bfloat16"]):
        for hop in ("gateway -> first node", "node -> node", "last node -> gateway"):
            one, many = _message_bytes(hop, 1, hidden, dt), _message_bytes(hop, 16, hidden, dt)
            out["hops"].append({"hop": hop, "dtype": dt, "b1_bytes": one, "b16_bytes": many,
                                "per_seq_bytes": (many - one) / 15, "measured_dtype": dt == dtype})
    return out


def _message_bytes(hop: str, b: int, hidden: int, dtype: str) -> int:
    import numpy as np

    from zmqinfer.protocol import codec, wire
    epoch, step = int(time.time() * 1000), 10**6
    if hop == "last node -> gateway":
        samples = tuple(_make(wire.Sample, seq=10**5 + i, token=40000 + i, logprob=-0.123456) for i in range(b))
        msg: Any = _make(wire.Sampled, epoch=epoch, step=step, samples=samples)
    else:
        chunks = tuple(_make(wire.Chunk, seq=10**5 + i, start=1024 + i, length=1, sample=True) for i in range(b))
        tokens = wire.Tensor("int32", (b,), np.zeros(b, np.int32).tobytes())
        hid = None if hop.startswith("gateway") else wire.Tensor(dtype, (b, hidden),
                                                                 bytes(b * hidden * wire.DTYPE_SIZES[dtype]))
        msg = _make(wire.Forward, epoch=epoch, step=step, chunks=chunks, tokens=tokens, hidden=hid)
    frames = [bytes(f) for f in codec.encode(msg)]
    codec.decode(frames)  # what we count must be a message the nodes accept
    return sum(len(f) + 1 + (1 if len(f) < 256 else 8) for f in frames)


def _make(cls: type, **known: Any) -> Any:
    """`cls(**known)`, any other required field given a plain zero of its type: the protocol grows
    (a micro-batch group id, ...) and these bytes must follow whatever the encoder writes."""
    hints = typing.get_type_hints(cls)
    kw = dict(known)
    for f in dataclasses.fields(cls):
        if f.name not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            tp = getattr(hints[f.name], "__supertype__", hints[f.name])
            tp = typing.get_origin(tp) or tp
            kw[f.name] = {int: 0, float: 0.0, str: "", bool: False, tuple: ()}.get(tp)
    return cls(**kw)


def _activation_dtype(model_path: Path, cfg: dict[str, Any]) -> str:
    """The dtype hidden states travel in: that of the float weights (mlx computes in it). Read
    from the first safetensors header; the config's dtype if there is none."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for f in sorted(model_path.glob("*.safetensors"))[:1]:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        counts: dict[str, int] = {}
        for k, v in header.items():
            if k != "__metadata__" and v.get("dtype") in names:
                counts[names[v["dtype"]]] = counts.get(names[v["dtype"]], 0) + 1
        if counts:
            return max(counts, key=lambda d: counts[d])
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
