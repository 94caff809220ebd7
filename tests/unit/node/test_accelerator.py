"""node/usage.py: reading accelerator utilisation and memory from the platform's own tools.

The parsers run on the tools' output (tests/fixtures/accelerator); the sampler runs real processes
(`cat` of a recorded output stands in for a tool this machine lacks, `sleep` for a wedged one)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from zmqinfer.node import accelerator as usage
from zmqinfer.node.accelerator import (
    IOREG,
    MAX_FAILURES,
    NVIDIA_SMI,
    STALE_AFTER_S,
    GpuSample,
    GpuSampler,
    parse_ioreg,
    parse_nvidia_smi,
    platform_probe,
)

FIXTURES = Path(__file__).parents[3] / "tests" / "fixtures" / "accelerator"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_ioreg_device_utilisation_and_memory_in_use() -> None:
    assert parse_ioreg(fixture("ioreg-m1pro-busy.txt")) == GpuSample(0.23, 1318436864)
    # "In use system memory (driver)" is another key: the exact one is read, whatever the order.
    assert parse_ioreg(fixture("ioreg-m2-idle.txt")) == GpuSample(0.0, 268435456)
    assert parse_ioreg(fixture("ioreg-no-accelerator.txt")) is None
    assert parse_ioreg('"PerformanceStatistics" = {"Device Utilization %"=140}') == GpuSample(1.0, None)


def test_nvidia_smi_one_gpu_many_gpus_and_fields_not_reported() -> None:
    assert parse_nvidia_smi(fixture("nvidia-smi-one.txt")) == GpuSample(0.37, 10240 << 20)
    assert parse_nvidia_smi(fixture("nvidia-smi-two.txt")) == GpuSample(0.5, (1 + 81559) << 20)
    assert parse_nvidia_smi(fixture("nvidia-smi-na.txt")) is None  # absent, not 0%
    assert parse_nvidia_smi("") is None


def test_which_tool_each_platform_asks() -> None:
    have = {"ioreg", "nvidia-smi"}

    def which(name: str) -> str | None:
        return f"/usr/bin/{name}" if name in have else None

    assert platform_probe("Darwin", which) == (IOREG, parse_ioreg)
    assert platform_probe("Linux", which) == (NVIDIA_SMI, parse_nvidia_smi)
    have.discard("nvidia-smi")
    assert platform_probe("Linux", which) is None  # Linux on CPU: nothing to ask
    # This machine: a tool only where it exists.
    assert (platform_probe() is None) == (shutil.which("nvidia-smi") is None and shutil.which("ioreg") is None)


async def test_sampler_reads_a_real_process_and_goes_stale() -> None:
    now = [100.0]
    sampler = GpuSampler((["cat", str(FIXTURES / "nvidia-smi-one.txt")], parse_nvidia_smi),
                         clock=lambda: now[0])
    assert sampler.latest is None
    assert await sampler.sample() == GpuSample(0.37, 10240 << 20)
    assert sampler.latest == GpuSample(0.37, 10240 << 20)
    now[0] += STALE_AFTER_S - 0.1
    assert sampler.latest is not None
    now[0] += 0.2  # the tool stopped answering: an old number is not reported as current
    assert sampler.latest is None


async def test_no_tool_means_absent_and_run_returns_at_once() -> None:
    sampler = GpuSampler(None)
    async with asyncio.timeout(1):
        await sampler.run()
    assert sampler.latest is None


async def test_a_tool_that_keeps_failing_is_given_up_after_max_failures() -> None:
    sampler = GpuSampler((["false"], parse_nvidia_smi), every=0.01)
    async with asyncio.timeout(10):
        await sampler.run()
    assert sampler.failures == MAX_FAILURES and sampler.latest is None
    missing = GpuSampler((["/nonexistent/nvidia-smi"], parse_nvidia_smi))
    assert await missing.sample() is None and missing.failures == 1


async def test_a_wedged_tool_is_killed_at_the_deadline() -> None:
    t0 = time.monotonic()
    assert await usage._run(["sleep", "30"], 0.3) is None
    assert time.monotonic() - t0 < 5


async def test_cancelling_a_sample_kills_the_tool(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(usage._run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], 20))
        async with asyncio.timeout(10):
            while not pidfile.exists() or not pidfile.read_text().strip():
                await asyncio.sleep(0.02)
        task.cancel()
    assert task.cancelled()
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(int(pidfile.read_text()), 0)
