"""What a node's accelerator is doing, read where the platform exposes it without root.

    macOS (Apple Silicon)  `ioreg -r -d 1 -w 0 -c IOAccelerator`: PerformanceStatistics'
                           "Device Utilization %" and "In use system memory"
    NVIDIA (NVML)          `nvidia-smi --query-gpu=utilization.gpu,memory.used ...`
    anything else          nothing: utilisation and accelerator memory are *absent* (None),
                           never a made-up 0

Both numbers are device-wide (every process on that GPU), as the tools report them. `GpuSampler`
runs the tool every SAMPLE_EVERY_S under a deadline in the node's TaskGroup; the heartbeat reads
`latest` and never waits for it. The parsers are pure functions of the tool's output, so the
tests run them on recorded output.
"""

from __future__ import annotations

import asyncio
import platform
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

log = structlog.get_logger()

# The heartbeat goes every second; the GPU's own counters are averaged over about that, and
# ioreg costs ~20 ms of CPU a run: every 2 s is fresh enough for a dashboard and cheap.
SAMPLE_EVERY_S = 2.0
# ioreg and nvidia-smi answer in tens of milliseconds; a tool that takes this long is wedged
# (a hung driver) and is killed rather than waited for.
SAMPLE_TIMEOUT_S = 5.0
# A tool that failed this many times in a row is not going to work on this machine: stop asking.
MAX_FAILURES = 5
# A sample older than this (the tool stopped answering) is no longer reported.
STALE_AFTER_S = 3 * SAMPLE_EVERY_S

IOREG = ("ioreg", "-r", "-d", "1", "-w", "0", "-c", "IOAccelerator")
NVIDIA_SMI = ("nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits")


@dataclass(frozen=True)
class GpuSample:
    utilization: float | None  # 0..1, device-wide
    memory_bytes: int | None  # accelerator memory in use, device-wide


_PERF = re.compile(r'"PerformanceStatistics"\s*=\s*\{([^}]*)\}')
_ENTRY = re.compile(r'"([^"]+)"\s*=\s*(-?\d+)')


def parse_ioreg(text: str) -> GpuSample | None:
    """The first accelerator's PerformanceStatistics; None when ioreg lists none."""
    m = _PERF.search(text)
    if m is None:
        return None
    stats = {k: int(v) for k, v in _ENTRY.findall(m.group(1))}
    util = stats.get("Device Utilization %")
    mem = stats.get("In use system memory")
    if util is None and mem is None:
        return None
    return GpuSample(None if util is None else min(100, max(0, util)) / 100, mem)


def parse_nvidia_smi(text: str) -> GpuSample | None:
    """One `util, MiB` line per GPU: the mean utilisation and the summed memory of them all;
    None when no line parses (no GPU, or "[N/A]" fields)."""
    utils: list[float] = []
    mems: list[int] = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            utils.append(float(parts[0]) / 100)
            mems.append(int(float(parts[1]) * (1 << 20)))  # nounits: memory.used is MiB
        except ValueError:
            continue  # "[N/A]" or "[Not Supported]" on some boards
    if not utils:
        return None
    return GpuSample(min(1.0, max(0.0, sum(utils) / len(utils))), sum(mems))


Parser = Callable[[str], GpuSample | None]
Probe = tuple[Sequence[str], Parser]


def platform_probe(system: str | None = None,
                   which: Callable[[str], str | None] = shutil.which) -> Probe | None:
    """The tool to ask on this machine, and how to read it; None where there is none."""
    system = system or platform.system()
    if system == "Darwin" and which("ioreg"):
        return IOREG, parse_ioreg
    if which("nvidia-smi"):
        return NVIDIA_SMI, parse_nvidia_smi
    return None


class GpuSampler:
    """The latest accelerator sample, refreshed in the background; None where unavailable."""

    def __init__(self, probe: Probe | None | Literal["auto"] = "auto", *, every: float = SAMPLE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`probe`: the tool and its parser; "auto" picks this platform's; None: nothing to ask."""
        self.probe = platform_probe() if isinstance(probe, str) else probe
        self.every, self._clock = every, clock
        self._latest: GpuSample | None = None
        self._at = 0.0
        self.failures = 0  # in a row

    @property
    def latest(self) -> GpuSample | None:
        if self._latest is None or self._clock() - self._at > STALE_AFTER_S:
            return None
        return self._latest

    async def run(self) -> None:
        """Owned by the node's TaskGroup; returns at once where there is nothing to sample."""
        while self.probe is not None and self.failures < MAX_FAILURES:
            await self.sample()
            await asyncio.sleep(self.every)
        if self.probe is not None:
            log.warning("accelerator sampling stopped: the tool keeps failing", tool=self.probe[0][0])

    async def sample(self) -> GpuSample | None:
        assert self.probe is not None
        cmd, parse = self.probe
        out = await _run(cmd, SAMPLE_TIMEOUT_S)
        got = parse(out) if out is not None else None
        if got is None:
            self.failures += 1
        else:
            self.failures, self._latest, self._at = 0, got, self._clock()
        return got


async def _run(cmd: Sequence[str], timeout: float) -> str | None:
    """stdout of `cmd`, or None if it fails, is missing or outlives `timeout` (then killed)."""
    try:
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return None
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    finally:
        if proc.returncode is None:  # cancelled while it ran: never leave it behind
            proc.kill()
            await asyncio.shield(proc.wait())
    return out.decode(errors="replace") if proc.returncode == 0 else None
