"""Which BLAS a running process really uses, and how it is pinned: read from the outside.

`describe(pid)` looks at what the kernel says about a process, never at what we asked for:

* its mapped libraries (`/proc/<pid>/maps`) and its `LD_PRELOAD` (`/proc/<pid>/environ`). mlx's
  Linux wheel links a bundled reference (netlib) BLAS; a preloaded OpenBLAS or MKL interposes its
  symbols and wins. numpy maps its own OpenBLAS too, but with prefixed symbols (scipy_openblas),
  which mlx never calls, so a BLAS counts only when preloaded or when nothing else is there.
* `OPENBLAS_NUM_THREADS` / `OPENBLAS_THREAD_TIMEOUT` from its environment, its thread count and
  CPU affinity.

On macOS mlx runs on Metal and its CPU ops use Accelerate; /proc does not exist there.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

# Library file names that provide the BLAS interface mlx calls (cblas_sgemm and friends).
_BLAS_NAME = re.compile(r"lib(openblas\w*|blas|mkl_rt|blis|cblas|flexiblas)[-.\w]*\.so", re.I)
_NUMPY_PRIVATE = re.compile(r"scipy_openblas|numpy\.libs", re.I)  # prefixed symbols: not mlx's


def describe(pid: int | None = None) -> dict[str, Any]:
    """BLAS library, BLAS thread settings, threads and CPU affinity of `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    if platform.system() == "Darwin":
        return {"pid": pid, "blas": "Accelerate (macOS)", "blas_path": None, "blas_kind": "accelerate",
                "openblas_num_threads": None, "openblas_thread_timeout": None,
                "threads": None, "affinity": None}
    env = _environ(pid)
    mapped = _mapped_libraries(pid)
    # maps shows resolved paths; LD_PRELOAD usually names a symlink (libopenblas.so.0).
    preload = {os.path.realpath(p) for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p}
    preloaded = [m for m in mapped if _BLAS_NAME.search(Path(m).name) and os.path.realpath(m) in preload]
    bundled = [m for m in mapped if "mlx" in m and _BLAS_NAME.search(Path(m).name)]
    others = [m for m in mapped if _BLAS_NAME.search(Path(m).name) and not _NUMPY_PRIVATE.search(m)
              and m not in preloaded and m not in bundled]
    if preloaded:
        kind, path = _kind(preloaded[0]), preloaded[0]
        text = f"{_pretty(kind)} {path} (preloaded: overrides mlx's bundled reference BLAS)"
    elif others:
        kind, path = _kind(others[0]), others[0]
        text = f"{_pretty(kind)} {path}"
    elif bundled:
        kind, path = "reference", bundled[0]
        text = f"bundled reference BLAS ({path})"
    else:
        kind, path = "unknown", None
        text = "unknown (no BLAS library mapped: mlx not loaded yet?)"
    return {"pid": pid, "blas": text, "blas_path": path, "blas_kind": kind,
            "openblas_num_threads": env.get("OPENBLAS_NUM_THREADS"),
            "openblas_thread_timeout": env.get("OPENBLAS_THREAD_TIMEOUT"),
            "threads": _threads(pid), "affinity": _affinity(pid)}


def short(info: dict[str, Any]) -> str:
    """One cell for a table: the library and its thread setting."""
    name = {"openblas": "OpenBLAS", "mkl": "MKL", "reference": "reference BLAS (bundled)",
            "accelerate": "Accelerate"}.get(info.get("blas_kind", ""), info.get("blas", "?"))
    if info.get("blas_path") and info.get("blas_kind") == "openblas":
        name += f" ({Path(info['blas_path']).name})"
    return name


def _kind(path: str) -> str:
    name = Path(path).name.lower()
    if "openblas" in name:
        return "openblas"
    if "mkl" in name:
        return "mkl"
    if "blis" in name:
        return "blis"
    return "reference" if name.startswith("libblas") else "other"


def _pretty(kind: str) -> str:
    return {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS", "reference": "reference BLAS"}.get(kind, "BLAS")


def _mapped_libraries(pid: int) -> list[str]:
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    seen: dict[str, None] = {}
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and ".so" in parts[5]:
            seen.setdefault(parts[5].strip(), None)
    return list(seen)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return dict(os.environ) if pid == os.getpid() else {}
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def _threads(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _affinity(pid: int) -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(pid))
    except (AttributeError, OSError):
        return None
