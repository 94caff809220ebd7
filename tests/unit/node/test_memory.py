"""node/heap.py: with the mmap threshold pinned, a freed mlx buffer of a few MiB leaves the
process, also after an earlier one was freed (which, unpinned, raises glibc's threshold and
keeps the next one resident: the control run shows the test can fail). Each run in a fresh
interpreter: the threshold is process-wide and cannot be unpinned."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

PROBE = """
import sys, psutil, mlx.core as mx
from zmqinfer.node.memory import pin_mmap_threshold
if sys.argv[1] == "pin":
    assert pin_mmap_threshold()
mx.set_cache_limit(0)  # freed buffers go back to malloc at once, not to mlx's cache
proc = psutil.Process()
kept = []
for _ in range(3):  # 16 MiB each: the first free raises an unpinned threshold past the rest
    a = mx.zeros((4 << 20,), dtype=mx.float32)
    mx.eval(a)
    before = proc.memory_info().rss
    del a
    mx.clear_cache()
    kept.append(proc.memory_info().rss - before)
print(max(kept[1:]) >> 20)
"""


def resident_after_free(mode: str) -> int:
    """How resident memory changed (MiB) when a 16 MiB buffer was freed, at worst over the
    frees after the first: about -16 when it left the process, about 0 when it stayed."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=60, check=True)
    return int(out.stdout.split()[-1])


def test_pinned_threshold_hands_freed_buffers_back() -> None:
    assert resident_after_free("pin") <= -12, "a freed 16 MiB buffer stayed resident"


def test_unpinned_glibc_keeps_them_the_control() -> None:
    assert resident_after_free("plain") >= -4
