"""How a node hands freed memory back to the machine (glibc; elsewhere these do nothing).

mlx's CPU allocator takes its buffers from malloc. glibc maps a large buffer on its own and
unmaps it when it is freed, but each such free raises its mmap threshold to that buffer's size
(up to 32 MiB): from then on KV caches and activations of a few MiB come from the heap, and
what they leave when freed stays resident, split between live buffers. A node under a 700 MB
limit serving 32 long requests (tests/loopback/test_load.py) peaked at 620-780 MB resident
with ~120 MiB of that outside mlx's own count; with the threshold pinned, at 485 MB.

Pinned only on a node with a memory limit: mapping and unmapping a step's larger buffers
(logits, a group's KV) costs page faults: one unlimited node given 16 short prompts at once
(prefill, one token each) made 12.3 tokens/s pinned against 14.9 unpinned (means of 6 rounds,
side by side, this machine).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import mlx.core as mx

# glibc's own starting threshold: buffers from 128 KiB up are mapped and unmapped one by one.
MMAP_THRESHOLD_BYTES = 128 << 10
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if all(hasattr(libc, f) for f in ("mallopt", "malloc_trim")) else None  # not on musl


_LIBC = _glibc()


def pin_mmap_threshold() -> bool:
    """Keep large buffers mapped for the process's life (see the module's docstring): call once,
    before the first model loads. False where there is no glibc to tell."""
    return _LIBC is not None and _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def give_back_memory() -> None:
    """Hand mlx's cache of freed buffers back, and on glibc the malloc arenas they leave: the mlx
    thread's arena otherwise keeps them. The middle node of a 3-node ring, 2 s after 16 and then
    32 concurrent requests: 422 MiB resident with only the cache cleared, 233 MiB with the arenas
    trimmed too (227 MiB before any request)."""
    mx.clear_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
