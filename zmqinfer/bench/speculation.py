"""`zmqinfer bench --speculation`: draft-free speculation (issue 23), side by side in one run.

One stream on a code edit (the prompt holds a ~60-line code block and asks for it back with one
small change: prompt lookup's best case) and on open-ended chat (its worst), and 16 concurrent
chat streams (where speculation steps aside), each measured on

    single-process mlx-lm   plain greedy `generate_step` (`batch_generate` at 16), baseline.py
    3-node ring             speculation on (the default)
    3-node ring             --no-speculation

with the ring's drafted and accepted tokens read from /cluster/status around each workload.
The same token ids go to every side. A ring's answer may stop at EOS before max_tokens
(mlx-lm's `generate_step` never stops): decode speed is tokens over time either way.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import aiohttp

from zmqinfer import local
from zmqinfer.bench import loadgen

CODE = '''import json
import os
from dataclasses import dataclass, field


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8100
    workers: int = 4
    timeout: float = 30.0
    tags: list[str] = field(default_factory=list)


def parse_config(path: str) -> Config:
    """Read a JSON config file into a Config, keeping defaults for missing keys."""
    if not os.path.exists(path):
        return Config()
    with open(path) as handle:
        data = json.load(handle)
    config = Config()
    if "host" in data:
        config.host = str(data["host"])
    if "port" in data:
        config.port = int(data["port"])
    if "workers" in data:
        config.workers = max(1, int(data["workers"]))
    if "timeout" in data:
        config.timeout = float(data["timeout"])
    if "tags" in data:
        config.tags = [str(t) for t in data["tags"]]
    return config


def validate(config: Config) -> list[str]:
    """Every problem with a config, as a readable sentence."""
    problems = []
    if not 1 <= config.port <= 65535:
        problems.append(f"port {config.port} is out of range")
    if config.workers > 64:
        problems.append(f"{config.workers} workers is too many")
    if config.timeout <= 0:
        problems.append("the timeout must be positive")
    for tag in config.tags:
        if not tag.isidentifier():
            problems.append(f"tag {tag!r} is not an identifier")
    return problems


def main() -> int:
    config = parse_config(os.environ.get("APP_CONFIG", "config.json"))
    problems = validate(config)
    for p in problems:
        print("config:", p)
    if problems:
        return 1
    print(f"serving on {config.host}:{config.port} with {config.workers} workers")
    return 0
'''
EDIT = (f"Here is a Python module:\n```python\n{CODE}```\nReturn the whole module unchanged except for "
        "one thing: the default port must be 8200 instead of 8100. Reply with the code only.")
CHAT = "Describe a cat to someone who has never seen one."
STYLES = ["Write a long story about {}.", "Tell me everything you know about {}."]
TOPICS = ["a lighthouse keeper", "the history of bread", "a city under the sea", "how bees talk",
          "a robot learning to paint", "the first winter on Mars", "a lost library", "volcanoes"]


def workload(tokenizer: Any, model_path: Path, tokens: int, chat_tokens: int, reps: int,
             concurrency: int, batch_tokens: int) -> dict[str, Any]:
    def chat(text: str) -> list[int]:
        return [int(t) for t in tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                               add_generation_prompt=True)]

    prompts = [chat(STYLES[i % 2].format(TOPICS[i % len(TOPICS)] + f" ({i})")) for i in range(concurrency)]
    return {"model_path": str(model_path),
            "code": {"prompt": chat(EDIT), "tokens": tokens, "reps": reps},
            "chat": {"prompt": chat(CHAT), "tokens": chat_tokens, "reps": reps},
            "batch": {str(concurrency): {"prompts": prompts, "max_tokens": batch_tokens, "reps": 1}}}


def run(model_path: Path, tokenizer: Any, tmp: Path, run_baseline: typing.Callable[[dict[str, Any], Path], dict[str, Any]],
        extra: list[str], *, tokens: int = 160, chat_tokens: int = 64, reps: int = 2, concurrency: int = 16,
        batch_tokens: int = 32, level_timeout_s: float = 300.0,
        log: typing.Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every side of the comparison (see the module docstring); `run_baseline(work, dir)` runs
    single-process mlx-lm on a workload in a process of its own (run.py's)."""
    work = workload(tokenizer, model_path, tokens, chat_tokens, reps, concurrency, batch_tokens)
    out: dict[str, Any] = {"concurrency": concurrency, "code_prompt_tokens": len(work["code"]["prompt"]),
                           "code_lines": CODE.count("\n")}
    log("speculation: mlx-lm, single process")
    base = {name: run_baseline({"model_path": work["model_path"], "single": work[name],
                                **({"batch": work["batch"]} if name == "chat" else {})}, tmp / f"spec-{name}")
            for name in ("code", "chat")}
    out["mlx_lm"] = {"code_tps": base["code"].get("single", {}).get("decode_tps"),
                     "chat_tps": base["chat"].get("single", {}).get("decode_tps"),
                     "batch_tps": base["chat"].get("batch", {}).get(str(concurrency), {}).get("tps"),
                     "errors": [b["error"] for b in base.values() if "error" in b]}
    for name, flags in (("ring_spec", []), ("ring_plain", ["--no-speculation"])):
        log(f"speculation: 3-node ring{' ' + flags[0] if flags else ''}")
        try:
            c = local.start(tmp, 3, [*extra, *flags])
        except RuntimeError as e:
            out[name] = {"error": f"did not start: {e}"}
            continue
        try:
            out[name] = asyncio.run(_measure(c, work, level_timeout_s))
        finally:
            local.stop(c)
    return out


def standalone(model: str | None, run_baseline: typing.Callable[[dict[str, Any], Path], dict[str, Any]],
               **kw: Any) -> dict[str, Any]:
    """`run` on its own (`bench --speculation`), in a directory of its own."""
    from mlx_lm.utils import load_tokenizer

    from zmqinfer.model.resolve import resolve_model

    path = resolve_model(model)
    with tempfile.TemporaryDirectory(prefix="zmqinfer-spec-") as tmp:
        return run(path, load_tokenizer(path), Path(tmp), run_baseline, ["--model", model] if model else [], **kw)


async def _measure(c: local.LocalCluster, work: dict[str, Any], level_timeout_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        for name in ("code", "chat"):
            w = work[name]
            before = _counts(c)
            runs = [await _stream(s, c.url, w["prompt"], w["tokens"]) for _ in range(w["reps"] + 1)]
            after = _counts(c)
            drafted, accepted = after[0] - before[0], after[1] - before[1]
            out[name] = {"decode_tps": statistics.median(r[0] for r in runs[1:]), "runs": [r[0] for r in runs[1:]],
                         "tokens": [r[1] for r in runs], "drafted": drafted, "accepted": accepted,
                         "acceptance": accepted / drafted if drafted else None,
                         "tokens_per_step": _per_step(c, sum(r[1] for r in runs), before, after)}
        (conc, level), = work["batch"].items()
        before = _counts(c)
        out["batch"] = await loadgen.aggregate(s, c.url, level["prompts"], level["max_tokens"], level_timeout_s)
        after = _counts(c)
        out["batch"].update(drafted=after[0] - before[0], accepted=after[1] - before[1],
                            skipped_busy=after[2] - before[2])
    return out


def _counts(c: local.LocalCluster) -> tuple[int, int, int, int]:
    """(draft tokens, accepted tokens, steps skipped as busy, decode steps) so far."""
    st = c.status()
    sp = st.get("speculation") or {}
    return (sp.get("draft_tokens", 0), sp.get("accepted_tokens", 0), sp.get("skipped", {}).get("busy", 0),
            st.get("decode_steps", 0))


def _per_step(c: local.LocalCluster, tokens: int, before: tuple[int, ...], after: tuple[int, ...]) -> float | None:
    steps = after[3] - before[3]
    return round(tokens / steps, 2) if steps else None


async def _stream(s: aiohttp.ClientSession, url: str, prompt: list[int], tokens: int) -> tuple[float, int]:
    """(decode tokens/s after the first, tokens) of one streamed greedy completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first, n = 0.0, 0
    async with s.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=60 + tokens)) as r:
        if r.status != 200:
            raise loadgen.LoadError(f"HTTP {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and chunk["choices"][0].get("text") and not first:
                first = time.perf_counter()
    if n < 2 or not first:
        raise loadgen.LoadError(f"only {n} tokens: too few to time decoding")
    return (n - 1) / (time.perf_counter() - first), n


def table(r: dict[str, Any] | None) -> str:
    """The comparison as markdown, with the issue's targets."""
    if not r:
        return ""
    base, spec, plain = r.get("mlx_lm", {}), r.get("ring_spec", {}), r.get("ring_plain", {})

    def tps(x: Any) -> str:
        return f"{x:.1f}" if isinstance(x, (int, float)) else "-"

    def ratio(a: Any, b: Any) -> str:
        return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"

    def cell(ring: dict[str, Any], name: str) -> Any:
        return (ring.get(name) or {}).get("decode_tps") if name != "batch" else (ring.get("batch") or {}).get("tps")

    rows = ["## Speculation (draft-free, prompt lookup)", "",
            f"Code edit: a {r.get('code_lines')}-line module in a {r.get('code_prompt_tokens')}-token prompt. "
            "Tokens/s of decoding (one stream) and aggregate (concurrency "
            f"{r.get('concurrency')}); ratios against single-process mlx-lm.", "",
            "| workload | mlx-lm | ring, speculation | ring, none | spec / mlx-lm | none / mlx-lm "
            "| accepted / drafted | tokens per step |",
            "|---|---|---|---|---|---|---|---|"]
    for name, key in (("code edit, 1 stream", "code"), ("chat, 1 stream", "chat"),
                      (f"chat, c={r.get('concurrency')}", "batch")):
        b = base.get(f"{key}_tps")
        s, p = cell(spec, key), cell(plain, key)
        w = spec.get(key) or {}
        acc = f"{w.get('accepted')} / {w.get('drafted')}" if "drafted" in w else "-"
        rows.append(f"| {name} | {tps(b)} | {tps(s)} | {tps(p)} | {ratio(s, b)} | {ratio(p, b)} | {acc} "
                    f"| {w.get('tokens_per_step', '-')} |")
    errors = [f"{k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
    errors += base.get("errors", [])
    return "\n".join(rows + ([""] + [f"error: {e}" for e in errors] if errors else []))
